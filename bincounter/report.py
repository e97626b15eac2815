"""The run report: what a pipeline run did, how well the model counts, and what it cost.

``render_markdown`` turns the stages' results into the Markdown artifact the
evaluate component publishes (the KFP UI shows it under the run). Pure
functions, no kfp: the report can be rebuilt from the JSON files a run leaves.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

CAPACITY = ("spot", "on-demand")
REPORT_FILE = "report.md"
# How the report spells the metrics (the same names the KFP Metrics artifact shows).
METRIC_NAMES = {"within1": "within-1", "macro_f1": "macro-F1"}


def gpu_cost(gpu_hours: float, price_per_gpu_hour: float) -> float:
    """Estimated accelerator cost: GPU-hours x price per GPU-hour (same currency as the price)."""
    if gpu_hours < 0 or price_per_gpu_hour < 0:
        raise ValueError(f"GPU-hours and price must be >= 0, got {gpu_hours} and {price_per_gpu_hour}")
    return gpu_hours * price_per_gpu_hour


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(*, split_manifest: Mapping[str, Any], best_params: Mapping[str, Any], best_value: float | None,
                    test_metrics: Mapping[str, Any], gpu_hours: Mapping[str, float], price_per_gpu_hour: float,
                    capacity: str = "spot", run: Mapping[str, Any] | None = None,
                    trials: Sequence[Mapping[str, Any]] = (), currency: str = "USD",
                    images: Mapping[str, str] | None = None) -> str:
    """The run report as Markdown.

    ``split_manifest`` is the split's ``manifest.json``; ``test_metrics`` what
    ``bincounter.evaluate.evaluate`` returns; ``gpu_hours`` maps a stage name
    (``tune``, ``train``) to the GPU-hours it used; ``capacity`` says whether the
    price is a spot or on-demand price; ``run`` adds free-form facts (engine,
    architecture, data URI ...) to the header table; ``trials`` are the tuning trials
    as ``tuning.json`` lists them (name, state, params, value); ``currency`` names the
    price's currency; ``images`` maps a caption to an image source (a file name beside
    the report, or a ``data:`` URI so the KFP UI shows it inline).
    """
    if capacity not in CAPACITY:
        raise ValueError(f"Invalid capacity {capacity!r}. Only {', '.join(CAPACITY)} are supported.")
    out = ["# bincounter run report", ""]
    if run:
        out += _table(("", ""), [(k, _fmt(v)) for k, v in run.items()]) + [""]

    out += ["## Data", ""]
    splits = split_manifest.get("splits", {})
    classes = sorted({int(c) for s in splits.values() for c in s.get("class_counts", {})})
    out += _table(["split", "samples", "shards", *[f"count {c}" for c in classes]],
                  [(name, s.get("samples", 0), len(s.get("shards", [])),
                    *[s.get("class_counts", {}).get(str(c), 0) for c in classes]) for name, s in splits.items()])
    skipped = split_manifest.get("skipped_by_reason") or {}
    out += ["", f"Skipped records: {sum(skipped.values()) if skipped else 0}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""), ""]

    out += ["## Best hyperparameters", ""]
    if best_params:
        out += _table(("parameter", "value"), [(k, _fmt(v)) for k, v in best_params.items()])
        if best_value is not None:
            out += ["", f"Best trial val-accuracy: {best_value:.4f}"]
    else:
        out += ["Tuning was skipped; training used its default hyperparameters."]
    out += [""]
    if trials:
        names = sorted({k for t in trials for k in (t.get("params") or {})})
        out += ["## Tuning trials", ""]
        out += _table(["trial", "state", "val-accuracy", *names],
                      [(t.get("name", t.get("number", i)), t.get("state", ""), _fmt(t["value"]) if t.get("value") is not None else "",
                        *[_fmt((t.get("params") or {}).get(n, "")) for n in names]) for i, t in enumerate(trials)])
        out += [""]
    for caption, src in (images or {}).items():
        out += [f"## {caption}", "", f"![{caption}]({src})", ""]

    out += ["## Test metrics", ""]
    out += _table(("metric", "value"), [(METRIC_NAMES.get(k, k), _fmt(test_metrics[k])) for k in
                                       ("samples", "accuracy", "within1", "rmse", "mae", "macro_f1")
                                       if k in test_metrics])
    per_class = test_metrics.get("per_class") or []
    if per_class:
        out += ["", "Per class:", ""]
        out += _table(("class", "precision", "recall", "F1", "support"),
                      [(c["class"], _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), c["support"])
                       for c in per_class])
    cm = test_metrics.get("confusion_matrix")
    if cm:
        names = test_metrics.get("class_names") or [str(i) for i in range(len(cm))]
        out += ["", "Confusion matrix (rows: true count, columns: predicted count):", ""]
        out += _table(["true \\ predicted", *names], [(names[i], *row) for i, row in enumerate(cm)])
    out += [""]

    out += ["## Compute and cost", ""]
    total = sum(gpu_hours.values())
    rows = [(stage, f"{h:.3f}", f"{gpu_cost(h, price_per_gpu_hour):.2f} {currency}") for stage, h in gpu_hours.items()]
    rows.append(("total", f"{total:.3f}", f"{gpu_cost(total, price_per_gpu_hour):.2f} {currency}"))
    out += _table(("stage", "GPU-hours", "estimated cost"), rows)
    out += ["", f"Price: {price_per_gpu_hour:g} {currency} per GPU-hour ({capacity}). GPU-hours are wall time x GPUs "
                "held; CPU-only runs use none.", ""]
    return "\n".join(out)
