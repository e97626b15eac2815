"""The bincounter pipeline: download -> split -> tune -> train -> evaluate -> deploy.

``python pipeline.py`` compiles it to ``pipeline.yaml`` (checked in; a test
fails when the file drifts from this code). Upload that file in the Kubeflow
Pipelines UI, or run ``bincounter submit --host URL``. The same pipeline runs
on one machine through ``kfp.local`` with ``engine=local`` (``make demo``).
``docs/pipeline.md`` describes every parameter and the data flow.

Data flow: big data never goes through KFP's artifact store. Images, shards and
models live in the working store (``work_uri``, an ``s3://`` prefix that the
training pods and KServe can read); each artifact carries its location in
``metadata['uri']`` plus the small files worth seeing in the UI (manifests,
plots, the model folder).
"""

import argparse
import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `components` next to this file

from bincounter import images, storage  # noqa: E402
from bincounter.k8s import objects  # noqa: E402
from components import audit_test_split, check, cleanup, deploy, download, evaluate, split, train, tune  # noqa: E402

PIPELINE_FILE = Path(__file__).resolve().parent / "pipeline.yaml"
# The S3 Secret's keys, as bincounter.k8s.objects.s3_secret writes them: the credentials are
# required; endpoint and region (storage.S3_SETTINGS) are optional (AWS S3 needs neither).
S3_REQUIRED_KEYS = objects.S3_KEYS
S3_SETTINGS_DIR = "/etc/bincounter/s3"


def _on_cluster(task: dsl.PipelineTask, s3_secret, node_selector, tolerations) -> dsl.PipelineTask:
    """What every step pod needs on a cluster (kfp.local ignores it): the S3 Secret, and the
    pipeline's node selector and tolerations for step pods.

    Only the required keys become env variables. KFP backend 2.5.0 (Kubeflow 1.10.2) drops the
    ``optional`` flag of a secret-as-env mapping: its driver builds a ``SecretKeySelector`` with
    just the key (kubeflow/pipelines backend/src/v2/driver/driver.go at 2.5.0,
    ``extendPodSpecPatch``; 2.15.0 copies ``secretAsEnv.optional``), so a key missing from the
    Secret stops the pod. The whole Secret is mounted as files instead: a missing key is simply
    no file there, and ``bincounter.storage`` reads endpoint and region from the files it finds.
    """
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_REQUIRED_KEYS})
    kubernetes.use_secret_as_volume(task, secret_name=s3_secret, mount_path=S3_SETTINGS_DIR)
    task.set_env_variable(storage.S3_SETTINGS_DIR_ENV, S3_SETTINGS_DIR)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


@dsl.pipeline(name="bincounter", description="Count items in warehouse bin photos: download ABID, split into "
                                             "shards, tune (Katib), train (PyTorchJob DDP), evaluate, deploy (KServe).")
def bincounter_pipeline(
    engine: str = "kubernetes",
    namespace: str = "",
    work_uri: str = "s3://bincounter",
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
    source: str = "s3://aft-vbi-pds",
    source_endpoint_url: str = "https://s3.us-east-1.amazonaws.com",
    source_auth: str = "unsigned",
    file_list: str = "",
    limit: int = 0,
    download_concurrency: int = 32,
    refresh_download: bool = False,
    split_uri: str = "",
    max_count: int = 5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    short_side: int = 0,
    shard_size: int = 1000,
    train_ids: str = "",
    val_ids: str = "",
    k_or_more: bool = True,
    arch: str = "resnet50",
    pretrained: str = "imagenet",
    input_size: int = 384,
    epochs: int = 30,
    extra_train_args: list = [],
    workers: int = 2,
    gpus_per_worker: int = 1,
    use_trainjob: bool = False,
    tune_trials: int = 12,
    tune_parallelism: int = 3,
    tune_max_failed_trials: int = 3,
    tune_epochs: int = 3,
    tune_gpus_per_trial: int = 1,
    deploy_model: bool = True,
    canary_percent: int = 0,
    model_name: str = "bincounter",
    smoke_images: int = 4,
    image_tag: str = images.tag(),
    spot: bool = True,
    price_per_gpu_hour: float = 1.5,
    tune_deadline_minutes: int = 720,
    train_deadline_minutes: int = 1440,
    step_node_selector: dict = {},
    step_tolerations: list = [],
    audit_test: bool = False,
    download_workers: int = 0,
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    on_cluster = dict(s3_secret=s3_secret, node_selector=step_node_selector, tolerations=step_tolerations)

    # The exit handler learns how the run ended from the success markers that evaluate and deploy
    # write last (bincounter/runs.py), not from dsl.PipelineTaskFinalStatus: KFP backend 2.5.0
    # cannot compile that. A step added after deploy must write a marker too, and cleanup expect it.
    cleanup_task = _on_cluster(cleanup(engine=engine, work_uri=work_uri, run_id=run_id, deploy_model=deploy_model,
                                       namespace=namespace, s3_endpoint_url=s3_endpoint_url), **on_cluster)
    cleanup_task.set_caching_options(False)
    with dsl.ExitHandler(cleanup_task, name="run-and-clean-up-on-failure"):
        # First: the preflight stops a run that cannot work, with its table of checks. No S3 env:
        # a missing Secret must show in the table, not keep the pod from starting.
        check_task = check(engine=engine, namespace=namespace, s3_secret=s3_secret, use_trainjob=use_trainjob,
                           tune_trials=tune_trials, deploy_model=deploy_model, extra_train_args=extra_train_args)
        check_task.set_caching_options(False)
        kubernetes.add_node_selector_json(check_task, step_node_selector)
        kubernetes.add_toleration_json(check_task, step_tolerations)
        download_task = _on_cluster(download(
            work_uri=work_uri, source=source, source_endpoint_url=source_endpoint_url, source_auth=source_auth,
            file_list=file_list, max_count=max_count, k_or_more=k_or_more, limit=limit,
            concurrency=download_concurrency, s3_endpoint_url=s3_endpoint_url, split_uri=split_uri, refresh=refresh_download,
            deprecated_workers=download_workers), **on_cluster)
        download_task.after(check_task)
        # The result depends on the remote bucket, not on these inputs: never reuse an old one.
        download_task.set_caching_options(False)
        download_task.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)
        # s5cmd, the transfer engine, spreads the relay's 3-5 CPU-ms per object over the cores it
        # gets: 4 cover ~1,000 objects/s (docs/data.md). The Python engine would use one.
        download_task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("2G").set_memory_limit("4G")

        split_task = _on_cluster(split(
            raw=download_task.outputs["raw"], work_uri=work_uri, run_id=run_id, val=val_fraction,
            test=test_fraction, seed=split_seed, short_side=short_side, input_size=input_size, shard_size=shard_size,
            train_ids=train_ids, val_ids=val_ids, s3_endpoint_url=s3_endpoint_url, split_uri=split_uri),
            **on_cluster)
        split_task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2)
        split_task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("8G").set_memory_limit("16G")

        tune_task = _on_cluster(tune(
            shards=split_task.outputs["shards"], engine=engine, work_uri=work_uri, run_id=run_id,
            trials=tune_trials, parallelism=tune_parallelism, max_failed_trials=tune_max_failed_trials,
            epochs=tune_epochs, arch=arch, max_count=max_count, k_or_more=k_or_more, input_size=input_size,
            pretrained=pretrained,
            extra_train_args=extra_train_args, gpus_per_trial=tune_gpus_per_trial, namespace=namespace,
            image_tag=image_tag, spot=spot, deadline_minutes=tune_deadline_minutes,
            s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret), **on_cluster)

        train_task = _on_cluster(train(
            shards=split_task.outputs["shards"], best_params=tune_task.outputs["best_params"], engine=engine,
            work_uri=work_uri, run_id=run_id, epochs=epochs, arch=arch, max_count=max_count,
            k_or_more=k_or_more, input_size=input_size, pretrained=pretrained, extra_train_args=extra_train_args, workers=workers,
            gpus_per_worker=gpus_per_worker, use_trainjob=use_trainjob, namespace=namespace,
            image_tag=image_tag, spot=spot, deadline_minutes=train_deadline_minutes,
            s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret), **on_cluster)
        # Training passes --resume: a retry continues from the last checkpoint instead of starting over.
        train_task.set_retry(num_retries=1, backoff_duration="30s")

        evaluate_task = _on_cluster(evaluate(
            shards=split_task.outputs["shards"], model=train_task.outputs["model"], engine=engine,
            best_params=tune_task.outputs["best_params"], best_value=tune_task.outputs["best_value"],
            tune_gpu_hours=tune_task.outputs["gpu_hours"], train_gpu_hours=train_task.outputs["gpu_hours"],
            price_per_gpu_hour=price_per_gpu_hour, spot=spot, s3_endpoint_url=s3_endpoint_url, work_uri=work_uri,
            run_id=run_id), **on_cluster)
        evaluate_task.set_retry(num_retries=2, backoff_duration="60s")
        evaluate_task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("8G").set_memory_limit("16G")

        with dsl.If(deploy_model == True, name="deploy-if-enabled"):  # noqa: E712 (a KFP condition, not Python)
            deploy_task = _on_cluster(deploy(
                model=train_task.outputs["model"], shards=split_task.outputs["shards"], engine=engine,
                run_id=run_id, model_name=model_name, smoke_images=smoke_images, canary_percent=canary_percent,
                namespace=namespace, image_tag=image_tag, s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret,
                work_uri=work_uri), **on_cluster)
            deploy_task.after(evaluate_task)  # deploy only a model that has been evaluated
            deploy_task.set_caching_options(False)
            deploy_task.set_retry(num_retries=2, backoff_duration="30s")

        with dsl.If(audit_test == True, name="audit-test-split-if-enabled"):  # noqa: E712 (a KFP condition)
            audit_task = _on_cluster(audit_test_split(
                shards=split_task.outputs["shards"], model=train_task.outputs["model"], engine=engine,
                work_uri=work_uri, run_id=run_id, namespace=namespace, image_tag=image_tag,
                s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret), **on_cluster)
            audit_task.after(evaluate_task)


def compile_pipeline(path: str | Path = PIPELINE_FILE) -> Path:
    compiler.Compiler().compile(bincounter_pipeline, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the bincounter pipeline to YAML.")
    parser.add_argument("--output", default=str(PIPELINE_FILE), help="where to write the compiled pipeline")
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
