"""``bincounter runs list`` / ``runs show`` read a run's record from the working store, local or s3://.

The layout is the one the pipeline's components write (``{work_uri}/runs/{run_id}/split``,
``tune/tuning.json``, ``model/``, ``evaluation/``); tests/test_pipeline_local.py reads a
real pipeline run back through ``runs.show_run``. Here the run folder is built from real
parts: the shared synthetic split, the report as ``report.render_markdown`` writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bincounter import cli, plots, report, runs, storage

RUN = "bincounter-20261202-101010"
TRIALS = [{"name": "trial-0", "state": "COMPLETE", "value": 0.61, "params": {"lr": 0.002, "optimizer": "adamw"}},
          {"name": "trial-1", "state": "PRUNED", "value": None, "params": {"lr": 0.05, "optimizer": "sgd"}}]
METRICS = {"samples": 36, "accuracy": 0.5833, "within1": 0.9, "rmse": 0.8, "mae": 0.5, "macro_f1": 0.51,
           "confusion_matrix": [[5, 1], [2, 4]], "class_names": ["0", "1"]}


def _write_run(local_root: Path, synthetic_split: str) -> None:
    run = local_root / "runs" / RUN
    shutil.copytree(synthetic_split, run / "split")
    (run / "tune").mkdir(parents=True)
    (run / "tune" / "tuning.json").write_text(json.dumps({"best_params": {"lr": 0.002}, "trials": TRIALS}))
    (run / "model").mkdir()
    history = [{"epoch": 1, "train-loss": 1.2, "val-loss": 1.1, "val-accuracy": 0.4, "val-within1": 0.8},
               {"epoch": 2, "train-loss": 0.9, "val-loss": 1.0, "val-accuracy": 0.6, "val-within1": 0.9}]
    (run / "model" / "metrics.json").write_text(json.dumps({"epochs": history, "final": history[-1]}))
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text(json.dumps(METRICS))
    (run / "evaluation" / "training_curves.png").write_bytes(plots.training_curves(history))
    manifest = json.loads((run / "split" / "manifest.json").read_text())
    (run / "evaluation" / "report.md").write_text(report.render_markdown(
        split_manifest=manifest, best_params={"lr": 0.002}, best_value=0.61, test_metrics=METRICS,
        gpu_hours={"train": 0.0}, price_per_gpu_hour=1.5, trials=TRIALS,
        images={"Training curves": "training_curves.png"}))
    early = local_root / "runs" / "bincounter-20261202-090000" / "split"  # a run that stopped after its split
    early.mkdir(parents=True)
    (early / "class_distribution.json").write_text("{}")


def _check_show(info: dict, work_uri: str):
    assert info["stages"] == ["split", "tune", "model", "evaluation"]
    assert info["report"].startswith("# bincounter run report") and "## Tuning trials" in info["report"]
    assert info["test_metrics"]["accuracy"] == pytest.approx(0.5833)
    assert [t["state"] for t in info["trials"]] == ["COMPLETE", "PRUNED"]
    assert info["model_uri"] == storage.join(work_uri, "runs", RUN, "model")
    names = sorted(u.rsplit("/", 1)[-1] for u in info["plots"])
    assert names == ["class_distribution.png", "samples.png", "training_curves.png"]


def test_list_and_show_a_local_working_store(tmp_path, synthetic_split, capsys):
    _write_run(tmp_path / "work", synthetic_split)
    work = str(tmp_path / "work")
    rows = runs.list_runs(work)
    assert [r["run"] for r in rows] == ["bincounter-20261202-090000", RUN]
    assert rows[0]["stages"] == ["split"] and rows[0]["accuracy"] is None
    assert rows[1]["accuracy"] == pytest.approx(0.5833)
    _check_show(runs.show_run(work, RUN), work)

    assert cli.main(["runs", "show", RUN, "--work-uri", work]) == 0
    out = capsys.readouterr().out
    assert "2 tuning trials" in out and "trial-1" in out and "PRUNED" in out
    assert f"tensorboard --logdir {work}/runs/{RUN}/model/tensorboard" in out
    assert "## Test metrics" in out  # the report itself


def test_list_and_show_an_s3_working_store(tmp_path, synthetic_split, s3_bucket, capsys):
    _write_run(tmp_path / "work", synthetic_split)
    for path in (tmp_path / "work").rglob("*"):
        if path.is_file():
            storage.upload_file(path, f"s3://{s3_bucket}/team/{path.relative_to(tmp_path / 'work').as_posix()}")
    work = f"s3://{s3_bucket}/team"
    assert [r["run"] for r in runs.list_runs(work)] == ["bincounter-20261202-090000", RUN]
    _check_show(runs.show_run(work, RUN), work)
    assert cli.main(["runs", "list", "--work-uri", work, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["macro_f1"] == pytest.approx(0.51)


def test_an_unknown_run_lists_the_known_ones(tmp_path, synthetic_split, capsys):
    _write_run(tmp_path / "work", synthetic_split)
    assert cli.main(["runs", "show", "nope", "--work-uri", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no run 'nope'") and RUN in err
    assert cli.main(["runs", "list", "--work-uri", str(tmp_path / "missing")]) == 1
    assert "--work-uri" in capsys.readouterr().err
