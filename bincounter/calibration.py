"""Calibration: a temperature that makes the model's probabilities mean what they say.

The audit flags a bin when the model's probability of its expected quantity is low, so
that probability has to be calibrated: of the bins where the model says 0.9, about 90% should
be right. Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017)
divides the logits by one scalar ``T`` fitted on the validation split; it never changes the
argmax, so accuracy is unchanged. Training fits ``T`` at its end (``calibrate_model``) and stores
it with the before/after figures in ``config.json``; serving, evaluation and the audit apply it.

The functions on arrays are pure (numpy in, numbers out) so tests can check them against
values worked out by hand.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
# The search range of T. Beyond it the model is useless or the data degenerate (all one class).
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class at ``temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    labels = np.asarray(labels, dtype=np.int64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], tol: float = 1e-4) -> float:
    """The ``T`` in [T_MIN, T_MAX] that minimises the NLL of ``softmax(logits / T)``.

    The NLL is convex in ``1/T`` (a log-sum-exp of linear functions minus a linear one),
    so a golden-section search over ``1/T`` finds the global minimum without gradients.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        raise ValueError("No samples to fit a temperature on (is the validation split empty?)")
    f = lambda beta: nll(logits, labels, 1.0 / beta)  # noqa: E731
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(1.0 / ((lo + hi) / 2))


def reliability_bins(probs: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> list[dict]:
    """Top-label reliability: per equal-width confidence bin, its count, mean confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = pred == labels
    # Bin i holds confidences in (i/bins, (i+1)/bins]; confidence is always > 1/num_classes > 0.
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        m = idx == i
        n = int(m.sum())
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "count": n,
                    "confidence": float(conf[m].mean()) if n else 0.0,
                    "accuracy": float(correct[m].mean()) if n else 0.0})
    return out


def ece_from_bins(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    if n == 0:
        raise ValueError("No samples to compute the calibration error on")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / n)


def ece(probs: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    return ece_from_bins(reliability_bins(probs, labels, bins))


def calibrate(logits: np.ndarray, labels: Sequence[int], split: str = "val") -> dict:
    """Fit ``T`` and report it with ECE and NLL before and after, plus both reliability tables.

    The result is what ``config.json`` stores under ``calibration`` (``temperature`` also at the top).
    """
    logits = np.asarray(logits, dtype=np.float64)
    t = fit_temperature(logits, labels)
    before, after = reliability_bins(softmax(logits), labels), reliability_bins(softmax(logits, t), labels)
    return {"temperature": round(t, 5), "split": split, "samples": int(len(logits)),
            "ece_before": ece_from_bins(before), "ece_after": ece_from_bins(after),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "reliability_before": before, "reliability_after": after}


def evaluation_figures(logits: np.ndarray, labels: Sequence[int], temperature: float) -> dict:
    """What evaluation reports: ECE at T = 1 and at the model's temperature, and both reliability tables."""
    before = reliability_bins(softmax(logits), labels)
    after = reliability_bins(softmax(logits, temperature), labels)
    return {"temperature": float(temperature), "ece_uncalibrated": ece_from_bins(before), "ece": ece_from_bins(after),
            "reliability_uncalibrated": before, "reliability": after}


def plot_reliability(before: list[dict], after: list[dict] | None = None, title: str = "") -> bytes:
    """The reliability diagram as a PNG: accuracy against confidence per bin, the diagonal is perfect."""
    from bincounter.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for bins, name, colour in ((before, "T = 1", "tab:red"), (after, "calibrated", "tab:blue")):
        if not bins:
            continue
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", color=colour,
                label=f"{name} (ECE {ece_from_bins(bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def collect_logits(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """The logits and labels of every batch of ``loader`` (a few floats per sample)."""
    import torch

    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits.append(model(images).float().cpu())
            labels.append(targets)
    if not logits:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def fit_on_split(config, model, data: str, split: str, device, batch_size: int = 64, workers: int = 2) -> dict | None:
    """Fit the temperature of ``model`` on a whole split of a split folder (one process: training calls it
    on rank 0 with the shipped weights) and store ``temperature`` and ``calibration`` in its ``ModelConfig``.

    Returns the calibration record, or ``None`` when the split has no sample the model can take.
    """
    import logging

    from bincounter import presets
    from bincounter.data import shards
    from bincounter.data.loader import ShardDataset, make_loader

    dataset = ShardDataset(shards.shard_uris(data, split),
                           presets.eval_transform(config.input_size, config.resize_size, config.mean, config.std),
                           config.max_count, config.k_or_more)
    logits, labels = collect_logits(model, make_loader(dataset, batch_size, workers, device), device)
    if not len(labels):
        return None
    result = calibrate(logits, labels, split)
    config.temperature, config.calibration = result["temperature"], result
    logging.getLogger("bincounter.train").info(
        "calibration on %s (%d samples): temperature=%.4f ece %.4f -> %.4f", split, result["samples"],
        result["temperature"], result["ece_before"], result["ece_after"])
    return result


def probabilities(logits, temperature: float = 1.0):
    """Calibrated class probabilities of a batch of logits (a torch tensor): ``softmax(logits / T)``."""
    import torch

    return torch.softmax(logits.float() / temperature, dim=1)
