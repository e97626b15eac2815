"""``bincounter runs``: what pipeline runs left in the working store, without the Kubeflow UI.

    bincounter runs list --work-uri s3://team-a-bins
    bincounter runs show RUN --work-uri s3://team-a-bins

Every run writes under ``{work_uri}/runs/{run_id}/``: ``split.json`` (which split it
used, under ``{work_uri}/splits/``: manifest, class distribution and samples plots),
``tune/tuning.json`` (every trial), ``model/`` (the model folder, ``metrics.json`` per
epoch, ``tensorboard/``), ``evaluation/`` (``report.md``, ``metrics.json``, confusion
matrix, training curves, predictions, mistakes) and ``succeeded/`` (below; the deploy
marker records the endpoint). Demo runs
(``make demo``) and cluster runs have the same layout; ``--work-uri`` is the pipeline's
``work_uri`` parameter (a local folder or ``s3://`` prefix).

Success markers: how a pipeline run tells its exit handler that it succeeded.

The exit handler (``components/cleanup.py``) deletes what a failed or cancelled run
left behind, so it must know how the run ended. KFP can pass that as
``dsl.PipelineTaskFinalStatus``, but KFP backend 2.5.0 (Kubeflow 1.10.2) refuses to
compile any task with that input: kubeflow/pipelines
``backend/src/v2/compiler/argocompiler/dag.go`` at 2.5.0, ``addImplicitDependencies``,
returns "task final status not supported yet" for a ``taskFinalStatus`` parameter
(the exit-hook compiler that accepts it arrived in 2.14). One ``pipeline.yaml`` must
run on 2.5.0 and 2.15.0 (Kubeflow 1.11.0), so the run records its own outcome instead:
each final step writes ``{work_uri}/runs/{run_id}/succeeded/{step}.json`` as its
last act, and the exit handler reads the markers. All present: the run succeeded.
One missing: a step failed or the run was cancelled before it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Any

from bincounter import storage
from bincounter.errors import UserError

STAGES = ("split", "tune", "model", "evaluation", "deploy")
FINAL_STEPS = ("evaluate", "deploy")  # the steps that write success markers (components/cleanup.py)
MARKER_FOLDER = "succeeded"


def _check_run_id(run_id: str) -> str:
    # The run id names a folder in the working store: nothing that could climb out of it.
    if not re.fullmatch(r"[\w.-]+", run_id or "") or set(run_id) == {"."}:
        raise ValueError(f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only.")
    return run_id


def marker_uri(work_uri: str, run_id: str, step: str) -> str:
    return storage.join(work_uri, "runs", _check_run_id(run_id), MARKER_FOLDER, f"{step}.json")


def mark_succeeded(work_uri: str, run_id: str, step: str, **details) -> str:
    """Record that ``step`` of ``run_id`` finished; call it as the step's last act. Returns the marker's URI."""
    uri = marker_uri(work_uri, run_id, step)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes(uri, json.dumps({"run_id": run_id, "step": step, "finished": finished,
                                         **details}, indent=2).encode())
    return uri


def missing_markers(work_uri: str, run_id: str, steps: list[str] | tuple[str, ...]) -> list[str]:
    """The steps of ``steps`` that have not recorded success for ``run_id`` (empty: the run succeeded)."""
    return [step for step in steps if not storage.exists(marker_uri(work_uri, run_id, step))]


def run_dir(work_uri: str, run_id: str) -> str:
    return storage.join(work_uri, "runs", _check_run_id(run_id))


def _json(uri: str) -> dict | None:
    return storage.read_json(uri, what="run record") if storage.exists(uri) else None


def _stages(work_uri: str, run_id: str) -> tuple[list[str], str | None]:
    """The stages a run reached, and its split folder (shared splits are named by ``split.json``)."""
    root = run_dir(work_uri, run_id)
    present = set(storage.list_dirs(root))
    pointer = _json(storage.join(root, "split.json"))
    split = pointer["uri"] if pointer else (storage.join(root, "split") if "split" in present else None)
    if split:
        present.add("split")
    if storage.exists(marker_uri(work_uri, run_id, "deploy")):
        present.add("deploy")
    return [s for s in STAGES if s in present], split


def list_runs(work_uri: str) -> list[dict[str, Any]]:
    """One row per run folder: its id, the stages it reached, and the test accuracy if it was evaluated."""
    runs_root = storage.join(work_uri, "runs")
    if not storage.is_s3(work_uri):
        storage.check_folder(work_uri, what="--work-uri")
    rows = []
    for run_id in storage.list_dirs(runs_root):
        stages, _ = _stages(work_uri, run_id)
        metrics = _json(storage.join(run_dir(work_uri, run_id), "evaluation", "metrics.json")) or {}
        rows.append({"run": run_id, "stages": stages,
                     "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1")})
    return rows


def show_run(work_uri: str, run_id: str) -> dict[str, Any]:
    """Everything a run left: the report, the test metrics, the plots, the tuning trials, where the model is."""
    root = run_dir(work_uri, run_id)
    present, split = _stages(work_uri, run_id)
    if not present:
        known = [r["run"] for r in list_runs(work_uri)]
        raise UserError(f"no run {run_id!r} under {storage.join(work_uri, 'runs')}"
                        + (f"; runs there: {', '.join(known[-10:])}" if known else "; it holds no runs"))
    report_uri = storage.join(root, "evaluation", "report.md")
    tuning = _json(storage.join(root, "tune", "tuning.json")) or {}
    folders = [f for f in (split, storage.join(root, "evaluation") if "evaluation" in present else None) if f]
    plots = sorted(storage.join(folder, name) for folder in folders
                   for name, _ in storage.list_files(folder) if name.endswith(".png") and "/" not in name)
    model = storage.join(root, "model")
    return {
        "run": run_id, "dir": root, "stages": present, "split_uri": split,
        "report": storage.read_bytes(report_uri).decode() if storage.exists(report_uri) else None,
        "report_uri": report_uri if storage.exists(report_uri) else None,
        "test_metrics": _json(storage.join(root, "evaluation", "metrics.json")),
        "training": (_json(storage.join(model, "metrics.json")) or {}).get("final"),
        "trials": tuning.get("trials", []), "best_params": tuning.get("best_params"),
        "model_uri": model if "model" in present else None,
        "tensorboard": storage.join(model, "tensorboard") if "model" in present else None,
        "plots": plots,
        "deployment": _json(marker_uri(work_uri, run_id, "deploy")),
    }


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def print_list(rows: list[dict[str, Any]], work_uri: str) -> None:
    if not rows:
        print(f"no runs under {storage.join(work_uri, 'runs')}")
        return
    width = max(len(r["run"]) for r in rows)
    stages = max(len("stages"), *(len(",".join(r["stages"])) for r in rows))
    print(f"{'run':<{width}}  {'stages':<{stages}}  accuracy  macro-F1")
    for r in rows:
        print(f"{r['run']:<{width}}  {','.join(r['stages']):<{stages}}  {_fmt(r['accuracy']):>8}  "
              f"{_fmt(r['macro_f1']):>8}")


def print_show(info: dict[str, Any]) -> None:
    print(f"run {info['run']}: {info['dir']}")
    print(f"  stages reached: {', '.join(info['stages']) or 'none'}")
    if info["split_uri"]:
        print(f"  split:          {info['split_uri']}  (start a run from it: --param split_uri=...)")
    if info["model_uri"]:
        print(f"  model:          {info['model_uri']}")
        print(f"  TensorBoard:    tensorboard --logdir {info['tensorboard']}")
    if info["deployment"]:
        print(f"  endpoint:       {info['deployment']['endpoint']} ({info['deployment']['engine']})")
    for uri in info["plots"]:
        print(f"  plot:           {uri}")
    if info["trials"]:
        names = sorted({k for t in info["trials"] for k in (t.get("params") or {})})
        print(f"\n  {len(info['trials'])} tuning trials (objective: val-accuracy):")
        print("  " + "  ".join(["trial".ljust(12), "state".ljust(9), "value".rjust(7), *names]))
        for t in info["trials"]:
            params = t.get("params") or {}
            print("  " + "  ".join([str(t.get("name", t.get("number", ""))).ljust(12), str(t.get("state", "")).ljust(9),
                                    _fmt(t.get("value")).rjust(7), *[_fmt(params.get(n)) for n in names]]))
    if info["report"]:
        print(f"\n--- {info['report_uri']} ---\n")
        print(info["report"])
    elif info["test_metrics"] is None:
        print("\n  not evaluated yet (no evaluation/report.md)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_ in (("list", "list the runs in the working store"), ("show", "show one run")):
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "show":
            p.add_argument("run", help="run id (the folder name under WORK_URI/runs; `bincounter runs list`)")
        p.add_argument("--work-uri", default="demo-output/work",
                       help="the working store: the pipeline's work_uri (local folder or s3:// prefix)")
        p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS config)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(args: argparse.Namespace) -> int:
    import os

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
        storage.s3_client.cache_clear()
    if args.action == "list":
        rows = list_runs(args.work_uri)
        print(json.dumps(rows, indent=2)) if args.json else print_list(rows, args.work_uri)
    else:
        info = show_run(args.work_uri, args.run)
        print(json.dumps(info, indent=2)) if args.json else print_show(info)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
