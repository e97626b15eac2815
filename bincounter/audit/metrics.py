"""Detection quality of the audit when the truth is known (pure functions, numbers in, numbers out).

A bin is *discrepant* when its expected quantity is wrong; the audit's score for it is
``1 - p_expected`` and it is flagged when ``p_expected < threshold``. These functions
measure how well the flags and the ranking find the discrepant bins.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def at_threshold(p_expected: Sequence[float], truth: Sequence[bool], threshold: float) -> dict:
    """Precision, recall and F1 of ``flagged = p_expected < threshold`` (0 when undefined, as scikit-learn)."""
    p = np.asarray(p_expected, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    flagged = p < threshold
    tp = int((flagged & t).sum())
    fp = int((flagged & ~t).sum())
    fn = int((~flagged & t).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "flagged": tp + fp, "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "precision": precision, "recall": recall, "f1": f1}


def auroc(p_expected: Sequence[float], truth: Sequence[bool]) -> float | None:
    """Area under the ROC curve of the score ``-p_expected``: the probability that a random discrepant
    bin scores lower than a random correct one (ties count half; the Mann-Whitney U statistic).
    ``None`` when either class is empty."""
    p = np.asarray(p_expected, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks of -p (ascending), ties get the mean rank.
    score = -p
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_at_top(p_expected: Sequence[float], truth: Sequence[bool], fraction: float) -> float | None:
    """Of the ``ceil(fraction * n)`` bins with the lowest ``p_expected``, the share that is discrepant.

    Ties are broken by position (stable), so the result is deterministic."""
    p = np.asarray(p_expected, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if len(p) == 0:
        return None
    k = max(1, math.ceil(fraction * len(p)))
    top = np.argsort(p, kind="mergesort")[:k]
    return float(t[top].mean())


def pr_curve(p_expected: Sequence[float], truth: Sequence[bool], points: int = 101) -> list[dict]:
    """Precision and recall at ``points`` thresholds in [0, 1] (for the report's curve)."""
    return [at_threshold(p_expected, truth, float(th)) for th in np.linspace(0.0, 1.0, points)]


def threshold_for_precision(p_expected: Sequence[float], truth: Sequence[bool], target: float) -> dict | None:
    """The largest threshold (most recall) whose precision on this labelled set is >= ``target``.

    Candidates are the midpoints just above each distinct ``p_expected`` (a threshold only matters
    where it passes a score). ``None`` when no threshold reaches the target.
    """
    if not 0 < target <= 1:
        raise ValueError(f"--target-precision must be in (0, 1], got {target}")
    p = np.asarray(p_expected, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    order = np.argsort(p, kind="mergesort")
    ps, ts = p[order], t[order]
    tp = np.cumsum(ts)
    n = np.arange(1, len(ps) + 1)
    best = None
    for i in range(len(ps)):
        if i + 1 < len(ps) and ps[i + 1] == ps[i]:
            continue  # a threshold cannot separate equal scores: only the last of a tie is a cut
        if tp[i] / n[i] >= target:
            best = i
    if best is None:
        return None
    # Just above ps[best], and below the next distinct score, so exactly the first best+1 bins are flagged.
    nxt = ps[best + 1] if best + 1 < len(ps) else 1.0
    threshold = float(np.nextafter(ps[best], np.inf)) if nxt == ps[best] else float((ps[best] + nxt) / 2)
    return at_threshold(p, t, threshold)


def detection_summary(p_expected: Sequence[float], truth: Sequence[bool], threshold: float) -> dict:
    """Everything the report gives when the truth is known."""
    out = at_threshold(p_expected, truth, threshold)
    out.update(discrepant=int(np.asarray(truth, dtype=bool).sum()), bins=len(np.asarray(truth)),
               auroc=auroc(p_expected, truth), precision_at_1pct=precision_at_top(p_expected, truth, 0.01),
               precision_at_5pct=precision_at_top(p_expected, truth, 0.05))
    return out
