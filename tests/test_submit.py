"""``bincounter submit``: parameter checking, token resolution, and a real kfp.Client against an HTTP double
of the Kubeflow Pipelines API (v2beta1)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bincounter import runs, submit

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipeline.yaml"


@pytest.fixture(scope="module")
def parameters():
    return submit.pipeline_parameters(PIPELINE_FILE)


def test_params_are_typed_as_the_pipeline_declares(parameters):
    params = submit.parse_params(
        ["epochs=30", "price_per_gpu_hour=2.75", "deploy_model=false", "spot=True", "arch=resnet18",
         'extra_train_args=["--label-smoothing", "0.1"]', 'step_node_selector={"pool": "cpu"}',
         "work_uri=s3://b/p=1"], parameters)
    assert params == {"epochs": 30, "price_per_gpu_hour": 2.75, "deploy_model": False, "spot": True,
                      "arch": "resnet18", "extra_train_args": ["--label-smoothing", "0.1"],
                      "step_node_selector": {"pool": "cpu"}, "work_uri": "s3://b/p=1"}


def test_unknown_param_lists_the_valid_names(parameters):
    with pytest.raises(ValueError) as err:
        submit.parse_params(["epoch=3"], parameters)
    message = str(err.value)
    assert "Unknown pipeline parameter 'epoch'" in message
    for name in ("epochs", "engine", "work_uri", "tune_trials"):
        assert name in message


@pytest.mark.parametrize("pair, match", [
    ("epochs=ten", "Invalid value 'ten' for parameter epochs"),
    ("deploy_model=maybe", "expected true or false"),
    ("extra_train_args={}", "expected a JSON list"),
    ("step_node_selector=[1]", "expected a JSON object"),
    ("engine=docker", "Invalid engine 'docker'"),
    ("epochs", "expected NAME=VALUE"),
])
def test_bad_params_are_rejected_with_the_reason(parameters, pair, match):
    with pytest.raises(ValueError, match=match):
        submit.parse_params([pair], parameters)


def test_parameters_come_from_the_file_being_uploaded(parameters, tmp_path):
    assert parameters["epochs"] == {"type": "NUMBER_INTEGER", "default": 30}
    assert parameters["engine"]["default"] == "kubernetes"
    with pytest.raises(FileNotFoundError, match="python pipeline.py"):
        submit.pipeline_parameters(tmp_path / "missing.yaml")


def test_token_resolution_order(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-service-account\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    assert submit.resolve_token(None) == "from-service-account"
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "from-env")
    assert submit.resolve_token(None) == "from-env"
    assert submit.resolve_token("explicit") == "explicit"
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))
    assert submit.resolve_token(None) is None


def test_main_rejects_bad_params_before_contacting_the_server(capsys):
    # Port 9 (discard) on loopback: nothing must be sent there.
    from bincounter import cli

    assert cli.main(["submit", "--host", "http://127.0.0.1:9", "--param", "epoch=3"]) == 2
    assert capsys.readouterr().err.startswith("error: Unknown pipeline parameter 'epoch'")


class _KfpApiDouble(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for upload + experiment + run, recording every request."""

    requests: list[dict] = []
    existing_pipeline: str | None = None
    run_states: list[dict] = []  # successive GET /runs/r-1 bodies (the last one repeats)

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        url = urllib.parse.urlparse(self.path)
        entry = {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                 "auth": self.headers.get("Authorization"), "body": self.rfile.read(length)}
        self.requests.append(entry)
        return entry

    def do_GET(self):
        req = self._record()
        if req["path"] == "/apis/v2beta1/pipelines":
            found = [{"pipeline_id": self.existing_pipeline, "display_name": "bincounter"}]
            return self._reply({"pipelines": found, "total_size": 1} if self.existing_pipeline else {})
        if req["path"].startswith("/apis/v2beta1/pipelines/") and req["path"].endswith("/versions"):
            return self._reply({"pipeline_versions": [{"pipeline_version_id": "v-1"}], "total_size": 1})
        if req["path"] == "/apis/v2beta1/experiments":
            return self._reply({})
        if req["path"] == "/apis/v2beta1/runs/r-1" and self.run_states:
            body = self.run_states.pop(0) if len(self.run_states) > 1 else self.run_states[0]
            return self._reply({"run_id": "r-1", **body})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        req = self._record()
        if req["path"] == "/apis/v2beta1/pipelines/upload":
            return self._reply({"pipeline_id": "p-new", "display_name": req["query"]["name"][0]})
        if req["path"] == "/apis/v2beta1/pipelines/upload_version":
            return self._reply({"pipeline_id": self.existing_pipeline, "pipeline_version_id": "v-2"})
        if req["path"] == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "e-1", **json.loads(req["body"])})
        if req["path"] == "/apis/v2beta1/runs":
            return self._reply({"run_id": "r-1", **json.loads(req["body"])})
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def kfp_api():
    _KfpApiDouble.requests = []
    _KfpApiDouble.existing_pipeline = None
    _KfpApiDouble.run_states = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpApiDouble)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _KfpApiDouble
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("existing", [None, "p-old"])
def test_submit_uploads_and_starts_a_run_with_a_real_kfp_client(kfp_api, existing, monkeypatch, capsys, tmp_path):
    url, api = kfp_api
    api.existing_pipeline = existing
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    args = submit.get_args_parser().parse_args([
        "--host", url, "--namespace", "team-a", "--experiment", "counting", "--token", "secret-token",
        "--param", "epochs=3", "--param", "deploy_model=false", "--param", 'extra_train_args=["--workers", "8"]'])
    assert submit.main(args) == 0
    out = capsys.readouterr().out  # kfp.Client prints its own "Pipeline details: URL" lines first
    result = json.loads(out[out.index('{\n  "pipeline_id"'):])
    assert result["run_id"] == "r-1" and result["experiment_id"] == "e-1"
    assert all(r["auth"] == "Bearer secret-token" for r in api.requests)

    paths = [(r["method"], r["path"]) for r in api.requests]
    if existing:  # a new version of the existing pipeline
        assert ("POST", "/apis/v2beta1/pipelines/upload_version") in paths
        assert result["pipeline_id"] == "p-old" and result["version_id"] == "v-2"
    else:
        upload = next(r for r in api.requests if r["path"] == "/apis/v2beta1/pipelines/upload")
        assert b"uploadfile" in upload["body"] and PIPELINE_FILE.read_bytes()[:200] in upload["body"]
        assert result["pipeline_id"] == "p-new" and result["version_id"] == "v-1"
    experiment = json.loads(next(r for r in api.requests if r["path"] == "/apis/v2beta1/experiments"
                                 and r["method"] == "POST")["body"])
    assert experiment["display_name"] == "counting" and experiment["namespace"] == "team-a"
    run = json.loads(next(r for r in api.requests if r["path"] == "/apis/v2beta1/runs")["body"])
    assert run["experiment_id"] == "e-1"
    assert run["pipeline_version_reference"]["pipeline_id"] == result["pipeline_id"]
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "deploy_model": False,
                                                   "extra_train_args": ["--workers", "8"]}


# --wait: the run's state as the v2beta1 API returns it (kfp_server_api.V2beta1Run: state,
# error.message, run_details.task_details[].display_name/state/error), read by a real kfp.Client.
def _run(state: str, *tasks: tuple, error: str = "") -> dict:
    details = [{"display_name": name, "state": st, **({"error": {"message": msg}} if msg else {})}
               for name, st, msg in tasks]
    return {"state": state, "run_details": {"task_details": details}, **({"error": {"message": error}} if error else {})}


def _wait(kfp_api, tmp_path, monkeypatch, capsys, states: list[dict]) -> tuple[int, str, str]:
    from bincounter import cli

    url, api = kfp_api
    api.run_states = states
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        code = cli.main(["submit", "--host", url, "--namespace", "team-a", "--wait", "--poll-interval", "0.01",
                         "--param", f"work_uri={tmp_path / 'work'}"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_wait_streams_step_states_then_prints_the_report_model_and_endpoint(kfp_api, tmp_path, monkeypatch,
                                                                           capsys):
    run = tmp_path / "work" / "runs" / "r-1"
    (run / "evaluation").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "evaluation" / "report.md").write_text("# bincounter run report\n\n## Test metrics\n")
    runs.mark_succeeded(str(tmp_path / "work"), "r-1", "deploy", endpoint="http://bincounter.team-a.example",
                        engine="kubernetes")
    code, out, err = _wait(kfp_api, tmp_path, monkeypatch, capsys, [
        _run("PENDING"),
        _run("RUNNING", ("download", "RUNNING", "")),
        _run("RUNNING", ("download", "SUCCEEDED", ""), ("split", "RUNNING", "")),
        _run("SUCCEEDED", ("download", "SUCCEEDED", ""), ("split", "SUCCEEDED", "")),
    ])
    assert code == 0, err
    lines = [line.split(maxsplit=1)[1] for line in out.splitlines() if line[:2].isdigit()]  # "HH:MM:SS  step STATE"
    assert [" ".join(line.split()) for line in lines] == ["download RUNNING", "download SUCCEEDED", "split RUNNING",
                                                          "split SUCCEEDED"]
    assert "## Test metrics" in out
    assert f"model: {run / 'model'}" in out and "endpoint: http://bincounter.team-a.example" in out


def test_wait_exits_non_zero_with_the_failing_step_message(kfp_api, tmp_path, monkeypatch, capsys):
    code, out, err = _wait(kfp_api, tmp_path, monkeypatch, capsys, [
        _run("RUNNING", ("train", "RUNNING", "")),
        _run("FAILED", ("root", "FAILED", "DAG failed"), ("train", "FAILED", "PyTorchJob bincounter-r-1 failed: OOMKilled"),
             error="run failed"),
    ])
    assert code == 1
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "run r-1 FAILED: step train failed: PyTorchJob bincounter-r-1 failed: OOMKilled" in line


def test_wait_reports_a_canceled_run(kfp_api, tmp_path, monkeypatch, capsys):
    code, out, err = _wait(kfp_api, tmp_path, monkeypatch, capsys, [_run("CANCELING"), _run("CANCELED")])
    assert code == 1 and "run r-1 was canceled" in err
