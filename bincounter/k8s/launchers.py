"""Run a training job, a Katib Experiment, an InferenceService or the audit's Indexed Job to the end.

Each launcher builds its object from the one definition in ``bincounter.k8s.objects``,
creates it (or replaces an existing one of the same name when asked), waits on the
real controller conditions against a deadline, reports progress, and returns what
the next pipeline step needs. On failure or timeout it prints the failing pod's last
log lines, cleans up as configured and raises ``LaunchError``; a cancelled wait
(Ctrl-C, or SIGTERM from a pipeline cancel) cleans up too and re-raises.

The cluster is reached through the official ``kubernetes`` client; pass an
``ApiClient`` to point it elsewhere (tests use an HTTP test double of the API server).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from bincounter import search_space
from bincounter.k8s import objects as o
from bincounter.k8s.cluster import (  # noqa: F401  (LaunchError, load_api_client, resolve_namespace: public here too)
    CLEANUP_CHOICES, Cancelled, Cluster, LaunchError, Log, create, load_api_client, pod_selector,
    print_failing_pod_logs, print_flush, resolve_namespace, run_to_end, sigterm_cancels, wait_for)


# ---------------------------------------------------------------- conditions

def condition(obj: Mapping | None, type_: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(obj: Mapping | None, type_: str) -> bool:
    c = condition(obj, type_)
    return bool(c) and c.get("status") == "True"


def _why(obj: Mapping, type_: str) -> str:
    c = condition(obj, type_) or {}
    return ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or type_


def _state(obj: Mapping | None) -> str:
    """The condition types that are True, in order (e.g. 'Created,Running')."""
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return ",".join(c["type"] for c in conds if c.get("status") == "True") or "Pending"


def training_done(kind: str, obj: Mapping) -> tuple[bool, str | None]:
    """(finished, failure reason or None) from the controller's conditions."""
    ok, failed = ("Succeeded", "Failed") if kind == "PyTorchJob" else ("Complete", "Failed")
    if is_true(obj, failed):
        return True, _why(obj, failed)
    return is_true(obj, ok), None


def experiment_done(obj: Mapping) -> tuple[bool, str | None]:
    if is_true(obj, "Failed"):
        return True, _why(obj, "Failed")
    if is_true(obj, "Succeeded"):
        best = (obj.get("status") or {}).get("currentOptimalTrial") or {}
        if not best.get("parameterAssignments"):
            return True, (f"succeeded without a best trial ({_why(obj, 'Succeeded')}): "
                          f"no trial reported {search_space.OBJECTIVE_METRIC}")
        return True, None
    return False, None


# KServe marks a model that cannot load (modelStatus.transitionStatus), and Knative a revision
# that cannot start (reason RevisionFailed); both are final until the spec changes.
_ISVC_FINAL_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


def predictor_revisions(obj: Mapping | None) -> tuple[str | None, str | None]:
    """(latestCreatedRevision, latestReadyRevision) of a Serverless predictor (KServe copies them
    from the Knative Configuration: pkg/apis/serving/v1beta1/component_status.go)."""
    pred = (((obj or {}).get("status") or {}).get("components") or {}).get("predictor") or {}
    return pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")


def _isvc_failure(obj: Mapping) -> str | None:
    status = obj.get("status") or {}
    transition = (status.get("modelStatus") or {}).get("transitionStatus")
    if transition in _ISVC_FINAL_TRANSITIONS:
        info = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
        return f"model {transition}: {info.get('reason', '')} {info.get('message', '')}".strip()
    for c in status.get("conditions") or []:
        if c.get("status") == "False" and c.get("reason") == "RevisionFailed":
            return f"{c['type']}: {c.get('reason')}: {c.get('message', '')}"
    return None


def isvc_done(obj: Mapping, old_revision: str | None = None, new_revision_expected: bool = True,
              serverless: bool = True) -> tuple[bool, str | None]:
    """Whether a Serverless rollout has finished: Ready, and the latest created revision is the
    ready one (the revision that serves) and is not the revision from before our change.

    NOT status.observedGeneration: KServe copies it from the Knative Service (or the
    Deployment), whose generation is not the InferenceService's metadata.generation, so it
    can claim an old Ready as ours. A change that leaves the pod template alone creates no
    revision (new_revision_expected=False). RawDeployment (serverless=False) has no revisions:
    Ready here, then the Deployment's rollout (deployment_rolled_out)."""
    failure = _isvc_failure(obj)
    if failure:
        return True, failure
    if not is_true(obj, "Ready"):
        return False, None
    if not serverless:
        return True, None
    created, ready = predictor_revisions(obj)
    if not created or created != ready:
        return False, None
    return (not new_revision_expected or created != old_revision), None


def deployment_rolled_out(dep: Mapping | None) -> tuple[bool, str | None]:
    """`kubectl rollout status` for a Deployment: the controller saw the newest spec, every
    replica runs it and is available, and no old replica is left."""
    if not dep:
        return False, None
    spec, st = dep.get("spec") or {}, dep.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return True, f"Deployment {dep['metadata']['name']}: {c.get('message', 'ProgressDeadlineExceeded')}"
    want = spec.get("replicas", 1)
    done = (st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 1)
            and st.get("updatedReplicas", 0) >= want and st.get("replicas", 0) == st.get("updatedReplicas", 0)
            and st.get("availableReplicas", 0) >= st.get("updatedReplicas", 0))
    return done, None


def job_done(obj: Mapping) -> tuple[bool, str | None]:
    """A batch/v1 Job ends with condition Complete or Failed (Kubernetes pkg/controller/job; since 1.31
    SuccessCriteriaMet / FailureTarget come first, while pods still terminate: wait for the final one)."""
    if is_true(obj, "Failed"):
        return True, _why(obj, "Failed")
    return is_true(obj, "Complete"), None


def _gpu_hours(start: str | None, end: str | None, gpus: int) -> float:
    from datetime import datetime

    if not (start and end and gpus):
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return max(0.0, (parse(end) - parse(start)).total_seconds()) * gpus / 3600


# ---------------------------------------------------------------- discovery

def discover_trainjob_api(cluster: Cluster, log: Log = print_flush) -> str:
    api = cluster.trainjob_api()
    if api is None:
        api = o.TRAINJOB_API_DEFAULT
        log(f"could not read the TrainJob schema from the API server; assuming Trainer v2.1 ({api})")
    return api


def training_kind(cluster: Cluster, prefer: str = "PyTorchJob", log: Log = print_flush) -> str:
    """prefer when its CRD is installed, else the other training kind (Kubeflow 1.11.0 installs
    Trainer v2 and no Training Operator); LaunchError when neither is installed."""
    other = "TrainJob" if prefer == "PyTorchJob" else "PyTorchJob"
    for kind in (prefer, other):
        if cluster.installed(kind):
            if kind != prefer:
                log(f"{prefer} is not installed on this cluster: using {kind}")
            return kind
    raise LaunchError("neither PyTorchJob (kubeflow.org/v1, Training Operator) nor TrainJob "
                      "(trainer.kubeflow.org/v1alpha1, Trainer v2) is installed; run `bincounter k8s check`")


# ---------------------------------------------------------------- the three launchers

def train(name: str, namespace: str = o.DEFAULT_NAMESPACE, *, data_uri: str, model_uri: str,
          kind: str = "PyTorchJob", extra_args: Sequence[str] = (), image: str | None = None,
          workers: int = 1, nproc_per_node: int = 1, gpus_per_worker: int = 0, cpu: str = "4",
          memory: str = "16Gi", node_selector: Mapping[str, str] | None = None,
          tolerations: Sequence[Mapping] | None = None, labels: Mapping[str, str] | None = None,
          service_account_name: str = o.WORKLOAD_SA, s3_secret_name: str = o.S3_SECRET,
          timeout_s: float = 24 * 3600, poll_s: float = 10.0, replace: bool = False,
          cleanup: str = "on-failure", report_every_s: float = 60.0, api_client: k8s.ApiClient | None = None,
          log: Log = print_flush, trainjob_api: str | None = None) -> dict[str, Any]:
    """Run ``bincounter.train`` as a PyTorchJob (Training Operator v1) or TrainJob (Trainer v2).

    A TrainJob uses the pod-customisation API of the installed Trainer (trainjob_api, found
    by discovery when None: podTemplateOverrides on v2.1, runtimePatches from v2.2).

    Returns {"model_uri", "kind", "name", "namespace", "seconds", "gpu_hours"}.
    Raises LaunchError when the job fails or misses the deadline (after printing the
    failing pod's log and, with cleanup="on-failure" or "always", deleting the job).
    """
    if kind not in ("PyTorchJob", "TrainJob"):
        raise ValueError(f"Invalid kind {kind!r}. Only PyTorchJob and TrainJob are supported.")
    cluster = Cluster(api_client)
    extra = {"api": trainjob_api or discover_trainjob_api(cluster, log)} if kind == "TrainJob" else {}
    builder = o.pytorchjob if kind == "PyTorchJob" else o.trainjob
    obj = builder(name, namespace, data_uri=data_uri, model_uri=model_uri, extra_args=extra_args, image=image,
                  workers=workers, nproc_per_node=nproc_per_node,
                  resources=o.Resources(cpu=cpu, memory=memory, gpus=gpus_per_worker),
                  node_selector=node_selector, tolerations=tolerations, labels=labels,
                  service_account_name=service_account_name, s3_secret_name=s3_secret_name, **extra)
    started = time.monotonic()

    def describe(cur):
        replicas = (cur.get("status") or {}).get("replicaStatuses") or {}
        counts = " ".join(f"{r}(active={s.get('active', 0)} ok={s.get('succeeded', 0)} failed={s.get('failed', 0)})"
                          for r, s in replicas.items())
        return f"{_state(cur)} {counts}".strip()

    final = run_to_end(cluster, obj, done=lambda cur: training_done(kind, cur), describe=describe,
                       timeout_s=timeout_s, poll_s=poll_s, replace=replace, cleanup=cleanup, log=log,
                       report_every_s=report_every_s, log_selector=pod_selector(kind, name),
                       primary=o.TRAIN_CONTAINER if kind == "PyTorchJob" else None)
    status = final.get("status") or {}
    seconds = time.monotonic() - started
    gpus = workers * gpus_per_worker
    gpu_hours = _gpu_hours(status.get("startTime"), status.get("completionTime"), gpus) or seconds * gpus / 3600
    log(f"{kind} {name} succeeded: model at {model_uri}")
    return {"model_uri": model_uri, "kind": kind, "name": name, "namespace": namespace,
            "seconds": round(seconds, 1), "gpu_hours": round(gpu_hours, 4)}


TRIAL_GVP = ("kubeflow.org", "v1beta1", "trials")


def parse_best_trial(experiment: Mapping) -> dict[str, Any]:
    """Best hyperparameters, typed back through the search space, from status.currentOptimalTrial."""
    best = (experiment.get("status") or {}).get("currentOptimalTrial") or {}
    params: dict[str, Any] = {}
    for a in best.get("parameterAssignments") or []:
        p = search_space.by_name(a["name"])
        if p.kind == "double":
            params[p.name] = float(a["value"])
        elif p.kind == "int":
            params[p.name] = int(float(a["value"]))
        else:  # Katib returns categorical values as strings: give back the original choice
            params[p.name] = next(c for c in p.choices if str(c) == a["value"])
    metrics: dict[str, float] = {}
    for m in (best.get("observation") or {}).get("metrics") or []:
        # The objective as Katib ranked it (its best epoch: metricStrategies max); the others as last seen.
        value = m.get("max") if m["name"] == search_space.OBJECTIVE_METRIC else m.get("latest")
        try:
            metrics[m["name"]] = float(value)
        except (TypeError, ValueError):  # missing, or Katib's "unavailable"
            pass
    return {"best_trial": best.get("bestTrialName"), "best_hyperparameters": params, "best_metrics": metrics}


TRIAL_STATES = ("Succeeded", "Failed", "EarlyStopped", "MetricsUnavailable", "Killed", "Running", "Created")


def _trial_summary(trial: Mapping) -> dict[str, Any]:
    """name, state (the first True Katib trial condition of TRIAL_STATES), parameters, objective."""
    state = next((s for s in TRIAL_STATES if is_true(trial, s)), "Pending")
    spec, status = trial.get("spec") or {}, trial.get("status") or {}
    params = {a["name"]: a["value"] for a in spec.get("parameterAssignments") or []}
    metrics = {m["name"]: m.get("max") or m.get("latest") for m in (status.get("observation") or {}).get("metrics") or []}
    value = metrics.get(search_space.OBJECTIVE_METRIC)
    try:
        value = float(value) if value is not None else None
    except ValueError:  # Katib writes "unavailable"
        value = None
    return {"name": trial["metadata"]["name"], "state": state, "parameters": params,
            search_space.OBJECTIVE_METRIC: value}


def tune(name: str, namespace: str = o.DEFAULT_NAMESPACE, *, data_uri: str, trials_uri: str,
         extra_args: Sequence[str] = (), image: str | None = None, workers: int = 1, nproc_per_node: int = 1,
         gpus_per_worker: int = 0, cpu: str = "4", memory: str = "16Gi",
         node_selector: Mapping[str, str] | None = None, tolerations: Sequence[Mapping] | None = None,
         algorithm: str = "tpe", parallel_trials: int = 2, max_trials: int = 12, max_failed_trials: int = 3,
         labels: Mapping[str, str] | None = None, service_account_name: str = o.WORKLOAD_SA,
         s3_secret_name: str = o.S3_SECRET, timeout_s: float = 24 * 3600, poll_s: float = 15.0,
         replace: bool = False, cleanup: str = "on-failure", report_every_s: float = 60.0,
         api_client: k8s.ApiClient | None = None, log: Log = print_flush,
         trial_kind: str | None = None) -> dict[str, Any]:
    """Run the Katib Experiment to Succeeded and return the best trial.

    Trials are PyTorchJobs, or TrainJobs where the Training Operator is not installed
    (trial_kind None: found by API discovery; Katib >= 0.19 lists TrainJob in its trial
    resources).

    Returns {"best_hyperparameters": {"lr": 0.0012, "batch-size": 32, ...} (typed as in
    bincounter.search_space), "best_metrics": {"val-accuracy": ...}, "best_trial",
    "best_model_uri" (trials_uri/<best trial>), "trials" ({"succeeded": n, ...}),
    "name", "namespace", "seconds", "gpu_hours"}.
    """
    cluster = Cluster(api_client)
    trial_kind = trial_kind or training_kind(cluster, "PyTorchJob", log)
    trainjob_api = discover_trainjob_api(cluster, log) if trial_kind == "TrainJob" else o.TRAINJOB_API_DEFAULT
    obj = o.experiment(name, namespace, data_uri=data_uri, trials_uri=trials_uri, extra_args=extra_args,
                       image=image, workers=workers, nproc_per_node=nproc_per_node,
                       resources=o.Resources(cpu=cpu, memory=memory, gpus=gpus_per_worker),
                       node_selector=node_selector, tolerations=tolerations, algorithm=algorithm,
                       parallel_trials=parallel_trials, max_trials=max_trials, max_failed_trials=max_failed_trials,
                       labels=labels, service_account_name=service_account_name, s3_secret_name=s3_secret_name,
                       trial_kind=trial_kind, trainjob_api=trainjob_api)
    started = time.monotonic()

    def describe(cur):
        st = cur.get("status") or {}
        counts = ", ".join(f"{k.removeprefix('trials').lower() or 'created'}={st[k]}" for k in
                           ("trials", "trialsRunning", "trialsSucceeded", "trialsFailed", "trialsEarlyStopped")
                           if st.get(k))
        best = parse_best_trial(cur)
        score = best["best_metrics"].get(search_space.OBJECTIVE_METRIC)
        tail = f"; best {search_space.OBJECTIVE_METRIC}={score} ({best['best_trial']})" if score is not None else ""
        return f"{_state(cur)} trials: {counts or 'none yet'}{tail}"

    def show_failed_trial():
        # The experiment has no pods of its own: show a failed trial's primary pod. Katib's StdOut
        # collector redirects the training output into a file that its injected container prints,
        # so the output is in that container's log (the trial's job is kept: retain=true).
        try:
            trials = cluster.list(TRIAL_GVP, namespace, f"katib.kubeflow.org/experiment={name}")
        except ApiException:
            return
        failed = [t for t in trials if is_true(t, "Failed") or is_true(t, "MetricsUnavailable")]
        if failed:
            t = failed[-1]["metadata"]["name"]
            print_failing_pod_logs(cluster, namespace, pod_selector(trial_kind, t), log,
                                   container=o.KATIB_COLLECTOR_CONTAINER)

    final = run_to_end(cluster, obj, done=experiment_done, describe=describe, timeout_s=timeout_s, poll_s=poll_s,
                       replace=replace, cleanup=cleanup, log=log, report_every_s=report_every_s,
                       log_selector=None, primary=None, on_failure=show_failed_trial)
    result = parse_best_trial(final)
    st = final.get("status") or {}
    gpu_hours, trial_list = 0.0, []
    try:
        for t in cluster.list(TRIAL_GVP, namespace, f"katib.kubeflow.org/experiment={name}"):
            ts = t.get("status") or {}
            gpu_hours += _gpu_hours(ts.get("startTime"), ts.get("completionTime"), workers * gpus_per_worker)
            trial_list.append(_trial_summary(t))
    except ApiException as e:
        log(f"could not list trials: {e.status} {e.reason}")
    result.update({
        "trial_list": trial_list,
        "best_model_uri": f"{trials_uri.rstrip('/')}/{result['best_trial']}",
        "trials": {k.removeprefix("trials").lower(): st.get(k, 0)
                   for k in ("trialsSucceeded", "trialsFailed", "trialsEarlyStopped", "trialsKilled")},
        "name": name, "namespace": namespace,
        "seconds": round(time.monotonic() - started, 1), "gpu_hours": round(gpu_hours, 4),
    })
    log(f"Experiment {name} succeeded: best {result['best_hyperparameters']} {result['best_metrics']}")
    return result


def deploy(name: str = o.MODEL_NAME, namespace: str = o.DEFAULT_NAMESPACE, *, storage_uri: str,
           model_name: str = o.MODEL_NAME, image: str | None = None, cpu: str = "1", memory: str = "2Gi", min_replicas: int = 1,
           max_replicas: int = 3, scale_metric: str | None = None, scale_target: int = 8,
           node_selector: Mapping[str, str] | None = None, tolerations: Sequence[Mapping] | None = None,
           labels: Mapping[str, str] | None = None, service_account_name: str = o.WORKLOAD_SA,
           timeout_s: float = 1800, poll_s: float = 5.0, replace: bool = True, cleanup: str = "on-failure",
           report_every_s: float = 60.0, api_client: k8s.ApiClient | None = None,
           log: Log = print_flush, deployment_mode: str = "Serverless", canary_percent: int = 0,
           grpc: bool = False) -> dict[str, Any]:
    """Create or update the InferenceService and wait until its new model serves.

    canary_percent (1..99, Serverless): the new model gets that share of the traffic, the last
    fully rolled-out one the rest, until ``promote`` or ``rollback``; 0 replaces the model.

    Serverless: Ready, with latestReadyRevision == latestCreatedRevision and that revision
    new (see isvc_done). RawDeployment: Ready and the predictor Deployment rolled out.

    An existing InferenceService of the same name is UPDATED in place (replace=True,
    the default): KServe rolls out a new revision and keeps the old one serving until
    the new one is ready, so a failed rollout is reported but never deleted; only an
    InferenceService this call created is deleted on failure (cleanup="on-failure").

    Returns {"url" (status.url, external), "internal_url" (status.address.url),
    "model_url" (V1 predict URL), "name", "namespace", "generation", "storage_uri"}.
    """
    obj = o.inference_service(name, namespace, storage_uri=storage_uri, image=image, model_name=model_name,
                              resources=o.Resources(cpu=cpu, memory=memory), min_replicas=min_replicas,
                              max_replicas=max_replicas, scale_metric=scale_metric, scale_target=scale_target,
                              node_selector=node_selector, tolerations=tolerations, labels=labels,
                              service_account_name=service_account_name, deployment_mode=deployment_mode,
                              canary_traffic_percent=canary_percent, grpc=grpc)
    cluster = Cluster(api_client)
    serverless = deployment_mode == "Serverless"
    if cleanup not in CLEANUP_CHOICES:
        raise ValueError(f"Invalid cleanup {cleanup!r}. Only {', '.join(CLEANUP_CHOICES)} are supported.")
    existing = cluster.get("InferenceService", namespace, name)
    if existing is not None and not replace:
        raise LaunchError(f"InferenceService {namespace}/{name} already exists. Pass replace=True (--replace) to update it.")
    deadline = time.monotonic() + timeout_s
    with sigterm_cancels():
        if existing is None:
            current = create(cluster, obj, False, deadline, poll_s, log)
        else:
            obj["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            try:
                current = cluster.update(obj)
            except ApiException as e:
                raise LaunchError(f"could not update InferenceService {namespace}/{name}: "
                                  f"{e.status} {e.reason}: {e.body}") from e
            log(f"updated InferenceService {namespace}/{name}")
        generation = int(current["metadata"].get("generation") or 1)
        old_revision = predictor_revisions(existing)[0]
        # An update that left the spec alone (same generation) rolls out no new revision.
        new_revision = existing is None or generation > int(existing["metadata"].get("generation") or 1)

        def describe(cur):
            ready = condition(cur, "Ready") or {}
            reason = f" ({ready['reason']})" if ready.get("reason") else ""
            created, ready_rev = predictor_revisions(cur)
            revisions = f" revision created={created} ready={ready_rev}" if serverless else ""
            return f"Ready={ready.get('status', 'Unknown')}{reason}{revisions}"

        def done(cur):
            return isvc_done(cur, old_revision, new_revision, serverless)

        try:
            final = wait_for(cluster, obj, done, describe, deadline=deadline,
                          poll_s=poll_s, log=log, report_every_s=report_every_s)
            if not serverless:
                wait_for(cluster, {"kind": "Deployment", "metadata": {"namespace": namespace,
                                                                      "name": f"{name}-predictor"}},
                         deployment_rolled_out,
                         lambda d: f"updated={(d.get('status') or {}).get('updatedReplicas', 0)} "
                                   f"available={(d.get('status') or {}).get('availableReplicas', 0)}",
                         deadline=deadline, poll_s=poll_s, log=log, report_every_s=report_every_s)
        except (LaunchError, TimeoutError) as e:
            print_failing_pod_logs(cluster, namespace, pod_selector("InferenceService", name), log,
                                   o.PREDICTOR_CONTAINER)
            if existing is None and cleanup != "never" and cluster.delete("InferenceService", namespace, name):
                log(f"deleted InferenceService {namespace}/{name} (failed)")
            if isinstance(e, TimeoutError):
                raise LaunchError(f"{e} after {timeout_s:.0f}s") from e
            raise
        except (KeyboardInterrupt, Cancelled) as e:
            log(f"cancelled while waiting for InferenceService {namespace}/{name}")
            if existing is None and cleanup != "never" and cluster.delete("InferenceService", namespace, name):
                log(f"deleted InferenceService {namespace}/{name} (cancelled)")
            raise KeyboardInterrupt(f"cancelled: InferenceService {namespace}/{name}") from e
    st = final.get("status") or {}
    url = st.get("url")
    internal = (st.get("address") or {}).get("url")
    result = {"url": url, "internal_url": internal,
              "model_url": f"{(internal or url or '').rstrip('/')}/v1/models/{model_name}:predict",
              "name": name, "namespace": namespace, "generation": generation, "storage_uri": storage_uri,
              "traffic": traffic(final)}
    log(f"InferenceService {name} is Ready: {url} (in-cluster {internal}); traffic {result['traffic']}")
    return result


def traffic(obj: Mapping | None) -> dict[str, int]:
    """{revision: percent} of the predictor; the latest revision is listed by name too (its
    entry is latestRevision: true, KServe's ksvc_reconciler.go)."""
    pred = (((obj or {}).get("status") or {}).get("components") or {}).get("predictor") or {}
    out: dict[str, int] = {}
    for t in pred.get("traffic") or []:
        revision = t.get("revisionName") or (pred.get("latestReadyRevision") if t.get("latestRevision") else None)
        if revision:
            out[revision] = out.get(revision, 0) + int(t.get("percent") or 0)
    return out


def promote(name: str = o.MODEL_NAME, namespace: str = o.DEFAULT_NAMESPACE, **kwargs) -> dict[str, Any]:
    """Finish a canary rollout: all traffic to the new (latest ready) revision."""
    return _end_canary(name, namespace, promote=True, **kwargs)


def rollback(name: str = o.MODEL_NAME, namespace: str = o.DEFAULT_NAMESPACE, **kwargs) -> dict[str, Any]:
    """Undo a canary rollout: all traffic back to the last fully rolled-out revision.

    canaryTrafficPercent 0 pins the traffic to it (KServe's documented rollback); the canary's
    revision stays, taking no traffic, until the next deploy replaces it.
    """
    return _end_canary(name, namespace, promote=False, **kwargs)


def _end_canary(name: str, namespace: str, *, promote: bool, timeout_s: float = 600, poll_s: float = 5.0,
                report_every_s: float = 60.0, api_client: k8s.ApiClient | None = None,
                log: Log = print_flush) -> dict[str, Any]:
    cluster = Cluster(api_client)
    current = cluster.get("InferenceService", namespace, name)
    if current is None:
        raise LaunchError(f"InferenceService {namespace}/{name} not found")
    predictor = current["spec"]["predictor"]
    percent = predictor.get("canaryTrafficPercent")
    action = "promote" if promote else "rollback"
    if percent is None or (promote and percent == 100) or (not promote and percent == 0):
        raise LaunchError(f"InferenceService {namespace}/{name} has no canary rollout to {action} "
                          f"(canaryTrafficPercent is {percent}); start one with deploy --canary-percent N")
    pred_status = ((current.get("status") or {}).get("components") or {}).get("predictor") or {}
    latest, previous = pred_status.get("latestReadyRevision"), pred_status.get("latestRolledoutRevision")
    if promote:
        predictor.pop("canaryTrafficPercent")
    else:
        predictor["canaryTrafficPercent"] = 0
    try:
        cluster.update(current)
    except ApiException as e:
        raise LaunchError(f"could not {action} InferenceService {namespace}/{name}: {e.status} {e.reason}: {e.body}") from e
    log(f"{action}: InferenceService {namespace}/{name} canaryTrafficPercent {percent} -> "
        f"{'unset' if promote else 0}")
    # The pod template is unchanged: no new revision, only the route's traffic moves.
    target = latest if promote else previous

    def done(cur):
        finished, failure = isvc_done(cur, new_revision_expected=False)
        return (finished and (failure is not None or target is None or traffic(cur).get(target) == 100)), failure

    try:
        final = wait_for(cluster, current, done, lambda cur: f"traffic {traffic(cur)}",
                         deadline=time.monotonic() + timeout_s, poll_s=poll_s, log=log,
                         report_every_s=report_every_s)
    except TimeoutError as e:
        raise LaunchError(f"{e} after {timeout_s:.0f}s") from e
    log(f"InferenceService {namespace}/{name}: traffic {traffic(final)}")
    return {"name": name, "namespace": namespace, "action": action, "traffic": traffic(final),
            "revision": target}


def audit(name: str, namespace: str = o.DEFAULT_NAMESPACE, *, model_uri: str, source: str, output_uri: str,
          parts: int, parallelism: int | None = None, extra_args: Sequence[str] = (), image: str | None = None,
          gpus_per_pod: int = 0, cpu: str = "4", memory: str = "8Gi",
          node_selector: Mapping[str, str] | None = None, tolerations: Sequence[Mapping] | None = None,
          labels: Mapping[str, str] | None = None, service_account_name: str = o.WORKLOAD_SA,
          s3_secret_name: str = o.S3_SECRET, timeout_s: float = 12 * 3600, poll_s: float = 10.0,
          replace: bool = False, cleanup: str = "on-failure", report_every_s: float = 60.0,
          api_client: k8s.ApiClient | None = None, log: Log = print_flush) -> dict[str, Any]:
    """Score a bucket with the audit's Indexed Job: pod i scores part i of ``parts``.

    Returns {"output_uri", "name", "namespace", "parts", "seconds", "gpu_hours"} once every index
    succeeded; the caller then merges (``bincounter.audit.core.merge`` / ``bincounter audit --merge-only``).
    Chunk files already in ``output_uri`` are skipped by the pods, so rerunning a failed audit
    (replace=True) scores only what is missing.
    """
    obj = o.audit_job(name, namespace, model_uri=model_uri, source=source, output_uri=output_uri, parts=parts,
                      parallelism=parallelism, extra_args=extra_args, image=image,
                      resources=o.Resources(cpu=cpu, memory=memory, gpus=gpus_per_pod), node_selector=node_selector,
                      tolerations=tolerations, labels=labels, service_account_name=service_account_name,
                      s3_secret_name=s3_secret_name, active_deadline_seconds=int(timeout_s))
    cluster = Cluster(api_client)
    started = time.monotonic()

    def describe(cur):
        st = cur.get("status") or {}
        done = st.get("completedIndexes") or "none"
        failed = f" failedIndexes={st['failedIndexes']}" if st.get("failedIndexes") else ""
        return (f"{_state(cur)} active={st.get('active', 0)} succeeded={st.get('succeeded', 0)}/{parts} "
                f"failed={st.get('failed', 0)} completedIndexes={done}{failed}")

    final = run_to_end(cluster, obj, done=job_done, describe=describe, timeout_s=timeout_s, poll_s=poll_s,
                       replace=replace, cleanup=cleanup, log=log, report_every_s=report_every_s,
                       log_selector=pod_selector("Job", name), primary=o.AUDIT_CONTAINER)
    status = final.get("status") or {}
    seconds = time.monotonic() - started
    gpus = parts * gpus_per_pod  # an upper bound when parallelism < parts: pods then run in turn
    gpu_hours = _gpu_hours(status.get("startTime"), status.get("completionTime"), gpus) or seconds * gpus / 3600
    log(f"Job {name} succeeded: {parts} parts scored into {output_uri}")
    return {"output_uri": output_uri, "name": name, "namespace": namespace, "parts": parts,
            "seconds": round(seconds, 1), "gpu_hours": round(gpu_hours, 4)}


def run_labels(run_id: str) -> dict[str, str]:
    """Labels that tie an object to a pipeline run (pass as labels=... to the launchers)."""
    return {o.RUN_LABEL: run_id}


def cleanup_run(run_id: str, namespace: str = o.DEFAULT_NAMESPACE, *,
                kinds: Sequence[str] = ("Experiment", "PyTorchJob", "TrainJob"),
                api_client: k8s.ApiClient | None = None, log: Log = print_flush) -> list[str]:
    """Delete what a failed or cancelled pipeline run left behind: every object of kinds
    labelled with run_id (see run_labels). InferenceServices are not in the default
    kinds: a failed run must not take down a model that is serving. Returns "Kind/name"s.

    Experiments go first: Katib would otherwise create new trial jobs for the ones deleted.
    A kind the cluster does not serve is skipped, whether the API answers 404 (no CRD) or
    403: inside Kubeflow a profile's ServiceAccount gets its rights on a kind from the
    ClusterRole the kind's operator ships with the ``rbac.authorization.kubeflow.org/
    aggregate-to-kubeflow-edit`` label (kubeflow/manifests, e.g. applications/volumes-web-app/
    upstream/base/cluster-role.yaml); with the operator not installed (the Training Operator is
    optional on 1.11.0, Trainer v2 absent on 1.10.2) nothing grants the kind, and the API
    server's authorizer answers 403 before any lookup could answer 404."""
    cluster = Cluster(api_client)
    deleted = []
    for kind in kinds:
        try:
            items = cluster.list(o.CUSTOM_KINDS[kind], namespace, f"{o.RUN_LABEL}={run_id}")
        except ApiException as e:
            if e.status in (403, 404):
                log(f"skipped {kind}: {'not served' if e.status == 404 else 'not permitted'} in {namespace}")
                continue
            raise
        for item in items:
            if cluster.delete(kind, namespace, item["metadata"]["name"]):
                deleted.append(f"{kind}/{item['metadata']['name']}")
                log(f"deleted {kind} {namespace}/{item['metadata']['name']} (run {run_id})")
    return deleted
