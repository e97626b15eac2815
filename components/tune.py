"""Component: tune hyperparameters (Katib Experiment on a cluster, optuna locally)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def tune(
    shards: Input[Dataset],
    tuning: Output[Metrics],
    engine: str,
    work_uri: str,
    run_id: str,
    trials: int = 12,
    parallelism: int = 3,
    max_failed_trials: int = 3,
    epochs: int = 3,
    arch: str = "resnet50",
    max_count: int = 5,
    k_or_more: bool = True,
    input_size: int = 384,
    pretrained: str = "imagenet",
    extra_train_args: list = [],
    gpus_per_trial: int = 1,
    namespace: str = "",
    image_tag: str = "",
    spot: bool = True,
    deadline_minutes: int = 720,
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
) -> NamedTuple("Outputs", [("best_params", dict), ("best_value", float), ("gpu_hours", float)]):
    """Search the shared space (``bincounter/search_space.py``) for the best val-accuracy.

    ``engine="kubernetes"`` runs a Katib Experiment whose trials are PyTorchJobs
    (one worker with ``gpus_per_trial`` GPUs each); ``engine="local"`` runs optuna
    with the same space, objective and median early stopping, each trial a
    one-process training run. Trial models go under ``{work_uri}/runs/{run_id}/tune``.
    ``trials=0`` skips tuning: training then uses its default hyperparameters.

    Args:
        shards: The split (``metadata['uri']`` is the shards' prefix).
        tuning: Output. Best val-accuracy and trial counts.
        engine: ``kubernetes`` or ``local``.
        work_uri: Working store prefix.
        run_id: The pipeline run id; names the Experiment and the trials' folder.
        trials: Maximum number of trials (0: skip tuning).
        parallelism: Trials running at the same time.
        max_failed_trials: The search fails after more failed trials than this.
        epochs: Epochs per trial (short: trials rank settings, they do not produce the model).
        arch: Network (resnet18, resnet34, resnet50, convnext_tiny, efficientnet_v2_s).
        max_count: K; classes are counts 0..K.
        k_or_more: Train bins above K as the class "K or more" (False drops them: the published 0..5 task).
        input_size: Model input in pixels (the whole bin, resized).
        pretrained: ImageNet weights (``imagenet``: torchvision's DEFAULT; a path or ``s3://`` URI); empty: from scratch.
        extra_train_args: More ``bincounter train`` flags for every trial, e.g. ``["--workers", "8"]``.
        gpus_per_trial: GPUs of each trial's pod (0: CPU).
        namespace: Namespace of the Experiment; empty: the namespace this step runs in (kubeconfig context off-cluster).
        image_tag: Tag of the trainer image; empty: the tag this pipeline was compiled with.
        spot: Run trials on spot (preemptible) GPU nodes.
        deadline_minutes: Give up (and clean up) after this long.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        s3_secret: Secret with the S3 credentials, for the trial pods.

    Returns:
        best_params: The best trial's hyperparameters by name (``{"lr": 0.001, ...}``); empty when skipped.
        best_value: The best trial's val-accuracy (0 when skipped).
        gpu_hours: GPU-hours the trials held.
    """
    import os
    import time
    from collections import namedtuple

    from bincounter import engines, storage

    outputs = namedtuple("Outputs", ["best_params", "best_value", "gpu_hours"])
    start = time.monotonic()
    engines.check_engine(engine)
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    if trials == 0:
        tuning.metadata["seconds"] = 0.0
        tuning.log_metric("trials", 0)
        return outputs({}, 0.0, 0.0)
    data = shards.metadata.get("uri") or shards.path
    out = storage.join(work_uri, "runs", run_id, "tune")
    fixed = engines.training_args(arch=arch, max_count=max_count, input_size=input_size, epochs=epochs,
                                  pretrained=pretrained,
                                  extra=["--k-or-more" if k_or_more else "--no-k-or-more", *extra_train_args])
    if engine == "local":
        from bincounter.engines import local

        result = local.tune(data, out, fixed, trials=trials, parallelism=parallelism,
                            max_failed_trials=max_failed_trials, nproc_per_node=1, run_id=run_id,
                            timeout_s=deadline_minutes * 60, trial_deadline_s=deadline_minutes * 60)
    else:
        from bincounter.engines import kubernetes

        result = kubernetes.tune(data, out, fixed, trials=trials, parallelism=parallelism,
                                 max_failed_trials=max_failed_trials, gpus_per_trial=gpus_per_trial,
                                 run_id=run_id, namespace=namespace, image_tag=image_tag, spot=spot,
                                 s3_secret=s3_secret, deadline_s=deadline_minutes * 60)
    states = [t.get("state", "") for t in result.trials]
    tuning.log_metric("best-val-accuracy", result.best_value)
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        tuning.log_metric(f"trials-{state.lower()}", states.count(state))
    tuning.log_metric("gpu-hours", result.gpu_hours)
    tuning.metadata.update({"best_params": result.best_params, "uri": out,
                            "seconds": round(time.monotonic() - start, 2)})
    print(f"best val-accuracy={result.best_value:.4f} params={result.best_params}")
    return outputs(result.best_params, result.best_value, result.gpu_hours)
