"""The Kubernetes engine: the pipeline's train, tune and deploy steps on a cluster.

A thin adapter from the engine interface the KFP components call (the same one as
``bincounter.engines.local``, returning ``TrainResult``, ``TuneResult`` and
``Deployment``) to the launchers in ``bincounter.k8s.launchers``. Every object is
labelled with the pipeline run id, so ``cleanup(run_id)`` (the exit handler) finds
what a failed or cancelled run left behind. An empty namespace means the step pod's
own namespace (the Kubeflow profile the run belongs to).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from bincounter import images, search_space, storage
from bincounter.engines import Deployment, TrainResult, TuneResult
from bincounter.k8s import launchers, objects as o

# Katib trial condition -> the optuna-style state the components count (as the local engine reports).
TRIAL_STATES = {"Succeeded": "COMPLETE", "EarlyStopped": "PRUNED", "Failed": "FAIL", "MetricsUnavailable": "FAIL",
                "Killed": "KILLED", "Running": "RUNNING", "Created": "RUNNING", "Pending": "PENDING"}
# Seconds between status checks (a Katib trial or a training epoch takes minutes).
POLL_S = {"train": 10.0, "tune": 15.0, "deploy": 5.0, "audit": 10.0}


def object_name(stage: str, run_id: str) -> str:
    """A DNS-1035 name per stage and run, short enough for Katib's trial and pod names."""
    short = re.sub(r"[^a-z0-9]", "", (run_id or "").lower())[:12] or "manual"
    return f"bincounter-{stage}-{short}"


def _image(role: str, image_tag: str | None) -> str:
    return images.image(role, tag_=image_tag or None)


def _final_metrics(model_uri: str) -> dict[str, float]:
    """The last epoch's metrics, from the metrics.json that bincounter.train writes next to the model."""
    uri = storage.join(model_uri, "metrics.json")
    if not storage.exists(uri):
        return {}
    final = json.loads(storage.read_bytes(uri)).get("final") or {}
    return {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}


def train(data: str, output: str, train_args: Sequence[str] = (), *, workers: int = 1, gpus_per_worker: int = 0,
          use_trainjob: bool = False, run_id: str = "", namespace: str = "",
          image_tag: str | None = None, spot: bool = False, s3_secret: str = o.S3_SECRET,
          deadline_s: float = 24 * 3600, cpu: str = "4", memory: str = "16Gi") -> TrainResult:
    """Run the training as a PyTorchJob (or TrainJob) with one process per GPU (one on CPU).

    use_trainjob says which kind to prefer; when the cluster has only the other one (Kubeflow
    1.11.0 installs Trainer v2 and no Training Operator) that one is used, with a log line.
    A retried step replaces the job of the same run; with ``--resume`` in train_args the
    new job continues from the last checkpoint in ``output``.
    """
    namespace = launchers.resolve_namespace(namespace)
    node_selector, tolerations = o.placement(spot, gpus_per_worker)
    client = launchers.load_api_client()
    kind = launchers.training_kind(launchers.Cluster(client), "TrainJob" if use_trainjob else "PyTorchJob")
    result = launchers.train(
        object_name("train", run_id), namespace, data_uri=data, model_uri=output, api_client=client,
        kind=kind, extra_args=list(train_args),
        image=_image("trainer", image_tag), workers=workers, nproc_per_node=max(1, gpus_per_worker),
        gpus_per_worker=gpus_per_worker, cpu=cpu, memory=memory, node_selector=node_selector,
        tolerations=tolerations, labels=launchers.run_labels(run_id) if run_id else None,
        s3_secret_name=s3_secret, timeout_s=deadline_s, poll_s=POLL_S["train"], replace=True)
    return TrainResult(model_uri=output, metrics=_final_metrics(output), seconds=result["seconds"],
                       gpu_hours=result["gpu_hours"])


def tune(data: str, output: str, fixed_args: Sequence[str] = (), *, trials: int = 12, parallelism: int = 2,
         max_failed_trials: int = 3, gpus_per_trial: int = 0, run_id: str = "",
         namespace: str = "", image_tag: str | None = None, spot: bool = False,
         s3_secret: str = o.S3_SECRET, deadline_s: float = 24 * 3600, algorithm: str = "tpe",
         cpu: str = "4", memory: str = "16Gi") -> TuneResult:
    """Run the Katib Experiment; trial models go under ``output/<trial name>``; writes
    ``output/tuning.json`` like the local engine."""
    namespace = launchers.resolve_namespace(namespace)
    node_selector, tolerations = o.placement(spot, gpus_per_trial)
    result = launchers.tune(
        object_name("tune", run_id), namespace, data_uri=data, trials_uri=output, extra_args=list(fixed_args),
        image=_image("trainer", image_tag), workers=1, nproc_per_node=max(1, gpus_per_trial),
        gpus_per_worker=gpus_per_trial, cpu=cpu, memory=memory, node_selector=node_selector,
        tolerations=tolerations, algorithm=algorithm, parallel_trials=min(parallelism, trials), max_trials=trials,
        max_failed_trials=max_failed_trials, labels=launchers.run_labels(run_id) if run_id else None,
        s3_secret_name=s3_secret, timeout_s=deadline_s, poll_s=POLL_S["tune"], replace=True)
    objective = search_space.OBJECTIVE_METRIC
    records: list[dict[str, Any]] = [
        {"name": t["name"], "state": TRIAL_STATES.get(t["state"], t["state"].upper()),
         "params": t["parameters"], "value": t[objective], "dir": storage.join(output, t["name"])}
        for t in result["trial_list"]]
    tuned = TuneResult(best_params=result["best_hyperparameters"],
                       best_value=float(result["best_metrics"].get(objective, float("nan"))),
                       trials=records, seconds=result["seconds"], gpu_hours=result["gpu_hours"])
    storage.write_bytes(storage.join(output, "tuning.json"), json.dumps({
        "objective": {"metric": objective, "goal": search_space.OBJECTIVE_GOAL},
        "best_params": tuned.best_params, "best_value": tuned.best_value, "best_trial": result["best_trial"],
        "trials": records, "seconds": tuned.seconds, "gpu_hours": tuned.gpu_hours, "fixed_args": list(fixed_args),
        "experiment": f"{namespace}/{result['name']}",
    }, indent=2).encode())
    return tuned


def deploy(model_uri: str, *, model_name: str = o.MODEL_NAME, run_id: str = "", namespace: str = "",
           image_tag: str | None = None, min_replicas: int = 1, max_replicas: int = 3,
           s3_secret: str = o.S3_SECRET, deadline_s: float = 1800,
           deployment_mode: str = "Serverless", canary_percent: int = 0) -> Deployment:
    """Create or update the InferenceService ``model_name`` and wait until it serves the new model.

    deployment_mode: ``Serverless`` (Knative, the releases' default) or ``RawDeployment``.
    canary_percent: 1..99 rolls the new model out as a canary with that share of the traffic
    (finish with ``bincounter k8s promote`` or undo with ``bincounter k8s rollback``); 0 replaces.

    ``s3_secret`` is found by KServe through the ``bincounter`` ServiceAccount (the manifests
    list it there); it is accepted for symmetry with train and tune and must match that Secret.
    The returned URL is the in-cluster address (a pipeline step calls it from inside the cluster).
    """
    if s3_secret != o.S3_SECRET:
        raise ValueError(f"The InferenceService reads S3 credentials through ServiceAccount {o.WORKLOAD_SA!r}, "
                         f"which lists Secret {o.S3_SECRET!r}; got s3_secret={s3_secret!r}. "
                         f"Name the Secret {o.S3_SECRET!r} or list it on the ServiceAccount.")
    namespace = launchers.resolve_namespace(namespace)
    result = launchers.deploy(model_name, namespace, storage_uri=model_uri, model_name=model_name,
                              image=_image("server", image_tag), min_replicas=min_replicas,
                              max_replicas=max_replicas, labels=launchers.run_labels(run_id) if run_id else None,
                              timeout_s=deadline_s, poll_s=POLL_S["deploy"], replace=True,
                              deployment_mode=deployment_mode, canary_percent=canary_percent)
    url = result["internal_url"] or result["url"]
    return Deployment(url=url, model_name=model_name, handle=f"{namespace}/{model_name}",
                      details={"external_url": result["url"], "internal_url": result["internal_url"],
                               "generation": result["generation"], "predict_v1": result["model_url"],
                               "traffic": result["traffic"],
                               "infer_v2": f"{url}/v2/models/{model_name}/infer", "client": {}})


def audit(model_uri: str, source: str, output: str, audit_args: Sequence[str] = (), *, parts: int = 1,
          gpus_per_pod: int = 0, run_id: str = "", namespace: str = "", image_tag: str | None = None,
          spot: bool = False, s3_secret: str = o.S3_SECRET, deadline_s: float = 12 * 3600, cpu: str = "4",
          memory: str = "8Gi") -> dict[str, Any]:
    """Score ``source`` with the audit's Indexed Job (pod i: part i of ``parts``); the caller merges.

    A retried step replaces the Job of the same run; its pods skip the chunks already scored.
    """
    namespace = launchers.resolve_namespace(namespace)
    node_selector, tolerations = o.placement(spot, gpus_per_pod)
    return launchers.audit(
        object_name("audit", run_id), namespace, model_uri=model_uri, source=source, output_uri=output,
        parts=parts, extra_args=list(audit_args), image=_image("trainer", image_tag), gpus_per_pod=gpus_per_pod,
        cpu=cpu, memory=memory, node_selector=node_selector, tolerations=tolerations,
        labels=launchers.run_labels(run_id) if run_id else None, s3_secret_name=s3_secret, timeout_s=deadline_s,
        poll_s=POLL_S["audit"], replace=True)


def cleanup(run_id: str, *, namespace: str = "") -> list[str]:
    """Delete the PyTorchJobs, TrainJobs and Experiments of a failed or cancelled run."""
    return launchers.cleanup_run(run_id, launchers.resolve_namespace(namespace))
