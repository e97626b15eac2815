"""The views a run leaves (issue 14): predictions CSV and mistakes grid from evaluate, samples.png
with one row per count, confusion matrix with its recall view, training curves; written files
follow the umask."""

from __future__ import annotations

import csv
import io
import os

import pytest
from PIL import Image

from bincounter import evaluate as ev
from bincounter import model as model_lib
from bincounter import plots, predictions, storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:4] == b"\x89PNG"
    return Image.open(io.BytesIO(data)).size


def test_evaluate_writes_per_image_predictions_that_agree_with_its_metrics(synthetic_split, tmp_path):
    import torch

    torch.manual_seed(1)
    cfg = model_lib.ModelConfig(arch="resnet18", max_count=5, input_size=64, resize_size=72)
    model_lib.save_model_dir(model_lib.build_model("resnet18", cfg.num_classes), cfg, str(tmp_path / "model"))
    metrics = ev.evaluate(str(tmp_path / "model"), synthetic_split, split="test", output=str(tmp_path / "eval"),
                          batch_size=16, workers=0, device="cpu")

    rows = list(csv.DictReader((tmp_path / "eval" / predictions.PREDICTIONS_CSV).open()))
    assert len(rows) == metrics["samples"]
    assert list(rows[0])[:5] == ["id", "true_count", "predicted_count", "confidence", "correct"]
    # The CSV goes through the model server's decode + forward pass; evaluate through the DataLoader:
    # the same images and transform, so the same confusion matrix.
    cm = [[0] * cfg.num_classes for _ in range(cfg.num_classes)]
    for r in rows:
        cm[int(r["true_count"])][int(r["predicted_count"])] += 1
        assert r["correct"] == str(int(r["true_count"] == r["predicted_count"]))
    assert cm == metrics["confusion_matrix"]
    wrong = sum(r["correct"] == "0" for r in rows)
    assert wrong > 0  # an untrained model errs: the grid has something to show
    width, height = _png_size((tmp_path / "eval" / predictions.MISTAKES_PNG).read_bytes())
    rows_shown = -(-min(wrong, plots.MISTAKES_SHOWN) // 6)
    assert height == pytest.approx(2.5 * rows_shown * 90, abs=2)


def test_samples_png_has_one_row_per_count(synthetic_split):
    manifest = storage.read_json(storage.join(synthetic_split, "manifest.json"))
    counts = {c for c, n in manifest["splits"]["train"]["class_counts"].items() if n}
    _, height = _png_size(storage.read_bytes(storage.join(synthetic_split, "samples.png")))
    assert height == pytest.approx(2.4 * len(counts) * 90, abs=2)  # 2.4 in per row at 90 dpi


def test_captions_say_item_or_items():
    assert [plots.items(n) for n in (0, 1, 2)] == ["0 items", "1 item", "2 items"]


def test_confusion_png_has_counts_and_recall_panels():
    figure_width = (2.5 + 1.4 * 3) * 90
    width, height = _png_size(plots.confusion([[3, 1, 0], [0, 2, 0], [0, 0, 0]], ["0", "1", "2"]))
    assert width == pytest.approx(figure_width, abs=2) and width > height


def test_training_curves_png():
    history = [{"epoch": e, "train-loss": 1 / e, "val-loss": 1.1 / e, "val-accuracy": 0.2 * e} for e in (1, 2, 3)]
    assert _png_size(plots.training_curves(history)) == (900, 342)


def test_written_files_follow_the_umask_secrets_excepted(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "a.json"), b"{}")
        storage.upload_file(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
        storage.write_bytes(str(tmp_path / "token"), b"secret", private=True)
        os.umask(0o027)
        storage.write_bytes(str(tmp_path / "c.json"), b"{}")
    finally:
        os.umask(old)
    mode = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.json", "b.json", "token", "c.json")}
    assert mode == {"a.json": 0o644, "b.json": 0o644, "token": 0o600, "c.json": 0o640}


def test_split_evaluate_and_audit_show_progress_bars_with_totals(synthetic_abid, tmp_path, capsys):
    import re

    import torch

    from bincounter import cli

    def bar(err: str, desc: str) -> tuple[int, int]:
        """The last state of the bar ``desc`` that tqdm drew on stderr: (done, total)."""
        states = re.findall(rf"{re.escape(desc)}: +\d+%\|[^|]*\| *(\d+)/(\d+)", err)
        assert states, err[-2000:]
        return tuple(map(int, states[-1]))

    split_dir, model_dir = str(tmp_path / "split"), str(tmp_path / "model")
    assert cli.main(["split", synthetic_abid, "--output", split_dir, "--short-side", "40", "--shard-size", "100",
                     "--processes", "1", "--val", "0.15", "--test", "0.15"]) == 0
    assert bar(capsys.readouterr().err, "split") == (240, 240)  # every bin of the synthetic set

    torch.manual_seed(0)
    cfg = model_lib.ModelConfig(arch="resnet18", max_count=5, input_size=32, resize_size=36)
    model_lib.save_model_dir(model_lib.build_model("resnet18", cfg.num_classes), cfg, model_dir)
    assert cli.main(["evaluate", "--model", model_dir, "--data", split_dir, "--split", "test", "--output",
                     str(tmp_path / "eval"), "--loader-workers", "0", "--device", "cpu"]) == 0
    done, total = bar(capsys.readouterr().err, "evaluate (test)")
    assert done == total == storage.read_json(f"{tmp_path}/eval/metrics.json")["samples"]

    assert cli.main(["audit", "--model", model_dir, "--source", synthetic_abid, "--output", str(tmp_path / "audit"),
                     "--limit", "20", "--concurrency", "1", "--batch-size", "10", "--device", "cpu"]) == 0
    assert bar(capsys.readouterr().err, "audit") == (20, 20)

    assert cli.main(["split", synthetic_abid, "--output", str(tmp_path / "quiet"), "--short-side", "40",
                     "--processes", "1", "--no-progress"]) == 0
    assert "split:" not in capsys.readouterr().err


def test_without_the_train_extra_a_plot_is_one_clear_error(synthetic_abid, tmp_path, monkeypatch, capsys):
    """The model server image has no matplotlib (pyproject's train extra); a command that draws
    says which package and extra it needs instead of a traceback."""
    import sys

    from bincounter import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(Exception, match=r"needs matplotlib, which is not installed: pip install 'bincounter\[train\]'"):
        plots.pyplot()
    assert cli.main(["split", synthetic_abid, "--output", str(tmp_path / "s"), "--short-side", "32",
                     "--processes", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: drawing the plots needs matplotlib, which is not installed: pip install 'bincounter[train]'"]
    assert not (tmp_path / "s").exists()  # checked before any shard was written


def test_without_the_train_extra_training_is_one_clear_error(synthetic_split, tmp_path, monkeypatch, capsys):
    """Training writes TensorBoard logs; where tensorboard is missing it says so before epoch 1."""
    import sys

    from bincounter import cli

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    assert cli.main(["train", "--data", synthetic_split, "--output", str(tmp_path / "model"), "--arch", "resnet18",
                     "--pretrained", "", "--input-size", "64", "--epochs", "1", "--loader-workers", "0",
                     "--device", "cpu"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: training writes TensorBoard logs, and tensorboard is not installed: "
                   "pip install 'bincounter[train]'"]
    assert not (tmp_path / "model" / "model.pt").exists()
