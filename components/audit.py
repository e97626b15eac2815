"""Components: the inventory audit, of any bucket with a given model (``audit``), or of the
training pipeline's own test split (``audit_test_split``). Both run ``bincounter.engines.audit``."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from bincounter.images import image  # compile time only: the image name, from its one definition

@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def audit(
    table: Output[Artifact],
    report: Output[HTML],
    report_markdown: Output[Markdown],
    metrics: Output[Metrics],
    model_uri: str,
    source: str,
    engine: str,
    work_uri: str,
    run_id: str,
    split: str = "",
    threshold: float = 0.0,
    target_precision: float = 0.0,
    validation: str = "",
    inject_discrepancies: float = 0.0,
    seed: int = 0,
    limit: int = 0,
    workers: int = 4,
    gpus_per_worker: int = 0,
    namespace: str = "",
    image_tag: str = "",
    spot: bool = False,
    deadline_minutes: int = 720,
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
) -> NamedTuple("Outputs", [("flagged", int), ("bins", int)]):
    """Flag the bins of ``source`` whose photo disagrees with their expected quantity.

    ``engine="kubernetes"`` scores with an Indexed Job of ``workers`` pods; ``engine="local"``
    with ``workers`` local processes. This step then merges their chunks into
    ``{work_uri}/audit/{run_id}``: ``audit.csv``, ``audit.jsonl`` and the report.

    Args:
        table: Output. ``audit.csv``, ``audit.jsonl``, ``summary.json`` and ``skipped.json``.
        report: Output. The report as one HTML page (thumbnails, p_expected, calibration).
        report_markdown: Output. The same report as Markdown (figures stay in the working store).
        metrics: Output. bins, flagged, skipped, threshold (and detection figures with injected discrepancies).
        model_uri: The model folder (``s3://`` prefix written by ``bincounter train``).
        source: An ABID bucket or prefix (``bin-images/`` + ``metadata/``), or a split folder with ``split``.
        engine: ``kubernetes`` or ``local``.
        work_uri: The working store; the audit lands under ``audit/{run_id}``.
        run_id: The pipeline run id.
        split: Read this split's shards of ``source`` (empty: ``source`` is in the ABID layout).
        threshold: Flag a bin when p_expected is below this (0: the model's audit_threshold).
        target_precision: Instead of ``threshold``: the largest threshold with this precision on ``validation``.
        validation: A split folder whose ``val`` split chooses the threshold for ``target_precision``.
        inject_discrepancies: Alter this fraction of expected quantities and measure detection (labelled data).
        seed: Seed of the injected discrepancies.
        limit: Audit only the first N bins (0: all).
        workers: Parts scored side by side (Indexed Job pods, or local processes).
        gpus_per_worker: GPUs per pod (kubernetes; 0 scores on CPU nodes).
        namespace: Namespace of the Job; empty: the namespace this step runs in.
        image_tag: Tag of the trainer image; empty: the tag this pipeline was compiled with.
        spot: Run the pods on spot nodes (a reclaimed node costs only its unfinished chunk).
        deadline_minutes: Give up (and clean up) after this long.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        s3_secret: Secret with the S3 credentials, for the Job's pods.

    Returns:
        flagged: Bins flagged for a recount.
        bins: Bins scored.
    """
    import os
    from collections import namedtuple

    from bincounter import storage
    from bincounter.engines import audit as audit_engine

    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    output = storage.join(work_uri, "audit", run_id)
    summary = audit_engine.run(
        engine=engine, model_uri=model_uri, source=source, output=output, split=split, threshold=threshold,
        target_precision=target_precision, validation=validation, inject_discrepancies=inject_discrepancies,
        seed=seed, limit=limit, parts=workers, gpus_per_pod=gpus_per_worker, run_id=run_id, namespace=namespace,
        image_tag=image_tag, spot=spot, s3_secret=s3_secret, deadline_s=deadline_minutes * 60)
    audit_engine.publish(summary, output, table_dir=table.path, report_html=report.path,
                         report_md=report_markdown.path, metrics=metrics)
    table.metadata.update({"uri": output, "bins": summary["bins"], "flagged": summary["flagged"]})
    print(f"audit of {source}: {summary['flagged']} of {summary['bins']} bins flagged")
    return namedtuple("Outputs", ["flagged", "bins"])(summary["flagged"], summary["bins"])


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def audit_test_split(
    shards: Input[Dataset],
    model: Input[Model],
    table: Output[Artifact],
    report: Output[HTML],
    report_markdown: Output[Markdown],
    metrics: Output[Metrics],
    engine: str,
    work_uri: str,
    run_id: str,
    inject_discrepancies: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    namespace: str = "",
    image_tag: str = "",
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
) -> NamedTuple("Outputs", [("flagged", int), ("bins", int)]):
    """Audit the training pipeline's test split with its new model, with injected discrepancies, so
    the run shows how well the model finds wrong expected quantities (precision, recall, AUROC).

    Args:
        shards: The split (``metadata['uri']`` is the shards' prefix).
        model: The trained model folder (``metadata['uri']`` in the working store).
        table: Output. ``audit.csv``, ``audit.jsonl``, ``summary.json`` and ``skipped.json``.
        report: Output. The report as one HTML page.
        report_markdown: Output. The same report as Markdown.
        metrics: Output. bins, flagged and the detection figures.
        engine: ``kubernetes`` or ``local``.
        work_uri: The working store; the audit lands under ``audit/{run_id}``.
        run_id: The pipeline run id.
        inject_discrepancies: Fraction of test bins whose expected quantity is altered by +-1..3.
        seed: Seed of the injected discrepancies.
        workers: Parts scored side by side (Indexed Job pods, or local processes).
        namespace: Namespace of the Job; empty: the namespace this step runs in.
        image_tag: Tag of the trainer image; empty: the tag this pipeline was compiled with.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        s3_secret: Secret with the S3 credentials, for the Job's pods.

    Returns:
        flagged: Bins flagged.
        bins: Bins scored.
    """
    import os
    from collections import namedtuple

    from bincounter import storage
    from bincounter.engines import audit as audit_engine

    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    data = shards.metadata.get("uri") or shards.path
    output = storage.join(work_uri, "audit", run_id, "test")
    summary = audit_engine.run(
        engine=engine, model_uri=model.metadata.get("uri") or model.path, source=data, output=output, split="test",
        inject_discrepancies=inject_discrepancies, seed=seed, parts=workers, run_id=run_id, namespace=namespace,
        image_tag=image_tag, s3_secret=s3_secret)
    audit_engine.publish(summary, output, table_dir=table.path, report_html=report.path,
                         report_md=report_markdown.path, metrics=metrics)
    table.metadata.update({"uri": output, "bins": summary["bins"], "flagged": summary["flagged"]})
    det = summary.get("detection") or {}
    print(f"audit of the test split: {summary['flagged']} of {summary['bins']} flagged; injected "
          f"discrepancies: precision={det.get('precision', 0):.3f} recall={det.get('recall', 0):.3f}")
    return namedtuple("Outputs", ["flagged", "bins"])(summary["flagged"], summary["bins"])
