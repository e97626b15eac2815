"""The run report the evaluate component publishes, and the engine helpers the components share."""

from __future__ import annotations

import pytest

from bincounter import engines, report

MANIFEST = {"splits": {
    "train": {"samples": 8, "shards": ["train/shard-000000.tar"], "class_counts": {"0": 3, "1": 5}},
    "val": {"samples": 2, "shards": ["val/shard-000000.tar"], "class_counts": {"0": 1, "1": 1}},
    "test": {"samples": 3, "shards": ["test/shard-000000.tar"], "class_counts": {"0": 1, "1": 2}}},
    "skipped_by_reason": {"unreadable-jpeg": 2}}
METRICS = {"samples": 3, "accuracy": 2 / 3, "within1": 1.0, "rmse": 0.5774, "mae": 1 / 3, "macro_f1": 0.6667,
           "per_class": [{"class": "0", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
                         {"class": "1", "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}],
           "confusion_matrix": [[1, 0], [1, 1]], "class_names": ["0", "1"]}


def test_report_has_data_params_metrics_confusion_and_cost():
    md = report.render_markdown(split_manifest=MANIFEST, best_params={"base-lr": 0.001, "dropout": 0.1},
                                best_value=0.75, test_metrics=METRICS, gpu_hours={"tune": 0.5, "train": 2.0},
                                price_per_gpu_hour=3.0, capacity="on-demand", run={"engine": "kubernetes"})
    assert "| train | 8 | 1 | 3 | 5 |" in md
    assert "Skipped records: 2 (unreadable-jpeg: 2)" in md
    assert "| base-lr | 0.001 |" in md and "Best trial val-accuracy: 0.7500" in md
    assert "| accuracy | 0.6667 |" in md
    assert "| 1 | 1 | 1 |" in md  # confusion matrix row: true 1 -> predicted 0 once, 1 once
    assert "| tune | 0.500 | 1.50 |" in md and "| train | 2.000 | 6.00 |" in md
    assert "| total | 2.500 | 7.50 |" in md
    assert "Price: 3 per GPU-hour (on-demand)" in md


def test_report_without_tuning_and_bad_inputs():
    md = report.render_markdown(split_manifest=MANIFEST, best_params={}, best_value=None, test_metrics=METRICS,
                                gpu_hours={"tune": 0.0, "train": 0.0}, price_per_gpu_hour=1.0)
    assert "Tuning was skipped" in md and "| total | 0.000 | 0.00 |" in md
    with pytest.raises(ValueError, match="Invalid capacity"):
        report.render_markdown(split_manifest=MANIFEST, best_params={}, best_value=None, test_metrics=METRICS,
                               gpu_hours={}, price_per_gpu_hour=1.0, capacity="reserved")
    with pytest.raises(ValueError):
        report.gpu_cost(-1, 2.0)


def test_hyperparameters_come_back_in_their_search_space_types():
    # KFP turns every number of a dict into a float; Katib reports strings.
    assert engines.normalize_params({"batch-size": 32.0, "base-lr": "0.001", "dropout": 0}) == {
        "batch-size": 32, "base-lr": 0.001, "dropout": 0.0}
    assert engines.normalize_params({"batch-size": "64"}) == {"batch-size": 64}
    with pytest.raises(ValueError, match="Choices"):
        engines.normalize_params({"batch-size": 48})
    with pytest.raises(KeyError, match="Unknown hyperparameter"):
        engines.normalize_params({"momentum": 0.9})


def test_training_args_are_checked_by_the_trainers_parser():
    args = engines.training_args(arch="resnet18", max_count=4, input_size=64, epochs=2, pretrained="s3://b/w.pth",
                                 extra=["--workers", "0"])
    assert args == ["--arch", "resnet18", "--max-count", "4", "--input-size", "64",
                    "--epochs", "2", "--pretrained", "s3://b/w.pth", "--workers", "0"]
    with pytest.raises(ValueError, match=r"Unknown training arguments \['--wrokers', '0'\]"):
        engines.training_args(arch="resnet18", max_count=4, input_size=64, epochs=2, extra=["--wrokers", "0"])
    # empty pretrained is passed on: from scratch, not the trainer's default download
    scratch = engines.training_args(arch="resnet18", max_count=4, input_size=64, epochs=2)
    assert scratch[scratch.index("--pretrained") + 1] == ""
    with pytest.raises(ValueError, match="invalid choice: 'resnet9'"):
        engines.training_args(arch="resnet9", max_count=4, input_size=64, epochs=2)
    with pytest.raises(ValueError, match="input_size <= resize_size"):  # the trainer's own combination check
        engines.training_args(arch="resnet18", max_count=4, input_size=64, epochs=1, extra=["--resize-size", "32"])


def test_local_world_size_matches_the_cluster_shape():
    assert engines.local_processes(2, 4) == 8
    assert engines.local_processes(2, 0) == 2
    with pytest.raises(ValueError):
        engines.local_processes(0, 1)
    with pytest.raises(ValueError, match="Invalid engine"):
        engines.check_engine("docker")
