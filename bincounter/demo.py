"""``make demo``: the whole bincounter pipeline on this machine, through ``kfp.local``.

1. start a local S3 endpoint (moto in server mode, a real S3 API on localhost);
2. write synthetic bins in the ABID layout into a bucket there (standing in for ``s3://aft-vbi-pds``);
   the working store (``work_uri``) is a folder on disk, ``demo-output/work``, kept after the demo;
3. run the compiled pipeline's own function (``pipeline.py``) with ``engine=local``:
   download -> split -> tune (optuna, short trials) -> train (torchrun, 2 processes)
   -> evaluate -> deploy (the KServe model server as a local process);
4. ask the served model to count a few bins, print a summary, stop the server and the endpoint.

The demo uses a SMALL configuration so that it finishes in minutes on 2 CPU
cores: ResNet18 from scratch, 64 px inputs, 600 synthetic images, 8 epochs,
2 one-epoch tuning trials. Production defaults (``pipeline.py``): ResNet50
from ImageNet weights, 384 px, the full ABID bucket, 30 epochs, 12 Katib trials,
2 GPU workers (printed at the end from ``pipeline.yaml``). Everything lands in ``./demo-output/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
SOURCE_BUCKET = "abid-demo-source"
WORK_BUCKET = "bincounter-demo-work"
STAGES = ("check", "download", "split", "tune", "train", "evaluate", "deploy", "cleanup")

# name -> (default, help): the demo's small configuration.
DEMO_DEFAULTS: dict[str, tuple[Any, str]] = {
    "images": (600, "synthetic bins to generate"),
    "max_count": (4, "K: bins hold 0..K items; classes are counts 0..K"),
    "seed": (0, "seed of the synthetic data and the split"),
    "short_side": (72, "split: resize images so the short side is this many px (production: 0, i.e. the input size)"),
    "arch": ("resnet18", "network (production: resnet50)"),
    "input_size": (64, "model input in px (production: 384; 64 is the trainer's minimum)"),
    "epochs": (8, "training epochs (production: 30)"),
    "processes": (2, "training processes under torchrun (the cluster's workers x GPUs)"),
    "tune_trials": (2, "optuna trials (production: 12 Katib trials)"),
    "tune_epochs": (1, "epochs per trial (production: 3)"),
    "predict_images": (4, "bins to count through the served model at the end"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """A moto S3 server on a free localhost port, with this process's AWS env pointed at it.

    Child processes (kfp.local's component processes, torchrun, the model server)
    inherit the environment, so every stage talks to this endpoint.
    """
    from moto.server import ThreadedMotoServer

    from bincounter import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
                      AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    storage.s3_client.cache_clear()
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.s3_client.cache_clear()


class _StageTimer(logging.Filter):
    """Times each pipeline task from kfp.local's own 'Executing task X' / 'Task X finished' log lines.

    A filter on the root logger, not a handler: kfp.local swaps the root logger's
    handlers while it runs, but keeps its filters.
    """

    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self):
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        self._record(record)
        return True

    def _record(self, record: logging.LogRecord) -> None:
        msg = self._ansi.sub("", record.getMessage())
        if m := re.match(r"Executing task '?([\w-]+)'?", msg):
            self.started[m.group(1)] = record.created
        elif (m := re.match(r"Task '?([\w-]+)'? finished", msg)) and m.group(1) in self.started:
            self.seconds[m.group(1)] = record.created - self.started[m.group(1)]


def task_outputs(run_dir: Path) -> dict[str, dict]:
    """``{task: executor_output}`` of a finished kfp.local run (the KFP executor-output JSON)."""
    out = {}
    for path in sorted(run_dir.glob("*/executor_output.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def production_defaults() -> str:
    """The pipeline's own defaults, read from the compiled pipeline.yaml (never a copy that drifts)."""
    from bincounter.submit import DEFAULT_PIPELINE_FILE, pipeline_parameters

    d = {name: p["default"] for name, p in pipeline_parameters(DEFAULT_PIPELINE_FILE).items()}
    weights = "ImageNet weights" if d["pretrained"] == "imagenet" else (d["pretrained"] or "scratch")
    return (f"Production defaults (pipeline.py): {d['arch']} from {weights}, {int(d['input_size'])} px, "
            f"the full ABID bucket, {int(d['epochs'])} epochs, {int(d['tune_trials'])} Katib trials, "
            f"{int(d['workers'])} workers x {int(d['gpus_per_worker'])} GPU.")


def run_local_pipeline(pipeline_root: str | Path, **params) -> tuple[Path, dict[str, dict], dict[str, float]]:
    """Run ``pipeline.py``'s pipeline through kfp.local in this environment, with ``params``.

    Components run as subprocesses of this Python (``use_venv=False``), so the
    installed ``bincounter`` is what they import, exactly as in the pipeline image.
    Returns the run's folder, each task's outputs and each task's wall time.
    """
    from kfp import local

    sys.path.insert(0, str(REPO))
    from pipeline import bincounter_pipeline

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    before = set(pipeline_root.iterdir())
    timer = _StageTimer()
    logging.getLogger().addFilter(timer)
    try:
        import warnings

        with warnings.catch_warnings():
            # kfp.local warns that the image name lacks "python"; it runs in this environment on purpose.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            bincounter_pipeline(**params)
    finally:
        logging.getLogger().removeFilter(timer)
    new = [p for p in pipeline_root.iterdir() if p not in before and p.is_dir()]
    if len(new) != 1:
        raise RuntimeError(f"Expected one new run folder under {pipeline_root}, found {new}")
    return new[0], task_outputs(new[0]), timer.seconds


def demo_params(s3_url: str, cfg: dict[str, Any], work_uri: str | None = None) -> dict[str, Any]:
    """Pipeline parameters for a local run reading the source bucket from the demo's S3 endpoint.

    ``work_uri`` is the working store (download, split, trials, model, evaluation); the demo
    keeps it on disk, so that everything the run reports still exists after the demo exits.
    """
    return dict(
        engine="local", work_uri=work_uri or f"s3://{WORK_BUCKET}", s3_endpoint_url=s3_url,
        source=f"s3://{SOURCE_BUCKET}", source_endpoint_url=s3_url, source_auth="signed",
        download_concurrency=8, max_count=cfg["max_count"], split_seed=cfg["seed"], short_side=cfg["short_side"],
        arch=cfg["arch"], pretrained="", input_size=cfg["input_size"], epochs=cfg["epochs"],
        # No DataLoader worker processes: the images are tiny and 2 cores are shared by 2 ranks.
        # Half an epoch of warmup: one-epoch tuning trials warm up for half of it.
        # A fixed peak lr, higher than the recipe's (a tiny network from scratch at global batch 64);
        # it overrides the tuned --base-lr, so the demo's trials tune the other searched flags.
        extra_train_args=["--loader-workers", "0", "--warmup-epochs", "0.5", "--lr", "2e-3"],
        workers=cfg["processes"], gpus_per_worker=0, tune_trials=cfg["tune_trials"], tune_parallelism=1,
        tune_max_failed_trials=1, tune_epochs=cfg["tune_epochs"], tune_gpus_per_trial=0,
        deploy_model=True, smoke_images=2, spot=False,
    )


def run_demo(output: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from bincounter import storage
    from bincounter.data.shards import read_manifest
    from bincounter.data.split import summary_text as split_summary_text
    from bincounter.data.synth import synthesize
    from bincounter.engines import local as local_engine
    from bincounter.serving import client

    output.mkdir(parents=True, exist_ok=True)
    os.environ["BINCOUNTER_STATE_DIR"] = str(output / "state")
    t0 = time.monotonic()
    with local_s3() as s3_url:
        storage.s3_client().create_bucket(Bucket=SOURCE_BUCKET)
        t = time.monotonic()
        synthesize(f"s3://{SOURCE_BUCKET}", images=cfg["images"], max_count=cfg["max_count"], seed=cfg["seed"])
        synth_seconds = time.monotonic() - t
        print(f"[demo] {cfg['images']} synthetic bins in s3://{SOURCE_BUCKET} at {s3_url} ({synth_seconds:.1f} s)",
              flush=True)

        work_uri = str((output / "work").resolve())
        # audit_test: the run ends with an audit of its test split, with injected discrepancies.
        run_dir, outputs, seconds = run_local_pipeline(output / "pipeline-root", **demo_params(s3_url, cfg, work_uri),
                                                       audit_test=True)
        split_uri = outputs["split"]["artifacts"]["shards"]["artifacts"][0]["metadata"]["uri"]
        split_table = split_summary_text(read_manifest(split_uri))
        deployed = outputs["deploy"]["parameterValues"]
        try:
            # Count a few bins from the source bucket through the served model, as a client would.
            ids = sorted(name[:-5] for name, _ in storage.list_files(f"s3://{SOURCE_BUCKET}/metadata"))
            ids = ids[:: max(1, len(ids) // cfg["predict_images"])][: cfg["predict_images"]]
            jpegs = [storage.read_bytes(f"s3://{SOURCE_BUCKET}/bin-images/{i}.jpg") for i in ids]
            truth = [json.loads(storage.read_bytes(f"s3://{SOURCE_BUCKET}/metadata/{i}.json"))["EXPECTED_QUANTITY"]
                     for i in ids]
            predictions = client.predict(jpegs, url=deployed["endpoint"], names=ids)
        finally:
            local_engine.stop_server(deployed["handle"])

    metrics = outputs["evaluate"]["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    model_uri = outputs["train"]["artifacts"]["model"]["artifacts"][0]["metadata"]["uri"]  # {work}/runs/{id}/model
    report = Path(model_uri).parent / "evaluation" / "report.md"  # kept with the run in the working store
    summary = {
        "seconds": {"synthesize": round(synth_seconds, 1), **{k: round(v, 1) for k, v in seconds.items()},
                    "total": round(time.monotonic() - t0, 1)},
        "split": split_table, "split_uri": split_uri,
        "best_params": outputs["tune"]["parameterValues"]["best_params"],
        "test_metrics": {k: v for k, v in metrics.items() if k != "seconds"},
        "endpoint": deployed["endpoint"],
        "predictions": [{"id": p.image, "count": p.count, "confidence": round(p.confidence, 3), "true_count": c}
                        for p, c in zip(predictions, truth)],
        "report": str(report), "run_dir": str(run_dir), "summary": str(output / "summary.json"),
        "work_uri": work_uri, "run_id": Path(model_uri).parent.name, "model_uri": model_uri,
        "audit": dict(outputs["audit-test-split"]["artifacts"]["metrics"]["artifacts"][0]["metadata"]),
        "audit_report": outputs["audit-test-split"]["artifacts"]["report"]["artifacts"][0]["uri"],
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict[str, Any], cfg: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    print("bincounter demo: the whole pipeline through kfp.local (engine=local)")
    print(f"SMALL demo config: {cfg['arch']} from scratch, {cfg['input_size']} px, {cfg['images']} synthetic bins "
          f"(0..{cfg['max_count']} items), {cfg['epochs']} epochs on {cfg['processes']} processes, "
          f"{cfg['tune_trials']} tuning trials of {cfg['tune_epochs']} epochs.")
    print(production_defaults())
    print("\nTime per stage (s):")
    for stage, s in summary["seconds"].items():
        print(f"  {stage:<10} {s:>7.1f}")
    print(f"\nSplit ({summary['split_uri']}):\n" + summary["split"])
    print(f"\nBest hyperparameters: {json.dumps(summary['best_params'])}")
    m = summary["test_metrics"]
    from bincounter.report import METRIC_NAMES

    print("Test metrics: " + "  ".join(f"{METRIC_NAMES.get(k, k)} {v:.3f}" if isinstance(v, float)
                                       else f"{METRIC_NAMES.get(k, k)} {v}" for k, v in m.items()))
    print(f"\nServed at {summary['endpoint']} (stopped now). Predictions:")
    for p in summary["predictions"]:
        print(f"  bin {p['id']}: counted {p['count']} (confidence {p['confidence']:.2f}), true {p['true_count']}")
    a = summary["audit"]
    print(f"\nAudit of the test split with injected discrepancies: {a['flagged']:.0f} of {a['bins']:.0f} bins flagged "
          f"(p_expected < {a['threshold']:.2g}); precision={a.get('precision', 0):.3f} "
          f"recall={a.get('recall', 0):.3f} f1={a.get('f1', 0):.3f} auroc={a.get('auroc', 0):.3f}")
    print(f"Audit report: {summary['audit_report']}")
    print(f"\nRun report: {summary['report']}")
    print(f"Model: {summary['model_uri']}  (serve it again: bincounter serve --model {summary['model_uri']})")
    print(f"TensorBoard: tensorboard --logdir {summary['model_uri']}/tensorboard")
    print(f"Inspect the run: bincounter runs show {summary['run_id']} --work-uri {summary['work_uri']}")
    print(f"Every task's outputs: {summary['run_dir']}; this summary: {summary['summary']}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="demo-output", help="folder for everything the demo writes")
    for name, (default, help_) in DEMO_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=help_)
    return parser


def main(args: argparse.Namespace) -> int:
    cfg = {name: getattr(args, name) for name in DEMO_DEFAULTS}
    summary = run_demo(Path(args.output), cfg)
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
