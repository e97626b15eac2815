"""Pure parts of the audit: detection metrics, temperature scaling, ECE, injected discrepancies.

Every expected value is worked out by hand in the comments or follows from a known construction.
"""

from __future__ import annotations

import numpy as np
import pytest

from bincounter import calibration
from bincounter.audit import core
from bincounter.audit import metrics as m

# Six bins; discrepant ones are 1, 2, 5 (truth). p_expected, sorted: 0.05(b1,T) 0.1(b2,T) 0.2(b0,F)
# 0.4(b5,T) 0.6(b3,F) 0.9(b4,F).
P = [0.2, 0.05, 0.1, 0.6, 0.9, 0.4]
T = [False, True, True, False, False, True]


def test_precision_recall_f1_at_threshold_by_hand():
    r = m.at_threshold(P, T, 0.3)  # flags b1, b2, b0: 2 true positives, 1 false positive, b5 missed
    assert (r["flagged"], r["true_positives"], r["false_positives"], r["false_negatives"]) == (3, 2, 1, 1)
    assert (r["precision"], r["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert r["f1"] == pytest.approx(2 / 3)
    assert m.at_threshold(P, T, 0.01)["precision"] == 0.0  # nothing flagged: 0, not NaN


def test_auroc_by_hand_with_ties():
    # Positive scores -p: 0.05,0.1,0.4 vs negatives 0.2,0.6,0.9. Pairs where the positive is lower:
    # 0.05: 3, 0.1: 3, 0.4: 2 (beats 0.6, 0.9) -> 8 of 9.
    assert m.auroc(P, T) == pytest.approx(8 / 9)
    # A tie between a positive and a negative counts one half.
    assert m.auroc([0.1, 0.1], [True, False]) == pytest.approx(0.5)
    assert m.auroc([0.1, 0.2], [True, True]) is None


def test_precision_at_top_fraction():
    # top ceil(0.34 * 6) = 3 lowest: b1 T, b2 T, b0 F -> 2/3; top 1 (ceil(0.01*6)): b1 -> 1.0
    assert m.precision_at_top(P, T, 0.34) == pytest.approx(2 / 3)
    assert m.precision_at_top(P, T, 0.01) == 1.0


def test_threshold_for_precision_picks_the_largest_that_reaches_it():
    # Cuts: after b1 (1/1), b2 (2/2), b0 (2/3), b5 (3/4), b3 (3/5), b4 (3/6).
    r = m.threshold_for_precision(P, T, 0.75)  # the cut after b5 (3/4) is the largest with >= 0.75
    assert 0.4 < r["threshold"] <= 0.6
    assert (r["flagged"], r["precision"], r["recall"]) == (4, 0.75, 1.0)
    assert m.threshold_for_precision(P, T, 1.0)["flagged"] == 2
    assert m.threshold_for_precision([0.5, 0.5], [True, False], 0.9) is None  # a tie cannot be split
    with pytest.raises(ValueError, match="target-precision"):
        m.threshold_for_precision(P, T, 1.5)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 6))
    true_t = 2.5
    probs = calibration.softmax(logits, true_t)
    labels = np.array([rng.choice(6, p=p) for p in probs])
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.08)
    # The fitted temperature is the NLL minimum: nearby temperatures are worse.
    assert calibration.nll(logits, labels, t) < min(calibration.nll(logits, labels, t * 0.8),
                                                     calibration.nll(logits, labels, t * 1.25))
    result = calibration.calibrate(logits, labels)
    assert result["ece_after"] < result["ece_before"]
    assert result["nll_after"] < result["nll_before"]


def test_ece_by_hand():
    # Two bins used: conf 0.9 (2 samples, 1 right -> |0.5-0.9| = 0.4), conf 0.6 (2 samples, 2 right -> 0.4).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = [0, 1, 1, 1]
    assert calibration.ece(probs, labels) == pytest.approx(0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.ece(perfect, [0, 1]) == pytest.approx(0.0)


def test_injected_discrepancies_are_deterministic_bounded_and_near_the_fraction():
    ids = [f"{i:05d}" for i in range(2000)]
    expected = [i % 6 for i in range(2000)]
    a = [core.inject(i, e, 0.2, 7, max_count=5, k_or_more=False) for i, e in zip(ids, expected)]
    b = [core.inject(i, e, 0.2, 7, max_count=5, k_or_more=False) for i, e in zip(ids, expected)]
    assert a == b  # the same seed and id give the same alteration, in any order or process
    altered = [(e, x) for e, x in zip(expected, a) if x is not None]
    assert 0.17 < len(altered) / len(ids) < 0.23
    assert all(1 <= abs(x - e) <= 3 and 0 <= x <= 5 for e, x in altered)
    other = [core.inject(i, e, 0.2, 8, max_count=5, k_or_more=False) for i, e in zip(ids, expected)]
    assert other != a
    # With a "K or more" model the altered count may go above K, never below 0.
    wide = [core.inject(i, 5, 0.5, 0, max_count=5, k_or_more=True) for i in ids]
    assert any(x is not None and x > 5 for x in wide) and all(x is None or x >= 2 for x in wide)
    assert all(core.inject(i, 0, 1 - 1e-9, 0, 5, False) in (1, 2, 3) for i in ids[:50])
