"""Talking to the cluster for the launchers: client config, create, wait, logs, cleanup.

The machinery every launcher shares (``bincounter.k8s.launchers`` holds the three
launchers and the conditions each waits on): load an ApiClient (in-cluster or
kubeconfig), create or replace a custom object, poll it against a deadline while
reporting progress, print the failing pod's last log lines, and delete the object
on failure, timeout or cancellation (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from bincounter import errors
from bincounter.k8s import objects as o

CLEANUP_CHOICES = ("on-failure", "always", "never")
LOG_TAIL_LINES = 50
Log = Callable[[str], None]


class LaunchError(RuntimeError):
    """The object failed, timed out or could not be created; the message says which and why."""


def print_flush(msg: str) -> None:
    print(msg, flush=True)


_ApiClient = errors.with_timeouts(k8s.ApiClient)  # connect and read timeouts on every call


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """In-cluster config inside a pod (a pipeline step), else the kubeconfig."""
    if kubeconfig is None and context is None:
        try:
            k8s_config.load_incluster_config()
            return _ApiClient()
        except k8s_config.ConfigException:
            pass
    cfg = k8s.Configuration()
    # The client reads $KUBECONFIG once, at import; read it now so a later setting counts.
    k8s_config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), context=context,
                                client_configuration=cfg)
    return _ApiClient(cfg)


SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def resolve_namespace(namespace: str | None = None) -> str:
    """namespace if given, else this pod's own namespace (a pipeline step in a Kubeflow profile),
    else the kubeconfig context's namespace, else bincounter's default."""
    if namespace:
        return namespace
    if os.path.exists(SA_NAMESPACE_FILE):
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip()
    try:
        _, context = k8s_config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return (context or {}).get("context", {}).get("namespace") or o.DEFAULT_NAMESPACE
    except (k8s_config.ConfigException, OSError):
        return o.DEFAULT_NAMESPACE


# ---------------------------------------------------------------- cluster access

class Cluster:
    def __init__(self, api_client: k8s.ApiClient | None):
        self.api_client = api_client or load_api_client()
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self._resources: dict[tuple[str, str], set[str] | None] = {}

    def _get_json(self, path: str) -> dict:
        return self.api_client.call_api(path, "GET", header_params={"Accept": "application/json"},
                                        response_type="object", auth_settings=["BearerToken"],
                                        _return_http_data_only=True)

    # -- API discovery: readable by every authenticated user (the system:discovery role)
    def resources(self, group: str, version: str) -> set[str] | None:
        """The resource names the API server serves under group/version, None when it serves none."""
        if (group, version) not in self._resources:
            try:
                listed = self._get_json(f"/apis/{group}/{version}")
                self._resources[(group, version)] = {r["name"] for r in listed.get("resources") or []}
            except ApiException as e:
                if e.status != 404:
                    raise
                self._resources[(group, version)] = None
        return self._resources[(group, version)]

    def installed(self, kind: str) -> bool:
        g, v, p = o.CUSTOM_KINDS[kind]
        return p in (self.resources(g, v) or set())

    def trainjob_api(self) -> str | None:
        """Which pod-customisation field the installed TrainJob CRD has ("podTemplateOverrides"
        in Trainer v2.1, "runtimePatches" from 2.2), from the OpenAPI v3 document the API server
        publishes for the CRD; None when it cannot tell."""
        g, v, _ = o.CUSTOM_KINDS["TrainJob"]
        try:
            doc = self._get_json(f"/openapi/v3/apis/{g}/{v}")
        except ApiException:
            return None
        for schema in ((doc.get("components") or {}).get("schemas") or {}).values():
            gvks = schema.get("x-kubernetes-group-version-kind") or []
            if any(x.get("kind") == "TrainJob" for x in gvks):
                spec = ((schema.get("properties") or {}).get("spec") or {})
                fields = set(spec.get("properties") or {})
                if "$ref" in spec:  # the API server may publish spec as a reference to its own schema
                    ref = doc["components"]["schemas"].get(spec["$ref"].rsplit("/", 1)[-1]) or {}
                    fields = set(ref.get("properties") or {})
                return next((api for api in reversed(o.TRAINJOB_APIS) if api in fields), None)
        return None

    def _gvp(self, kind: str):
        return o.CUSTOM_KINDS[kind]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        g, v, p = self._gvp(kind)
        try:
            return self.custom.get_namespaced_custom_object(g, v, namespace, p, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: dict) -> dict:
        g, v, p = self._gvp(obj["kind"])
        return self.custom.create_namespaced_custom_object(g, v, obj["metadata"]["namespace"], p, obj)

    def update(self, obj: dict) -> dict:
        g, v, p = self._gvp(obj["kind"])
        meta = obj["metadata"]
        return self.custom.replace_namespaced_custom_object(g, v, meta["namespace"], p, meta["name"], obj)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        g, v, p = self._gvp(kind)
        try:
            # Foreground: the object goes only after its pods, so a replacement never races them.
            self.custom.delete_namespaced_custom_object(
                g, v, namespace, p, name, body=k8s.V1DeleteOptions(propagation_policy="Foreground"))
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def list(self, kind_gvp: tuple[str, str, str], namespace: str, selector: str) -> list[dict]:
        g, v, p = kind_gvp
        return self.custom.list_namespaced_custom_object(g, v, namespace, p, label_selector=selector)["items"]

    def pods(self, namespace: str, selector: str) -> list:
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items

    def log(self, namespace: str, pod: str, container: str, previous: bool = False) -> str:
        return self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=LOG_TAIL_LINES,
                                                 previous=previous)


# ---------------------------------------------------------------- failure report

def pod_selector(kind: str, name: str) -> str:
    return {
        "PyTorchJob": f"training.kubeflow.org/job-name={name}",
        "TrainJob": f"jobset.sigs.k8s.io/jobset-name={name}",   # the TrainJob's JobSet has its name
        "InferenceService": f"serving.kserve.io/inferenceservice={name}",
        "Job": f"batch.kubernetes.io/job-name={name}",  # set by the Job controller since Kubernetes 1.27
    }[kind]


def failing_container(pod) -> tuple[str, bool] | None:
    """(container name, previous) of the container that failed, init containers first."""
    status = pod.status
    for statuses in ((status.init_container_statuses or []) if status else [],
                     (status.container_statuses or []) if status else []):
        for cs in statuses:
            st = cs.state
            if st and st.terminated and st.terminated.exit_code:
                return cs.name, False
            if cs.last_state and cs.last_state.terminated and cs.last_state.terminated.exit_code:
                return cs.name, True  # restarted (CrashLoopBackOff): the crash is in the previous log
    return None


def print_failing_pod_logs(cluster: Cluster, namespace: str, selector: str, log: Log,
                           primary: str | None = None, container: str | None = None) -> str | None:
    """Print the last log lines of the failing pod (else the first pod); return its name.
    container: read this container of that pod instead of the failing one (a Katib trial's
    output is in its metrics collector's log, not in the primary container's)."""
    try:
        pods = cluster.pods(namespace, selector)
    except ApiException as e:
        log(f"could not list pods ({selector}): {e.status} {e.reason}")
        return None
    if not pods:
        log(f"no pods found for {selector}")
        return None
    failing = [(p, failing_container(p)) for p in pods]
    pod, found = next(((p, f) for p, f in failing if f), (pods[0], None))
    if container:
        previous = False
    else:
        container, previous = found or (primary or pod.spec.containers[0].name, False)
    try:
        text = cluster.log(namespace, pod.metadata.name, container, previous)
    except ApiException as e:
        text = f"(log unavailable: {e.status} {e.reason})"
    log(f"---- last {LOG_TAIL_LINES} log lines of pod {pod.metadata.name}, container {container} ----")
    for line in (text or "").rstrip().splitlines():
        log(f"  {line}")
    log("---- end of log ----")
    return pod.metadata.name


# ---------------------------------------------------------------- create, wait, clean up

class Cancelled(BaseException):
    """SIGTERM while waiting (a pipeline cancel); raised as KeyboardInterrupt after cleanup."""


@contextlib.contextmanager
def sigterm_cancels():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Cancelled()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def create(cluster: Cluster, obj: dict, replace: bool, deadline: float, poll_s: float, log: Log) -> dict:
    kind, meta = obj["kind"], obj["metadata"]
    existing = cluster.get(kind, meta["namespace"], meta["name"])
    if existing is not None:
        if not replace:
            raise LaunchError(f"{kind} {meta['namespace']}/{meta['name']} already exists. "
                              f"Delete it, choose another name, or pass replace=True (--replace).")
        log(f"deleting the existing {kind} {meta['namespace']}/{meta['name']}")
        cluster.delete(kind, meta["namespace"], meta["name"])
        while cluster.get(kind, meta["namespace"], meta["name"]) is not None:
            if time.monotonic() > deadline:
                raise LaunchError(f"timed out waiting for the old {kind} {meta['name']} to be deleted")
            time.sleep(poll_s)
    try:
        created = cluster.create(obj)
    except ApiException as e:
        raise LaunchError(f"could not create {kind} {meta['namespace']}/{meta['name']}: "
                          f"{e.status} {e.reason}: {e.body}") from e
    log(f"created {kind} {meta['namespace']}/{meta['name']}")
    return created


def wait_for(cluster: Cluster, obj: dict, done: Callable[[dict], tuple[bool, str | None]],
             describe: Callable[[dict], str], *, deadline: float, poll_s: float, log: Log,
             report_every_s: float) -> dict:
    """Poll until done; return the final object or raise LaunchError (failure, timeout, vanished)."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    start = time.monotonic()
    last_line, last_report = None, start
    while True:
        current = cluster.get(kind, ns, name)
        if current is None:
            raise LaunchError(f"{kind} {ns}/{name} disappeared while waiting (deleted by someone else?)")
        finished, failure = done(current)
        line = describe(current)
        now = time.monotonic()
        if line != last_line or now - last_report >= report_every_s:
            log(f"[{now - start:6.0f}s] {kind} {name}: {line}")
            last_line, last_report = line, now
        if failure:
            raise LaunchError(f"{kind} {ns}/{name} failed: {failure}")
        if finished:
            return current
        if now >= deadline:
            raise TimeoutError(f"{kind} {ns}/{name} did not finish within the deadline (last state: {line})")
        time.sleep(max(0.0, min(poll_s, deadline - now)))


def run_to_end(cluster: Cluster, obj: dict, *, done, describe, timeout_s: float, poll_s: float, replace: bool,
               cleanup: str, log: Log, report_every_s: float, log_selector: str | None, primary: str | None,
               on_failure: Callable[[], None] | None = None, delete_on_failure: bool = True) -> dict:
    """Create obj, wait until done(obj) says finished, and clean up as configured on failure,
    timeout or cancellation (after printing the failing pod's log). Returns the final object."""
    if cleanup not in CLEANUP_CHOICES:
        raise ValueError(f"Invalid cleanup {cleanup!r}. Only {', '.join(CLEANUP_CHOICES)} are supported.")
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    deadline = time.monotonic() + timeout_s

    def clean(reason: str):
        if cleanup == "never" or not delete_on_failure:
            log(f"leaving {kind} {ns}/{name} in place ({reason}; cleanup={cleanup})")
        elif cluster.delete(kind, ns, name):
            log(f"deleted {kind} {ns}/{name} ({reason})")

    with sigterm_cancels():
        create(cluster, obj, replace, deadline, poll_s, log)  # nothing of ours to clean up if this fails
        try:
            final = wait_for(cluster, obj, done, describe, deadline=deadline, poll_s=poll_s, log=log,
                          report_every_s=report_every_s)
        except (LaunchError, TimeoutError) as e:
            if log_selector:
                print_failing_pod_logs(cluster, ns, log_selector, log, primary)
            if on_failure:
                on_failure()
            clean("failed" if isinstance(e, LaunchError) else "timed out")
            if isinstance(e, TimeoutError):
                raise LaunchError(f"{e} after {timeout_s:.0f}s") from e
            raise
        except (KeyboardInterrupt, Cancelled) as e:
            log(f"cancelled while waiting for {kind} {ns}/{name}")
            clean("cancelled")
            raise KeyboardInterrupt(f"cancelled: {kind} {ns}/{name}") from e
    if cleanup == "always":
        clean("finished")
    return final
