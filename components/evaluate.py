"""Component: evaluate the model on the test split and publish metrics, confusion matrix and the run report."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def evaluate(
    shards: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
    engine: str,
    best_params: dict = {},
    best_value: float = 0.0,
    tune_gpu_hours: float = 0.0,
    train_gpu_hours: float = 0.0,
    price_per_gpu_hour: float = 1.0,
    spot: bool = True,
    batch_size: int = 64,
    s3_endpoint_url: str = "",
    work_uri: str = "",
    run_id: str = "",
):
    """Evaluate on the test split, in this step's own container, for both engines.

    Publishes the scalar metrics (Metrics), the confusion matrix (ClassificationMetrics,
    drawn by the KFP UI), the run report (Markdown: data summary, best
    hyperparameters, test metrics, confusion matrix, GPU-hours and estimated cost)
    and ``metrics.json`` + ``confusion_matrix.png`` (the ``evaluation`` folder).

    Args:
        shards: The split (``metadata['uri']`` is the shards' prefix).
        model: The trained model folder.
        metrics: Output. accuracy, within1, rmse, mae, macro-f1, samples.
        confusion: Output. The confusion matrix (rows: true count, columns: predicted).
        report: Output. The run report.
        evaluation: Output. Folder with ``metrics.json`` and ``confusion_matrix.png``.
        engine: The engine the run used (for the report).
        best_params: The tuned hyperparameters (for the report).
        best_value: The best trial's val-accuracy (for the report).
        tune_gpu_hours: GPU-hours of the tune step.
        train_gpu_hours: GPU-hours of the train step.
        price_per_gpu_hour: Price of one GPU-hour, for the cost estimate.
        spot: Whether the GPUs were spot (preemptible) capacity: which kind of price ``price_per_gpu_hour`` is.
        batch_size: Images per forward pass.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        work_uri: Working store prefix, for the run's success marker (empty: no marker).
        run_id: The pipeline run id the marker is for.
    """
    import json
    import os
    import time

    from bincounter import evaluate as evaluate_lib
    from bincounter import report as report_lib
    from bincounter import runs
    from bincounter.data import shards as shards_lib

    start = time.monotonic()
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    data = shards.metadata.get("uri") or shards.path
    os.makedirs(evaluation.path, exist_ok=True)
    result = evaluate_lib.evaluate(model.path, data, "test", output=evaluation.path, batch_size=batch_size)
    for name in ("accuracy", "within1", "rmse", "mae", "macro_f1", "samples"):
        metrics.log_metric(name.replace("_", "-"), result[name])
    confusion.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    markdown = report_lib.render_markdown(
        split_manifest=shards_lib.read_manifest(data), best_params=best_params,
        best_value=best_value if best_params else None, test_metrics=result,
        gpu_hours={"tune": tune_gpu_hours, "train": train_gpu_hours}, price_per_gpu_hour=price_per_gpu_hour,
        capacity="spot" if spot else "on-demand", run={"engine": engine, "model": model.metadata.get("uri", model.path),
                                "architecture": model.metadata.get("arch", ""), "data": data})
    with open(report.path, "w") as f:
        f.write(markdown)
    metrics.metadata["seconds"] = round(time.monotonic() - start, 2)
    print(evaluate_lib.summary_line(result))
    print(json.dumps({k: result[k] for k in ("class_names", "confusion_matrix")}))
    if work_uri:  # last: the exit handler reads it as "evaluate finished" (bincounter/runs.py)
        runs.mark_succeeded(work_uri, run_id, "evaluate")
