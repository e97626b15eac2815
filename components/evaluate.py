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
    currency: str = "USD",
):
    """Evaluate on the test split, in this step's own container, for both engines.

    Publishes the scalar metrics (Metrics), the confusion matrix (ClassificationMetrics,
    drawn by the KFP UI), the run report (Markdown: data summary, best
    hyperparameters, test metrics, confusion matrix, GPU-hours and estimated cost)
    and ``metrics.json`` + ``confusion_matrix.png`` (the ``evaluation`` folder).

    Args:
        shards: The split (``metadata['uri']`` is the shards' prefix).
        model: The trained model folder.
        metrics: Output. accuracy, within1, rmse, mae, macro_f1, samples.
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
        work_uri: Working store prefix; with ``run_id``, the report, metrics and plots are also
            written to ``{work_uri}/runs/{run_id}/evaluation`` (``bincounter runs show`` reads them
            there), and the run's success marker last (empty: neither).
        run_id: The pipeline run id.
        currency: Currency of ``price_per_gpu_hour``, shown in the report.
    """
    import base64
    import json
    import os
    import time

    from bincounter import evaluate as evaluate_lib
    from bincounter import plots, storage
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
        metrics.log_metric(name, result[name])  # the names of metrics.json, macro_f1 included
    confusion.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    history_file = os.path.join(model.path, "metrics.json")  # training's per-epoch record
    curves = None
    if os.path.exists(history_file):
        curves = plots.training_curves(json.load(open(history_file)).get("epochs") or [])
        with open(os.path.join(evaluation.path, "training_curves.png"), "wb") as f:
            f.write(curves)
    run_dir = storage.join(work_uri, "runs", run_id) if work_uri and run_id else ""
    tuning_uri = storage.join(run_dir, "tune", "tuning.json") if run_dir else ""
    trials = storage.read_json(tuning_uri, what="tuning record").get("trials", []) \
        if tuning_uri and storage.exists(tuning_uri) else []

    def render(image_src):
        return report_lib.render_markdown(
            split_manifest=shards_lib.read_manifest(data), best_params=best_params,
            best_value=best_value if best_params else None, test_metrics=result,
            gpu_hours={"tune": tune_gpu_hours, "train": train_gpu_hours}, price_per_gpu_hour=price_per_gpu_hour,
            capacity="spot" if spot else "on-demand", currency=currency, trials=trials,
            images={"Training curves": image_src} if curves else {},
            run={"run": run_id, "engine": engine, "model": model.metadata.get("uri", model.path),
                 "architecture": model.metadata.get("arch", ""), "data": data})

    # The KFP UI shows the Markdown artifact on its own: the curves go inline as a data URI.
    with open(report.path, "w") as f:
        f.write(render("data:image/png;base64," + base64.b64encode(curves).decode() if curves else ""))
    with open(os.path.join(evaluation.path, report_lib.REPORT_FILE), "w") as f:
        f.write(render("training_curves.png"))  # beside the PNG, in the evaluation folder
    if run_dir:  # kept with the run in the working store, for `bincounter runs show`
        for name in sorted(os.listdir(evaluation.path)):
            storage.upload_file(os.path.join(evaluation.path, name), storage.join(run_dir, "evaluation", name))
    metrics.metadata["seconds"] = round(time.monotonic() - start, 2)
    print(evaluate_lib.summary_line(result))
    print(json.dumps({k: result[k] for k in ("class_names", "confusion_matrix")}))
    if work_uri:  # last: the exit handler reads it as "evaluate finished" (bincounter/runs.py)
        runs.mark_succeeded(work_uri, run_id, "evaluate")
