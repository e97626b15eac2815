"""The audit for one request: the model server's optional ``expected_quantity`` per image.

Pure functions over what a request carries; the server turns their ``ValueError`` into a 400.
``p_expected`` and ``flagged`` mean exactly what they mean in ``bincounter audit``.
"""

from __future__ import annotations

from typing import Any, Sequence

THRESHOLD_PARAMETER = "threshold"
EXPECTED_FIELD = "expected_quantity"


def parse_expected(value: Any, where: str) -> int:
    """One expected quantity: an integer >= 0 (JSON numbers like 3.0 are refused: a count is whole)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer >= 0 (the warehouse system's count), got {value!r}")
    if value < 0:
        raise ValueError(f"{where} must be >= 0, got {value}")
    return value


def parse_threshold(parameters: Any, default: float) -> float:
    """The request's ``parameters.threshold`` if given, else the model's ``audit_threshold``."""
    if not parameters or THRESHOLD_PARAMETER not in parameters:
        return default
    value = parameters[THRESHOLD_PARAMETER]
    if isinstance(value, str):  # V2 REST parameters may carry numbers as strings
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"parameters.threshold must be a number in (0, 1], got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"parameters.threshold must be a number in (0, 1], got {value!r}")
    return float(value)


def expected_class(expected: int, max_count: int, k_or_more: bool) -> int | None:
    """The class of an expected quantity; with "K or more" every count >= K is the last class."""
    if expected <= max_count:
        return expected
    return max_count if k_or_more else None


def judge(probabilities: Sequence[Sequence[float]], expected: Sequence[int | None], config,
          threshold: float) -> list[dict | None]:
    """``{"p_expected", "flagged"}`` per image with an expected quantity (``None`` for the others).

    Raises ``ValueError`` for an expected quantity the model has no class for (above K, no "K or more").
    """
    out: list[dict | None] = []
    for i, (probs, e) in enumerate(zip(probabilities, expected)):
        if e is None:
            out.append(None)
            continue
        k = expected_class(e, config.max_count, config.k_or_more)
        if k is None:
            raise ValueError(f"expected_quantity {e} of image {i} is above the model's K={config.max_count}, and the "
                             "model was not trained with --k-or-more: it cannot judge that bin")
        p = float(probs[k])
        out.append({"p_expected": p, "flagged": p < threshold})
    return out
