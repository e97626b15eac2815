"""The whole pipeline through kfp.local with engine=local, on tiny synthetic data in a real S3 endpoint.

One run from download to a served prediction (the same function ``make demo``
runs, with a smaller configuration), and one run that fails early so the exit
handler runs with a failed status.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from bincounter import runs, search_space, storage
from bincounter.data.synth import synthesize
from bincounter.demo import demo_params, run_local_pipeline
from bincounter.engines import local as local_engine
from bincounter.serving import client

pytestmark = pytest.mark.slow

TINY = dict(images=80, max_count=3, seed=1, short_side=72, arch="resnet18", input_size=64, epochs=1,
            processes=2, tune_trials=1, tune_epochs=1)


@pytest.fixture
def buckets(s3_endpoint):
    names = {"source": f"src-{uuid.uuid4().hex[:8]}", "work": f"work-{uuid.uuid4().hex[:8]}"}
    for name in names.values():
        storage.s3_client().create_bucket(Bucket=name)
    return names


def _params(s3_endpoint: str, buckets: dict, **over) -> dict:
    params = demo_params(s3_endpoint, TINY)
    params.update(work_uri=f"s3://{buckets['work']}", source=f"s3://{buckets['source']}",
                  # one epoch: no warmup (the trainer needs warmup < epochs)
                  extra_train_args=["--workers", "0", "--warmup-epochs", "0"])
    params.update(over)
    return params


def test_whole_pipeline_locally_from_download_to_a_served_prediction(s3_endpoint, buckets, tmp_path, monkeypatch):
    monkeypatch.setenv("BINCOUNTER_STATE_DIR", str(tmp_path / "state"))
    synthesize(f"s3://{buckets['source']}", images=TINY["images"], max_count=TINY["max_count"], seed=TINY["seed"])

    run_dir, outputs, seconds = run_local_pipeline(tmp_path / "root", **_params(s3_endpoint, buckets))
    deployed = outputs["deploy"]["parameterValues"]
    try:
        assert set(outputs) == {"check", "download", "split", "tune", "train", "evaluate", "deploy", "cleanup"}
        assert set(seconds) >= {"download", "split", "tune", "train", "evaluate", "deploy"}

        # download -> split: every synthetic bin landed in exactly one split, in the working store.
        raw = outputs["download"]["artifacts"]["raw"]["artifacts"][0]["metadata"]
        assert raw["selected"] == TINY["images"] and raw["uri"] == f"s3://{buckets['work']}/abid"
        shards = outputs["split"]["artifacts"]["shards"]["artifacts"][0]
        assert shards["metadata"]["uri"].startswith(f"s3://{buckets['work']}/splits/")  # shared by reruns
        assert sum(shards["metadata"]["samples"].values()) == TINY["images"]
        assert Path(shards["uri"], "manifest.json").is_file()  # the small files are in the artifact too

        # tune: optuna sampled the shared search space; the best params flow into training.
        tune_uri = outputs["tune"]["artifacts"]["tuning"]["artifacts"][0]["metadata"]["uri"]
        tuning = json.loads(storage.read_bytes(storage.join(tune_uri, "tuning.json")))
        assert len(tuning["trials"]) == TINY["tune_trials"]
        best = outputs["tune"]["parameterValues"]["best_params"]
        assert set(best) == {p.name for p in search_space.SEARCH_SPACE}
        assert all(search_space.by_name(k).contains(v) for k, v in best.items())
        assert tuning["best_params"] == best

        # train: the model artifact is a loadable model folder trained with the tuned settings.
        model = outputs["train"]["artifacts"]["model"]["artifacts"][0]
        config = json.loads(Path(model["uri"], "config.json").read_text())
        assert config["arch"] == "resnet18" and config["max_count"] == TINY["max_count"]
        assert config["train_args"]["base_lr"] == pytest.approx(best["base-lr"])
        assert config["train_args"]["batch_size"] == int(best["batch-size"])
        assert storage.exists(storage.join(model["metadata"]["uri"], "model.pt"))

        # evaluate: metrics, confusion matrix for the UI, and the report.
        metrics = outputs["evaluate"]["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert metrics["samples"] == shards["metadata"]["samples"]["test"]
        assert 0.0 <= metrics["accuracy"] <= 1.0
        # one spelling per metric: the KFP Metrics artifact uses metrics.json's names (docs/cli.md)
        assert set(metrics) == {"accuracy", "within1", "rmse", "mae", "macro_f1", "samples", "seconds"}
        cm = outputs["evaluate"]["artifacts"]["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
        assert sum(sum(r["row"]) for r in cm["rows"]) == metrics["samples"]
        report = Path(outputs["evaluate"]["artifacts"]["report"]["artifacts"][0]["uri"]).read_text()
        for section in ("## Data", "## Best hyperparameters", "## Test metrics", "Confusion matrix",
                        "## Compute and cost", "## Tuning trials", "## Training curves"):
            assert section in report

        # The run's record in the working store, as `bincounter runs show` reads it back.
        from bincounter import runs

        run_id = model["metadata"]["uri"].rstrip("/").split("/")[-2]
        info = runs.show_run(f"s3://{buckets['work']}", run_id)
        assert info["stages"] == ["split", "tune", "model", "evaluation", "deploy"]
        assert info["split_uri"] == shards["metadata"]["uri"]
        assert info["report"].startswith("# bincounter run report") and "training_curves.png" in info["report"]
        assert info["test_metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
        assert len(info["trials"]) == TINY["tune_trials"]
        assert info["deployment"]["endpoint"] == deployed["endpoint"]
        plots = {u.rsplit("/", 1)[-1] for u in info["plots"]}
        assert {"samples.png", "confusion_matrix.png", "training_curves.png", "mistakes.png"} <= plots

        # deploy: a live server that answered the smoke test, and answers us.
        assert len(deployed["predictions"]) == 2
        jpeg = storage.read_bytes(f"s3://{buckets['source']}/bin-images/00001.jpg")
        [answer] = client.predict([jpeg], url=deployed["endpoint"])
        assert 0 <= answer.count <= TINY["max_count"]
        assert len(answer.probabilities) == TINY["max_count"] + 1

        # The exit handler read the success markers that evaluate and deploy left, and stopped nothing.
        assert runs.missing_markers(f"s3://{buckets['work']}", run_id, ["evaluate", "deploy"]) == []
    finally:
        local_engine.stop_server(deployed["handle"])
    assert not local_engine._alive(int(deployed["handle"]))


def test_a_failed_run_fails_with_the_reason_and_runs_the_exit_handler(s3_endpoint, buckets, tmp_path, monkeypatch,
                                                                      capfd):
    monkeypatch.setenv("BINCOUNTER_STATE_DIR", str(tmp_path / "state"))
    synthesize(f"s3://{buckets['source']}", images=30, max_count=TINY["max_count"], seed=TINY["seed"])
    # A misspelled training flag: the first step (the preflight, which kfp does not retry) must fail
    # before anything is downloaded, name the flag, and the exit handler must still run, seeing the failure.
    params = _params(s3_endpoint, buckets, extra_train_args=["--wrokers", "0"])
    with pytest.raises(RuntimeError, match="check"):
        run_local_pipeline(tmp_path / "root", **params)
    out = capfd.readouterr().out
    assert "Unknown training arguments ['--wrokers', '0']" in out
    # Printed by the cleanup (exit handler) task, which found no success marker of the run.
    assert "failed or cancelled (not finished: evaluate, deploy); cleaning up" in out
    [run_dir] = [p for p in (tmp_path / "root").iterdir() if p.is_dir()]
    assert (run_dir / "cleanup" / "executor_output.json").is_file()
    assert not (run_dir / "train").exists() and not (run_dir / "download").exists()
