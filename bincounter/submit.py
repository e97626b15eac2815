"""``bincounter submit``: upload the compiled pipeline to Kubeflow Pipelines and start a run.

    bincounter submit --host https://kubeflow.example.com/pipeline --namespace team-a \\
        --param epochs=30 --param work_uri=s3://team-a-bins --param deploy_model=false

The pipeline file is ``pipeline.yaml`` (``python pipeline.py`` writes it). Each
``--param name=value`` is checked against that file's parameters and converted
to its type (``list``/``dict`` values as JSON); an unknown name is an error that
lists the valid ones. Authentication is a bearer token: ``--token``, else
``$KF_PIPELINES_TOKEN``, else the projected service-account token that Kubeflow
mounts into notebooks and pipeline pods (``$KF_PIPELINES_SA_TOKEN_PATH``, default
``/var/run/secrets/kubeflow/pipelines/token``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bincounter.errors import UsageError, UserError

DEFAULT_PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipeline.yaml"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
PIPELINE_NAME = "bincounter"


def pipeline_parameters(pipeline_file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"type": "NUMBER_INTEGER", "default": 20}}`` for the root parameters of a compiled pipeline."""
    import yaml

    path = Path(pipeline_file)
    if not path.is_file():
        raise FileNotFoundError(f"Pipeline file not found: {path}. Run `python pipeline.py` in the repository "
                                "to compile it, or pass --pipeline-file.")
    spec = next(yaml.safe_load_all(path.read_text()))
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: {"type": p["parameterType"], "default": p.get("defaultValue")} for name, p in params.items()}


def _convert(name: str, value: str, type_: str) -> Any:
    try:
        if type_ == "NUMBER_INTEGER":
            return int(value)
        if type_ == "NUMBER_DOUBLE":
            return float(value)
        if type_ == "BOOLEAN":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if type_ in ("LIST", "STRUCT"):
            parsed = json.loads(value)
            expected = list if type_ == "LIST" else dict
            if not isinstance(parsed, expected):
                raise ValueError(f"expected a JSON {'list' if type_ == 'LIST' else 'object'}")
            return parsed
        return value
    except ValueError as e:
        raise ValueError(f"Invalid value {value!r} for parameter {name} ({type_}): {e}") from None


def parse_params(pairs: list[str], parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``["epochs=30", ...]`` -> ``{"epochs": 30}``, typed as the pipeline declares; unknown names raise."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"Invalid --param {pair!r}: expected NAME=VALUE")
        if name not in parameters:
            raise ValueError(f"Unknown pipeline parameter {name!r}. Valid parameters: {', '.join(sorted(parameters))}")
        out[name] = _convert(name, value, parameters[name]["type"])
    if "engine" in out:  # checked here too: a typo should not cost a cluster run that fails at its third step
        from bincounter.engines import check_engine

        check_engine(out["engine"])
    if out.get("extra_train_args"):  # else a typo fails the run hours later, after download and split
        from bincounter.engines import check_train_args

        try:
            check_train_args([str(a) for a in out["extra_train_args"]])
        except ValueError as e:
            raise UsageError(f"Invalid --param extra_train_args: {e}") from None
    return out


def resolve_token(token: str | None) -> str | None:
    """The bearer token: explicit, else $KF_PIPELINES_TOKEN, else the in-cluster service-account token file."""
    if token:
        return token
    if os.environ.get("KF_PIPELINES_TOKEN"):
        return os.environ["KF_PIPELINES_TOKEN"]
    path = Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", SA_TOKEN_PATH))
    if path.is_file():
        return path.read_text().strip() or None
    return None


def make_client(host: str, token: str | None = None, namespace: str | None = None):
    """A ``kfp.Client`` whose every request has a connect and a read timeout.

    kfp.Client builds its ``kfp_server_api.ApiClient`` inside ``__init__`` (and calls the
    healthz endpoint there), with no way to pass a timeout: the generated client then
    waits forever on a host that accepts and never answers. So the class it builds is
    swapped for one with timeouts while the client is made.
    """
    import kfp
    import kfp_server_api

    from bincounter import errors

    original = kfp_server_api.ApiClient
    kfp_server_api.ApiClient = errors.with_timeouts(original)
    try:  # kfp.Client's own namespace default is "kubeflow": pass ours only when given
        return kfp.Client(host=host, existing_token=token, **({"namespace": namespace} if namespace else {}))
    finally:
        kfp_server_api.ApiClient = original


def submit(*, host: str, pipeline_file: str | os.PathLike = DEFAULT_PIPELINE_FILE, params: dict[str, Any],
           namespace: str | None = None, experiment: str = "bincounter", run_name: str | None = None,
           token: str | None = None, service_account: str | None = None, pipeline_name: str = PIPELINE_NAME,
           client=None) -> dict[str, str]:
    """Upload ``pipeline_file`` (a new version of ``pipeline_name`` when it exists) and start a run.

    Returns the ids of the pipeline, version, experiment and run, and the run's URL.
    """
    if client is None:
        client = make_client(host, token, namespace)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(pipeline_file), pipeline_name=pipeline_name,
                                          description="bincounter: count items in warehouse bin photos",
                                          namespace=None)
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
        version_id = versions[0].pipeline_version_id
    else:
        version = client.upload_pipeline_version(str(pipeline_file), pipeline_version_name=f"{pipeline_name}-{stamp}",
                                                 pipeline_id=pipeline_id)
        version_id = version.pipeline_version_id
    exp = client.create_experiment(experiment, namespace=namespace)
    run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name or f"{pipeline_name}-{stamp}",
                              pipeline_id=pipeline_id, version_id=version_id, params=params,
                              service_account=service_account)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": exp.experiment_id,
            "run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


# Run states of the KFP v2beta1 API (kfp_server_api.V2beta1RuntimeState: PENDING, RUNNING,
# SUCCEEDED, SKIPPED, FAILED, CANCELING, CANCELED, PAUSED). CANCELED is final too, which
# kfp.Client.wait_for_run_completion misses (kubeflow/pipelines#14473); COMPLETE is how a
# finished run reads on the backends we support (docs/pipeline.md), taken as success as well.
SUCCEEDED_STATES = {"SUCCEEDED", "COMPLETE", "COMPLETED", "SKIPPED"}
FAILED_STATES = {"FAILED", "ERROR"}
CANCELED_STATES = {"CANCELED", "CANCELLED"}
FINAL_STATES = SUCCEEDED_STATES | FAILED_STATES | CANCELED_STATES


def _state(obj) -> str:
    state = getattr(obj, "state", None)
    return str(getattr(state, "value", state) or "PENDING").upper()


def _tasks(run) -> list:
    details = getattr(run, "run_details", None)
    return list(getattr(details, "task_details", None) or [])


def _error_message(obj) -> str:
    error = getattr(obj, "error", None)
    return (getattr(error, "message", None) or "").strip()


def wait_for_run(client, run_id: str, *, poll_s: float = 15.0, timeout_s: float | None = None,
                 echo=print, clock=time.monotonic, sleep=time.sleep):
    """Poll the run until it reaches a final state, echoing each step's state as it changes.

    Returns the final run object. A deadline (``timeout_s``) raises ``UserError``; the run
    itself goes on (this only stops watching it).
    """
    seen: dict[str, str] = {}
    start = clock()
    while True:
        run = client.get_run(run_id)
        for task in _tasks(run):
            name, state = getattr(task, "display_name", None) or "?", _state(task)
            if seen.get(name) != state:
                seen[name] = state
                echo(f"{datetime.datetime.now().strftime('%H:%M:%S')}  {name:<28} {state}")
        state = _state(run)
        if state in FINAL_STATES:
            return run
        if timeout_s is not None and clock() - start > timeout_s:
            raise UserError(f"run {run_id} is still {state} after {timeout_s:.0f} s (--wait-timeout); it goes on: "
                            f"`bincounter submit` does not stop it")
        sleep(poll_s)


def failure_message(run) -> str:
    """The failing steps and their messages, else the run's own error."""
    failed = [t for t in _tasks(run) if _state(t) in FAILED_STATES]
    # The innermost failed step names the cause; DAG tasks (root, the exit-handler group) fail with it.
    steps = [f"step {getattr(t, 'display_name', '?')} failed" + (f": {_error_message(t)}" if _error_message(t) else "")
             for t in failed if getattr(t, "display_name", "") not in ("root", "")]
    return "; ".join(steps[:3]) or _error_message(run) or "no message from the backend"


def print_outcome(run, *, work_uri: str, echo=print) -> None:
    """After a successful run: the report, the model URI and the endpoint, read from the working store."""
    from bincounter import runs

    try:
        info = runs.show_run(work_uri, run.run_id)
    except Exception as e:  # noqa: BLE001 - the run succeeded; say why its record cannot be read
        echo(f"(cannot read the run's record in {work_uri}: {e})")
        return
    if info["report"]:
        echo(info["report"])
    echo(f"model: {info['model_uri'] or 'not written'}")
    deployment = info.get("deployment") or {}
    echo(f"endpoint: {deployment.get('endpoint') or 'not deployed'}")
    echo(f"inspect later: bincounter runs show {run.run_id} --work-uri {work_uri}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", required=True,
                        help="Kubeflow Pipelines API URL, e.g. https://kubeflow.example.com/pipeline, or "
                             "http://ml-pipeline-ui.kubeflow inside the cluster")
    parser.add_argument("--namespace", default=None, help="Kubeflow profile namespace of the experiment and run")
    parser.add_argument("--experiment", default="bincounter", help="experiment to file the run under")
    parser.add_argument("--run-name", default=None, help="run name (default: bincounter-<UTC time>)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter; repeat for several; list/dict values as JSON")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: $KF_PIPELINES_TOKEN, then the in-cluster service-account token)")
    parser.add_argument("--service-account", default=None,
                        help="service account the run's pods use (default: the profile's default-editor)")
    parser.add_argument("--pipeline-file", default=str(DEFAULT_PIPELINE_FILE), help="compiled pipeline YAML")
    parser.add_argument("--pipeline-name", default=PIPELINE_NAME, help="name of the uploaded pipeline")
    parser.add_argument("--wait", action="store_true",
                        help="follow the run: print each step's state, then the report, model URI and endpoint; "
                             "exit 1 with the failing step's message if the run fails")
    parser.add_argument("--poll-interval", type=float, default=15.0, help="seconds between status checks (--wait)")
    parser.add_argument("--wait-timeout", type=float, default=None,
                        help="stop following after this many seconds (the run goes on)")
    return parser


def submit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The only place argparse meets ``submit``: checks every --param before anything is uploaded."""
    params = parse_params(args.param, pipeline_parameters(args.pipeline_file))
    return dict(host=args.host, pipeline_file=args.pipeline_file, params=params, namespace=args.namespace,
                experiment=args.experiment, run_name=args.run_name, token=resolve_token(args.token),
                service_account=args.service_account, pipeline_name=args.pipeline_name)


def main(args: argparse.Namespace) -> int:
    try:
        kwargs = submit_kwargs(args)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    client = make_client(kwargs["host"], kwargs["token"], kwargs["namespace"])
    result = submit(**kwargs, client=client)
    print(json.dumps(result, indent=2), flush=True)
    if not args.wait:
        return 0
    run = wait_for_run(client, result["run_id"], poll_s=args.poll_interval, timeout_s=args.wait_timeout,
                       echo=lambda line: print(line, flush=True))
    state = _state(run)
    if state in FAILED_STATES:
        raise UserError(f"run {result['run_id']} {state}: {failure_message(run)} ({result['url']})")
    if state in CANCELED_STATES:
        raise UserError(f"run {result['run_id']} was canceled ({result['url']})")
    work_uri = kwargs["params"].get("work_uri") or pipeline_parameters(args.pipeline_file)["work_uri"]["default"]
    print_outcome(run, work_uri=work_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
