"""Evaluation metrics against values worked out by hand, and `bincounter evaluate` on a model folder."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bincounter import evaluate as ev
from bincounter import model as model_lib
from bincounter import presets
from bincounter.data import shards


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Eight bins, counts 0..3. Worked by hand:
#   confusion (rows true, cols predicted): [[1,1,0,0],[0,2,0,0],[1,0,1,1],[0,0,0,1]]
#   correct 1+2+1+1 = 5 of 8                      -> accuracy 0.625
#   errors pred-true: 0,+1,0,0,0,-2,+1,0          -> RMSE sqrt(6/8), MAE 4/8, within +-1: 7/8
#   class 0: P 1/2, R 1/2, F1 1/2;  class 1: P 2/3, R 1, F1 0.8
#   class 2: P 1/1, R 1/3, F1 1/2;  class 3: P 1/2, R 1, F1 2/3
Y_TRUE = [0, 0, 1, 1, 2, 2, 2, 3]
Y_PRED = [0, 1, 1, 1, 2, 0, 3, 3]


def test_metrics_match_hand_worked_values():
    m = ev.compute_metrics(Y_TRUE, Y_PRED, num_classes=4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]]
    assert m["samples"] == 8
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["rmse"] == pytest.approx(math.sqrt(0.75))
    assert m["mae"] == pytest.approx(0.5)
    assert m["within1"] == pytest.approx(0.875)
    expected = [(1 / 2, 1 / 2, 1 / 2, 2), (2 / 3, 1.0, 0.8, 2), (1.0, 1 / 3, 1 / 2, 3), (1 / 2, 1.0, 2 / 3, 1)]
    for row, (p, r, f1, support) in zip(m["per_class"], expected):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f1))
        assert row["support"] == support
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.5 + 2 / 3) / 4)


def test_class_without_samples_or_predictions_scores_zero():
    m = ev.compute_metrics(Y_TRUE, Y_PRED, num_classes=5, class_names=["0", "1", "2", "3", "4+"])
    assert m["per_class"][4] == {"class": "4+", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == pytest.approx(0.625)  # an empty class changes nothing else ...
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.5 + 2 / 3) / 5)  # ... but the macro average


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="outside 0..3"):
        ev.compute_metrics([0, 4], [0, 1], num_classes=4)
    with pytest.raises(ValueError, match="differ in length"):
        ev.compute_metrics([0, 1], [0], num_classes=4)
    with pytest.raises(ValueError, match="No samples"):
        ev.compute_metrics([], [], num_classes=4)


def test_confusion_png_is_a_png():
    png = ev.plot_confusion(np.array([[3, 1], [0, 2]]), ["0", "1+"], "test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("k_or_more", [False, True])
def test_evaluate_model_folder_matches_predictions_made_by_hand(synthetic_split, tmp_path, k_or_more):
    """evaluate() on a (randomly initialised) model folder equals compute_metrics on predictions
    computed here sample by sample; counts above K are dropped or mapped to K as the model says."""
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig(arch="resnet18", max_count=3, k_or_more=k_or_more, input_size=64, resize_size=72,
                                decoding="median")
    model_lib.save_model_dir(model_lib.build_model("resnet18", cfg.num_classes), cfg, str(tmp_path / "model"))

    metrics = ev.evaluate(str(tmp_path / "model"), synthetic_split, split="test", output=str(tmp_path / "eval"),
                          batch_size=16, workers=0, device="cpu")

    net, cfg = model_lib.load_model_dir(tmp_path / "model")
    transform = presets.eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std)
    y_true, y_pred, y_median = [], [], []
    for uri in shards.shard_uris(synthetic_split, "test"):
        for sample in shards.iter_shard(uri):
            if sample.count > 3 and not k_or_more:
                continue
            image = transform(Image.open(io.BytesIO(sample.jpeg)).convert("RGB"))
            with torch.inference_mode():
                p = net(image[None]).softmax(dim=1)[0].numpy()
            y_pred.append(int(p.argmax()))
            y_median.append(int(np.searchsorted(np.cumsum(p), 0.5)))  # first count with P(<= count) >= 1/2
            y_true.append(min(sample.count, 3))
    expected = ev.compute_metrics(y_true, y_median, 4)  # the model's decoding: median
    by_argmax = ev.compute_metrics(y_true, y_pred, 4)
    manifest = shards.read_manifest(synthetic_split)["splits"]["test"]
    kept = sum(n for c, n in manifest["class_counts"].items() if int(c) <= 3 or k_or_more)
    assert metrics["samples"] == kept == len(y_true)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"]) and metrics["decoding"] == "median"
    assert metrics["decodings"]["argmax"]["accuracy"] == pytest.approx(by_argmax["accuracy"])
    assert metrics["decodings"]["argmax"]["rmse"] == pytest.approx(by_argmax["rmse"])
    assert set(metrics["decodings"]) == {"argmax", "median", "expected"}
    assert metrics["class_names"] == (["0", "1", "2", "3+"] if k_or_more else ["0", "1", "2", "3"])
    written = json.loads((tmp_path / "eval" / ev.METRICS_FILE).read_text())
    assert written["confusion_matrix"] == expected["confusion_matrix"]
    assert (tmp_path / "eval" / ev.CONFUSION_PNG).read_bytes()[:4] == b"\x89PNG"


def test_summary_line_parses_with_katib_regex():
    import re

    m = ev.compute_metrics(Y_TRUE, Y_PRED, num_classes=4)
    pairs = dict((name, float(v)) for name, v, *_ in re.findall(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)",
                                                               ev.summary_line(m)))
    assert pairs["test-accuracy"] == pytest.approx(0.625)
    assert pairs["test-rmse"] == pytest.approx(math.sqrt(0.75), abs=1e-4)
    assert pairs["test-samples"] == 8


def test_decodings_on_hand_worked_distributions():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.4],    # argmax 3; P(<=1) = 0.4, P(<=2) = 0.6: median 2; E = 1.9
                          [0.6, 0.1, 0.1, 0.2],    # argmax 0, median 0, E = 0.9 -> 1
                          [0.0, 0.5, 0.0, 0.5]])   # P(<=1) = 0.5 reaches 1/2: median 1; E = 2.0
    assert model_lib.decode(probs, "argmax").tolist() == [3, 0, 1]
    assert model_lib.decode(probs, "median").tolist() == [2, 0, 1]
    assert model_lib.decode(probs, "expected").tolist() == [2, 1, 2]
    with pytest.raises(ValueError, match="Invalid decoding 'mode'. Only argmax, median, expected"):
        model_lib.decode(probs, "mode")


def test_decoding_is_chosen_on_validation_and_recorded():
    from bincounter import train as tr

    row = {"val-argmax-accuracy": 0.60, "val-argmax-rmse": 0.95, "val-median-accuracy": 0.595,
           "val-median-rmse": 0.85, "val-expected-accuracy": 0.50, "val-expected-rmse": 0.80}
    assert tr.choose_decoding(row) == "median"  # expected has the lowest RMSE but costs 10 points of accuracy
    assert tr.choose_decoding(row, "argmax") == "argmax"
    with pytest.raises(ValueError, match="Invalid decoding"):
        model_lib.ModelConfig.from_dict({"decoding": "mode"})
