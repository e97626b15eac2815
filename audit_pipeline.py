"""The audit pipeline: score a bucket with a trained model and flag the bins to recount.

``python audit_pipeline.py`` compiles it to ``audit_pipeline.yaml`` (checked in; a test fails
when the file drifts from this code). Upload that file in the Kubeflow Pipelines UI, or run it
locally through ``kfp.local`` with ``engine=local``. ``docs/audit.md`` describes it.

On the cluster the scoring is an Indexed Job of ``workers`` pods (``bincounter.k8s.objects.audit_job``),
then this step merges their chunks: the table is an artifact, the report shows as HTML and
Markdown in the run's page.
"""

import argparse
import sys
from pathlib import Path

from kfp import compiler, dsl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `components` and `pipeline` next to this file

from components import audit  # noqa: E402
from pipeline import _on_cluster  # noqa: E402  (S3 credentials and step placement, as in the training pipeline)

PIPELINE_FILE = Path(__file__).resolve().parent / "audit_pipeline.yaml"


@dsl.pipeline(name="bincounter-audit", description="Inventory audit: flag the bins whose photo disagrees with "
                                                   "the warehouse system's expected quantity.")
def audit_pipeline(
    model_uri: str,
    source: str = "s3://aft-vbi-pds",
    threshold: float = 0.0,
    workers: int = 16,
    engine: str = "kubernetes",
    namespace: str = "",
    work_uri: str = "s3://bincounter",
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
    split: str = "",
    target_precision: float = 0.0,
    validation: str = "",
    inject_discrepancies: float = 0.0,
    seed: int = 0,
    limit: int = 0,
    gpus_per_worker: int = 0,
    spot: bool = True,
    deadline_minutes: int = 720,
    step_node_selector: dict = {},
    step_tolerations: list = [],
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    # No exit handler: the step cleans up after itself (the launcher deletes the Indexed Job on failure,
    # timeout or cancellation; local parts are stopped with the step), and a rerun resumes the chunks.
    task = _on_cluster(audit(
        model_uri=model_uri, source=source, engine=engine, work_uri=work_uri, run_id=run_id, split=split,
        threshold=threshold, target_precision=target_precision, validation=validation,
        inject_discrepancies=inject_discrepancies, seed=seed, limit=limit, workers=workers,
        gpus_per_worker=gpus_per_worker, namespace=namespace, spot=spot, deadline_minutes=deadline_minutes,
        s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret),
        s3_secret=s3_secret, node_selector=step_node_selector, tolerations=step_tolerations)
    task.set_caching_options(False)  # the bucket changes under the same parameters
    task.set_retry(num_retries=2, backoff_duration="60s")  # a retry resumes: finished chunks are kept


def compile_pipeline(path: str | Path = PIPELINE_FILE) -> Path:
    compiler.Compiler().compile(audit_pipeline, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the bincounter audit pipeline to YAML.")
    parser.add_argument("--output", default=str(PIPELINE_FILE), help="where to write the compiled pipeline")
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
