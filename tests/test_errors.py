"""Every user mistake listed in issue 14 ends in one ``error: ...`` line that names the bad thing.

Commands run in-process through ``bincounter.cli.main`` (the same code path as the
``bincounter`` script, without paying a Python start per case). Exit codes: 2 for bad
usage, 1 otherwise. Network peers are real sockets on 127.0.0.1: a closed port (refused)
and a server that accepts and never answers (timeouts).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from bincounter import cli, errors


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse exits on usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture
def silent_server():
    """Accepts connections and never answers (a hung API server or a black-holing proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


# ---------------------------------------------------------------- missing inputs

@pytest.mark.parametrize("argv, needle", [
    (["split", "{missing}", "--output", "{tmp}/out"], "source folder {missing} does not exist"),
    (["download", "--source", "{missing}", "--output", "{tmp}/dl"], "--source folder {missing} does not exist"),
    (["train", "--data", "{missing}", "--output", "{tmp}/m"], "No manifest.json under {missing}"),
    (["evaluate", "--model", "{missing}", "--data", "{missing}"], "model folder {missing}"),
])
def test_a_missing_folder_is_named(capsys, tmp_path, argv, needle):
    fill = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    code, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    assert code == 1
    assert_one_error_line(err, needle.format(**fill))
    assert not (tmp_path / "dl" / "manifest.json").exists()  # no silent "0 bins" download


def test_evaluate_names_a_missing_model_folder(capsys, tmp_path, synthetic_split):
    code, err = run_cli(capsys, "evaluate", "--model", str(tmp_path / "no-model"), "--data", synthetic_split)
    assert code == 1
    assert_one_error_line(err, str(tmp_path / "no-model"), "bincounter train --output")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_download_folder_where_a_split_is_expected_says_so(capsys, tmp_path, synthetic_abid, command):
    dl = tmp_path / "dl"
    (dl).mkdir()
    (dl / "manifest.json").write_text(json.dumps({"summary": {}, "records": [], "skipped": []}))
    model = tmp_path / "model"
    if command == "evaluate":  # a model folder that loads, so the data is what fails
        _write_model(model)
        argv = ["evaluate", "--model", str(model), "--data", str(dl)]
    else:
        argv = ["train", "--data", str(dl), "--output", str(model)]
    code, err = run_cli(capsys, *argv)
    assert code == 1
    assert_one_error_line(err, f"{dl} is a download folder, not a split", "bincounter split")


def _write_model(folder: Path):
    from bincounter import model as model_lib

    net = model_lib.build_model("resnet18", 3)
    model_lib.save_model_dir(net, model_lib.ModelConfig(arch="resnet18", max_count=2, input_size=64), str(folder))


# ---------------------------------------------------------------- S3: buckets and credentials

@pytest.mark.parametrize("argv", [
    ["synth", "--output", "s3://{bucket}/bins", "--images", "2"],
    ["download", "--source", "s3://{bucket}", "--output", "{tmp}/dl", "--auth", "signed"],
    ["split", "s3://{bucket}/abid", "--output", "{tmp}/split"],
    ["download", "--source", "{tmp}", "--output", "s3://{bucket}/abid"],
])
def test_a_missing_bucket_is_named(capsys, tmp_path, s3_endpoint, argv):
    bucket = "no-such-bucket-for-bincounter"
    code, err = run_cli(capsys, *[a.format(bucket=bucket, tmp=tmp_path) for a in argv])
    assert code == 1
    assert_one_error_line(err, f"bucket {bucket}", "does not exist")


def test_no_credentials_says_how_to_provide_them(capsys, tmp_path, monkeypatch):
    from bincounter import storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: signing fails first
    storage.s3_client.cache_clear()
    try:
        code, err = run_cli(capsys, "synth", "--output", "s3://some-bucket/bins", "--images", "2")
    finally:
        storage.s3_client.cache_clear()
    assert code == 1
    assert_one_error_line(err, "no S3 credentials", "AWS_ACCESS_KEY_ID")


# ---------------------------------------------------------------- invalid numbers: usage errors, exit 2

@pytest.mark.parametrize("argv, needle", [
    (["split", "{tmp}", "--output", "{tmp}/s", "--val", "0.9", "--test", "0.9"], "val + test < 1"),
    (["split", "{tmp}", "--output", "{tmp}/s", "--val", "1.5"], "argument --val: must be in [0, 1)"),
    (["train", "--data", "{tmp}", "--output", "{tmp}/m", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "--data", "{tmp}", "--output", "{tmp}/m", "--batch-size", "0"], "argument --batch-size"),
    (["train", "--data", "{tmp}", "--output", "{tmp}/m", "--shuffle-buffer", "-1"], "argument --shuffle-buffer"),
    (["train", "--data", "{tmp}", "--output", "{tmp}/m", "--epoch", "3"], "unrecognized arguments: --epoch"),
    (["evaluate", "--model", "{tmp}", "--data", "{tmp}", "--batch-size", "0"], "argument --batch-size"),
    (["serve", "--model", "{tmp}", "--port", "99999"], "argument --port: must be a TCP port"),
    (["serve", "--model", "{tmp}", "--max-batch-size", "0"], "argument --max-batch-size"),
    (["serve", "--model", "{tmp}", "--max-image-pixels", "-5"], "argument --max-image-pixels"),
    (["synth", "--output", "{tmp}", "--images", "many"], "expected an integer, got 'many'"),
])
def test_invalid_numbers_are_usage_errors(capsys, tmp_path, argv, needle):
    code, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert_one_error_line(err, needle)
    assert len(err.strip().splitlines()) == 1  # no usage block


def test_extra_train_args_are_checked_by_the_same_rules():
    from bincounter.engines import check_train_args

    with pytest.raises(ValueError, match="--epoch"):
        check_train_args(["--epoch", "3"])  # no abbreviation of --epochs
    with pytest.raises(ValueError, match="--shuffle-buffer"):
        check_train_args(["--shuffle-buffer", "-1"])


def test_submit_checks_extra_train_args_before_contacting_the_server(capsys, closed_port):
    code, err = run_cli(capsys, "submit", "--host", f"http://127.0.0.1:{closed_port}",
                        "--param", 'extra_train_args=["--epoch", "3"]')
    assert code == 2
    assert_one_error_line(err, "extra_train_args", "--epoch")


# ---------------------------------------------------------------- corrupt files are named

def test_a_corrupt_model_file_is_named(capsys, tmp_path, synthetic_split):
    model = tmp_path / "model"
    _write_model(model)
    (model / "model.pt").write_bytes(b"not a zip archive")
    code, err = run_cli(capsys, "evaluate", "--model", str(model), "--data", synthetic_split)
    assert code == 1
    assert_one_error_line(err, f"cannot read model weights {model / 'model.pt'}")


def test_a_corrupt_shard_is_named(tmp_path, synthetic_split):
    import shutil

    from bincounter.data import shards

    copy = tmp_path / "split"
    shutil.copytree(synthetic_split, copy)
    victim = shards.shard_uris(str(copy), "test")[0]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) // 3] + b"\x00garbage" * 100)
    with pytest.raises(errors.UserError, match=f"cannot read shard {victim}"):
        list(shards.iter_shard(victim))


def test_a_corrupt_checkpoint_is_named(tmp_path):
    from bincounter.train import TrainConfig, load_checkpoint

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x80\x04truncated")
    with pytest.raises(errors.UserError, match=f"cannot read checkpoint {bad}"):
        load_checkpoint(str(bad), TrainConfig(data="d", output="o"))


# ---------------------------------------------------------------- checks before the expensive work

def test_an_unwritable_checkpoint_dir_fails_before_the_first_epoch(capsys, tmp_path, synthetic_split):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    t0 = time.monotonic()
    code, err = run_cli(capsys, "train", "--data", synthetic_split, "--output", str(tmp_path / "m"),
                        "--epochs", "2", "--warmup-epochs", "0", "--checkpoint-dir", str(blocker / "ckpt"))
    assert code == 1
    assert_one_error_line(err, f"--checkpoint-dir {blocker / 'ckpt'} is not writable")
    assert not (tmp_path / "m").exists()


def test_download_checks_its_destination_before_fetching(capsys, tmp_path, synthetic_abid):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(capsys, "download", "--source", synthetic_abid, "--output", str(blocker / "dl"),
                        "--no-progress")
    assert code == 1
    assert_one_error_line(err, f"--output {blocker / 'dl'} is not writable")


def test_split_refuses_an_empty_val_set(capsys, tmp_path, synthetic_abid):
    code, err = run_cli(capsys, "split", synthetic_abid, "--output", str(tmp_path / "s"), "--val", "0")
    assert code == 1
    assert_one_error_line(err, "val split would be empty")
    assert not (tmp_path / "s").exists()


def test_serve_checks_the_port_before_loading_the_model(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = run_cli(capsys, "serve", "--model", str(tmp_path / "not-loaded"), "--port", str(port))
    assert code == 1
    assert_one_error_line(err, f"--port {port} is not free")  # not the missing model: checked first


# ---------------------------------------------------------------- clusters and Pipelines hosts

def test_no_kubeconfig(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, err = run_cli(capsys, "k8s", "train", "--data", "s3://b/split", "--output", "s3://b/model")
    assert code == 1
    assert_one_error_line(err, "no usable Kubernetes configuration", "--kubeconfig")


def _kubeconfig(tmp_path: Path, port: int) -> str:
    import yaml

    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}]}))
    return str(path)


def test_a_refused_cluster_connection_names_the_host(capsys, tmp_path, closed_port):
    code, err = run_cli(capsys, "k8s", "train", "--data", "s3://b/split", "--output", "s3://b/model",
                        "--kubeconfig", _kubeconfig(tmp_path, closed_port), "--namespace", "team-a")
    assert code == 1
    assert_one_error_line(err, f"127.0.0.1:{closed_port}", "connection refused")


def test_a_refused_pipelines_host_is_named(capsys, tmp_path, closed_port, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    code, err = run_cli(capsys, "submit", "--host", f"http://127.0.0.1:{closed_port}", "--namespace", "team-a")
    assert code == 1
    assert_one_error_line(err, f"127.0.0.1:{closed_port}", "connection refused")


@pytest.mark.parametrize("command", ["k8s", "submit"])
def test_a_host_that_never_answers_times_out_and_is_named(capsys, tmp_path, silent_server, monkeypatch, command):
    monkeypatch.setenv(errors.TIMEOUT_ENV, "0.3")
    monkeypatch.setenv("HOME", str(tmp_path))
    if command == "k8s":
        argv = ["k8s", "train", "--data", "s3://b/split", "--output", "s3://b/model",
                "--kubeconfig", _kubeconfig(tmp_path, silent_server), "--namespace", "team-a"]
    else:
        argv = ["submit", "--host", f"http://127.0.0.1:{silent_server}", "--namespace", "team-a"]
    t0 = time.monotonic()
    code, err = run_cli(capsys, *argv)
    assert time.monotonic() - t0 < 30  # 0.3 s per attempt, a few retries; never forever
    assert code == 1
    assert_one_error_line(err, f"127.0.0.1:{silent_server}", "did not answer in time")


# ---------------------------------------------------------------- the framework itself

def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, "0")  # --debug sets it (for child processes): undone after the test
    code, err = run_cli(capsys, "--debug", "split", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert code == 1 and "Traceback" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("bincounter ")


def test_help_has_no_rst_markup_and_serve_lists_its_own_flags_first(capsys):
    for command in cli.SUBCOMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out, command
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    ours, kserve = out.index("--max-batch-size"), out.index("KServe model server flags")
    assert ours < kserve < out.index("--enable_grpc", kserve)


def test_an_unexpected_error_says_it_may_be_a_bug():
    class Odd(Exception):
        pass

    assert errors.explain(Odd("x")) is None
    assert errors.describe(Odd("x")) == "Odd: x"
    assert errors.describe(KeyError("epochs")) == "KeyError: 'epochs'"
