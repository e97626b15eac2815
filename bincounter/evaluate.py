"""`bincounter evaluate`: counting metrics of a model folder on a split (and the metrics validation uses).

The metric functions are pure (labels in, numbers out) so they can be checked
against values worked out by hand; ``evaluate`` runs a model over shards and
calls them, for each decoding of the probabilities (``model.decode``: argmax,
median, expected count) side by side; the top-level metrics are those of the
decoding recorded in the model's config.json. Counts are class indices: with ``--k-or-more`` the last class means
"K or more" and counts as K in RMSE/MAE.

Example::

    bincounter evaluate --model runs/model --data runs/split --split test --output runs/eval
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import numpy as np

from bincounter import calibration, plots, predictions, storage

METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``cm[t, p]`` = how many samples of true class ``t`` were predicted as ``p``."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape} vs {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}: {sorted(set(y.tolist()))}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """All metrics from a confusion matrix (rows: true count, columns: predicted count).

    Precision, recall and F1 of a class with no predictions / no samples are 0
    (as scikit-learn's ``zero_division=0``). RMSE and MAE treat class ``i`` as count ``i``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    n = int(cm.sum())
    if n == 0:
        raise ValueError("No samples to compute metrics on (is the split empty after dropping counts above K?)")
    true_idx, pred_idx = np.indices(cm.shape)
    err = (pred_idx - true_idx).astype(np.float64)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    per_class = []
    for i in range(k):
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        recall = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": names[i], "precision": precision, "recall": recall, "f1": f1,
                          "support": int(support[i])})
    return {
        "samples": n,
        "accuracy": float(tp.sum() / n),
        "rmse": math.sqrt(float((cm * err ** 2).sum() / n)),
        "mae": float((cm * np.abs(err)).sum() / n),
        "within1": float(cm[np.abs(err) <= 1].sum() / n),
        "macro_f1": float(np.mean([c["f1"] for c in per_class])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                    class_names: Sequence[str] | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion matrix, RMSE, MAE and accuracy within +-1."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes), class_names)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """The confusion matrix as a PNG: counts and the recall view, with colour bars (bincounter.plots)."""
    return plots.confusion(cm, class_names, title)


def evaluate(model_dir: str, data: str, split: str = "test", output: str | None = None, *,
             batch_size: int = 64, workers: int = 2, device: str = "auto", progress: bool = False) -> dict:
    """Run the model folder over one split of a split folder and return its metrics.

    With ``output`` (folder or ``s3://`` prefix), also writes ``metrics.json``,
    ``confusion_matrix.png`` and ``reliability.png`` there, and the per-image ``predictions.csv`` and
    ``mistakes.png`` (bincounter.predictions). ``ece`` is the expected calibration error with the model's
    temperature, ``ece_uncalibrated`` at T = 1 (``bincounter.calibration``). ``progress`` shows a progress
    bar with the total. Samples above the model's K are dropped, or
    mapped to the last class when the model was trained with ``k_or_more``, as in training.
    """
    import torch

    from bincounter import distributed, model as model_lib, presets
    from bincounter.data import shards
    # Imported here: train imports this module's metric functions at its top.
    from tqdm import tqdm

    from bincounter.data.loader import ShardDataset, count_samples, make_loader

    plots.pyplot()  # the plots come last: a missing matplotlib fails now, not after the forward passes
    dev = distributed.select_device(device, distributed.DistEnv())
    net, cfg = model_lib.load_model_dir(model_dir, device=dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    # The whole bin at the model's input size, as training validated and serving reads it.
    dataset = ShardDataset(shards.shard_uris(data, split),
                           presets.eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std),
                           max_count=cfg.max_count, k_or_more=cfg.k_or_more)
    loader = make_loader(dataset, batch_size, workers, dev)
    k = cfg.num_classes
    cms = {m: torch.zeros(k, k, dtype=torch.int64) for m in model_lib.DECODINGS}
    all_logits, all_targets = [], []  # for the calibration error (a few floats per sample)
    total = count_samples(shards.read_manifest(data), split, cfg.max_count, cfg.k_or_more)
    bar = tqdm(total=total, unit="img", desc=f"evaluate ({split})", disable=not progress)
    with torch.inference_mode(), bar:
        for images, targets in loader:
            bar.update(len(targets))
            images = images.to(dev, non_blocking=True)
            if dev.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits = net(images).float().cpu()
            probs = calibration.probabilities(logits, cfg.temperature)  # as serving and the audit see them
            for method, cm in cms.items():
                cm += torch.bincount(targets * k + model_lib.decode(probs, method), minlength=k * k).view_as(cm)
            all_logits.append(logits)
            all_targets.append(targets)
    # Top level: the decoding the model ships with (config.json); all three side by side under "decodings".
    metrics = metrics_from_confusion(cms[cfg.decoding].numpy(), cfg.class_names)
    metrics["decodings"] = {m: {key: v for key, v in metrics_from_confusion(cm.numpy(), cfg.class_names).items()
                                if key in ("accuracy", "rmse", "mae", "within1", "macro_f1")}
                            for m, cm in cms.items()}
    metrics.update(split=split, model=str(model_dir), data=str(data), decoding=cfg.decoding)
    metrics.update(calibration.evaluation_figures(torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy(),
                                                  cfg.temperature))
    if output:
        storage.write_bytes(storage.join(output, METRICS_FILE), json.dumps(metrics, indent=2).encode())
        storage.write_bytes(storage.join(output, CONFUSION_PNG),
                            plots.confusion(cms[cfg.decoding].numpy(), cfg.class_names,
                                            f"{split} ({cfg.decoding}): accuracy {metrics['accuracy']:.3f}"))
        storage.write_bytes(storage.join(output, RELIABILITY_PNG), calibration.plot_reliability(
            metrics["reliability_uncalibrated"], metrics["reliability"], f"{split}: reliability"))
        predictions.write_predictions(model_dir, data, output, split, batch_size=batch_size, progress=progress)
    return metrics


def decodings_table(metrics: dict) -> str:
    """The decodings side by side, as a Markdown table (the shipped one marked)."""
    rows = ["| decoding | accuracy | rmse | mae | within1 |", "|---|---|---|---|---|"]
    for method, m in metrics["decodings"].items():
        mark = " (shipped)" if method == metrics.get("decoding") else ""
        rows.append(f"| {method}{mark} | {m['accuracy']:.4f} | {m['rmse']:.4f} | {m['mae']:.4f} | {m['within1']:.4f} |")
    return "\n".join(rows)


def summary_line(metrics: dict, prefix: str = "test") -> str:
    """``test-accuracy=0.5500 test-rmse=0.9300 ...``: the same name=value shape as the training lines."""
    keys = ("accuracy", "rmse", "mae", "within1", "macro_f1") + (("ece",) if "ece" in metrics else ())
    return " ".join(f"{prefix}-{k.replace('_', '-')}={metrics[k]:.4f}" for k in keys) + f" {prefix}-samples={metrics['samples']}"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder written by `bincounter train` (folder or s3:// prefix)")
    p.add_argument("--data", required=True, help="split folder written by `bincounter split` (folder or s3:// prefix)")
    p.add_argument("--split", default="test", help="which split of --data to evaluate")
    p.add_argument("--output", default="", help="folder or s3:// prefix for metrics.json, confusion_matrix.png, "
                                                "predictions.csv and mistakes.png (empty: print only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    metrics = evaluate(args.model, args.data, split=args.split, output=args.output or None,
                       batch_size=args.batch_size, workers=args.workers, device=args.device,
                       progress=not args.no_progress)
    print(summary_line(metrics, prefix=args.split), flush=True)
    print(decodings_table(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
