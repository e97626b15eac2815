"""Component: train the counting model with DDP (PyTorchJob/TrainJob on a cluster, torchrun locally)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def train(
    shards: Input[Dataset],
    model: Output[Model],
    engine: str,
    work_uri: str,
    run_id: str,
    best_params: dict = {},
    epochs: int = 30,
    arch: str = "resnet50",
    max_count: int = 5,
    k_or_more: bool = True,
    input_size: int = 384,
    pretrained: str = "imagenet",
    extra_train_args: list = [],
    workers: int = 2,
    gpus_per_worker: int = 1,
    use_trainjob: bool = False,
    namespace: str = "",
    image_tag: str = "",
    spot: bool = True,
    deadline_minutes: int = 1440,
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
) -> NamedTuple("Outputs", [("gpu_hours", float), ("val_accuracy", float)]):
    """Train the final model with the tuned hyperparameters into ``{work_uri}/runs/{run_id}/model``.

    ``engine="kubernetes"`` runs a PyTorchJob (or a TrainJob with
    ``use_trainjob``) of ``workers`` pods with ``gpus_per_worker`` GPUs each;
    ``engine="local"`` runs ``torchrun`` with ``workers x max(1, gpus_per_worker)``
    processes, the same world size, so the same global batch. The ``model``
    artifact gets a copy of the model folder (``model.pt``, ``config.json``,
    ``metrics.json``); ``metadata['uri']`` is the folder in the working store,
    which the InferenceService's ``storageUri`` points at.

    Args:
        shards: The split (``metadata['uri']`` is the shards' prefix).
        model: Output. The model folder.
        engine: ``kubernetes`` or ``local``.
        work_uri: Working store prefix.
        run_id: The pipeline run id; names the job and the model folder.
        best_params: Searched hyperparameters from the tune step (``{}``: the trainer's defaults). The
            learning rate is searched per 256 images (``base-lr``), so it carries over to this job's
            global batch by the linear scaling rule.
        epochs: Training epochs.
        arch: Network (resnet18, resnet34, resnet50, convnext_tiny, efficientnet_v2_s).
        max_count: K; classes are counts 0..K.
        k_or_more: Train bins above K as the class "K or more" (False drops them: the published 0..5 task).
        input_size: Model input in pixels (the whole bin, resized).
        pretrained: ImageNet weights (``imagenet``: torchvision's DEFAULT; a path or ``s3://`` URI); empty: from scratch.
        extra_train_args: More ``bincounter train`` flags, e.g. ``["--label-smoothing", "0.1"]``.
        workers: Training pods (nodes), the master included.
        gpus_per_worker: GPUs per pod, one process each (0: CPU, one process per pod).
        use_trainjob: Run a Kubeflow Trainer v2 TrainJob instead of a PyTorchJob.
        namespace: Namespace of the job; empty: the namespace this step runs in.
        image_tag: Tag of the trainer image; empty: the tag this pipeline was compiled with.
        spot: Run on spot (preemptible) GPU nodes; checkpoints make a reclaimed node cost one epoch.
        deadline_minutes: Give up (and clean up) after this long.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        s3_secret: Secret with the S3 credentials, for the training pods.

    Returns:
        gpu_hours: GPU-hours the job held.
        val_accuracy: The shipped model's val-accuracy (best epoch, trained or EMA weights).
    """
    import json
    import os
    import time
    from collections import namedtuple

    from bincounter import engines, search_space, storage
    from bincounter.model import CONFIG_FILE, WEIGHTS_FILE

    start = time.monotonic()
    engines.check_engine(engine)
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    data = shards.metadata.get("uri") or shards.path
    out = storage.join(work_uri, "runs", run_id, "model")
    # --resume: a retried step (or a restarted job) continues from the last epoch's checkpoint.
    tuned = search_space.to_train_args(engines.normalize_params(best_params))
    args = engines.training_args(arch=arch, max_count=max_count, input_size=input_size, epochs=epochs,
                                 pretrained=pretrained, extra=["--resume", "--k-or-more" if k_or_more else "--no-k-or-more",
                                        *extra_train_args, *tuned])
    if engine == "local":
        from bincounter.engines import local

        result = local.train(data, out, args, nproc_per_node=engines.local_processes(workers, gpus_per_worker),
                             run_id=run_id, deadline_s=deadline_minutes * 60)
    else:
        from bincounter.engines import kubernetes

        result = kubernetes.train(data, out, args, workers=workers, gpus_per_worker=gpus_per_worker,
                                  use_trainjob=use_trainjob, run_id=run_id, namespace=namespace,
                                  image_tag=image_tag, spot=spot, s3_secret=s3_secret,
                                  deadline_s=deadline_minutes * 60)
    os.makedirs(model.path, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE, "metrics.json"):
        if storage.exists(storage.join(out, name)):
            storage.download_file(storage.join(out, name), os.path.join(model.path, name))
    config = json.loads(open(os.path.join(model.path, CONFIG_FILE)).read())
    model.metadata.update({"uri": out, "arch": config["arch"], "max_count": config["max_count"],
                           "input_size": config["input_size"], "metrics": result.metrics,
                           "seconds": round(time.monotonic() - start, 2)})
    print(f"model {out}: {result.metrics}")
    return namedtuple("Outputs", ["gpu_hours", "val_accuracy"])(
        result.gpu_hours, float(result.metrics.get(search_space.OBJECTIVE_METRIC, 0.0)))
