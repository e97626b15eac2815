"""The audit as a pipeline step, on either engine: score in parts, then merge once.

``engine="kubernetes"``: the parts are the pods of an Indexed Job (``launchers.audit``);
``engine="local"``: the same ``bincounter audit --part i`` commands as local processes. Either
way this process then merges the chunk files into the table and the report.
"""

from __future__ import annotations

from typing import Any

from bincounter import engines


def run(*, engine: str, model_uri: str, source: str, output: str, split: str = "", threshold: float = 0.0,
        target_precision: float = 0.0, validation: str = "", inject_discrepancies: float = 0.0, seed: int = 0,
        limit: int = 0, parts: int = 1, gpus_per_pod: int = 0, run_id: str = "", namespace: str = "",
        image_tag: str = "", spot: bool = False, s3_secret: str = "bincounter-s3",
        deadline_s: float = 12 * 3600) -> dict[str, Any]:
    """Score ``source`` (a split's shards with ``split``) into ``output`` and merge; returns the summary.

    ``threshold`` 0 means the model's ``audit_threshold``; ``target_precision`` > 0 chooses it on
    ``validation`` instead. ``limit`` 0: every bin.
    """
    from bincounter.audit import cli as audit_cli

    engines.check_engine(engine)
    args: list[str] = []
    if split:
        args += ["--split", split]
    if inject_discrepancies:
        args += ["--inject-discrepancies", str(inject_discrepancies), "--seed", str(seed)]
    if limit:
        args += ["--limit", str(limit)]
    if engine == "local":
        from bincounter.engines import local

        local.audit(model_uri, source, output, args, parts=parts, run_id=run_id or None, deadline_s=deadline_s)
    else:
        from bincounter.engines import kubernetes

        kubernetes.audit(model_uri, source, output, args, parts=parts, gpus_per_pod=gpus_per_pod, run_id=run_id,
                         namespace=namespace, image_tag=image_tag or None, spot=spot, s3_secret=s3_secret,
                         deadline_s=deadline_s)
    return audit_cli.audit(model=model_uri, source=source, output=output, split=split,
                           threshold=threshold or None, target_precision=target_precision or None,
                           validation=validation, limit=limit or None, inject_discrepancies=inject_discrepancies,
                           seed=seed, merge_only=True, progress=False)


def publish(summary: dict, output: str, *, table_dir: str, report_html: str, report_md: str, metrics) -> None:
    """Copy the table and the report into a component's output artifacts and log the figures."""
    import os

    from bincounter import storage
    from bincounter.audit import core, report

    os.makedirs(table_dir, exist_ok=True)
    for name in (core.CSV_FILE, core.JSONL_FILE, core.SUMMARY_FILE, core.SKIPPED_FILE):
        storage.download_file(storage.join(output, name), os.path.join(table_dir, name))
    storage.download_file(storage.join(output, report.HTML_FILE), report_html)
    storage.download_file(storage.join(output, report.MD_FILE), report_md)
    metrics.log_metric("bins", summary["bins"])
    metrics.log_metric("flagged", summary["flagged"])
    metrics.log_metric("skipped", summary["skipped"])
    metrics.log_metric("threshold", summary["threshold"])
    for key, value in (summary.get("detection") or {}).items():
        if key in ("precision", "recall", "f1", "auroc", "precision_at_1pct", "precision_at_5pct") and value is not None:
            metrics.log_metric(key.replace("_", "-"), value)
