"""A TEST DOUBLE of the Kubernetes API server, for the launcher tests.

It is a small real HTTP server on 127.0.0.1 that implements only the REST paths
``bincounter.k8s.launchers`` calls through the official ``kubernetes`` client:

    POST/GET/PUT/DELETE /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]
    GET                 /apis/{group}/{version}/namespaces/{ns}/{plural}?labelSelector=a=b
    GET                 /api/v1/namespaces/{ns}/pods?labelSelector=a=b
    GET                 /api/v1/namespaces/{ns}/pods/{name}/log?container=c&tailLines=n

Every POSTed or PUT object is checked against the same strict schemas as the
manifests (tests/k8s_schemas.py); an invalid one gets 422 like a real API server
with the CRD installed. No controller runs here: each GET of an object returns the
next status of a sequence the test scripted (the last one repeats), and the
sequences below REPLAY what the real controllers write, as documented upstream:

- PyTorchJob: Training Operator v1.9 (kubeflow/trainer release-1.9), conditions
  Created -> Running -> Succeeded | Failed with reasons "PyTorchJob<Type>"
  (pkg/util/status.go NewReason(kind, reason)); Running turns False when the job ends.
- TrainJob: Trainer v2 (pkg/apis/trainer/v1alpha1/trainjob_types.go) condition
  types Created (reason JobsCreationSucceeded) -> Complete | Failed; the terminal
  reason/message are the JobSet's.
- Experiment: Katib v1beta1 (pkg/controller.v1beta1/experiment/util/status_util.go)
  Created (ExperimentCreated) -> Running (ExperimentRunning) -> Succeeded
  (ExperimentMaxTrialsReached) | Failed, with status.currentOptimalTrial
  {bestTrialName, parameterAssignments, observation.metrics[name,min,max,latest]}.
- InferenceService: KServe v0.20 (pkg/apis/serving/v1beta1/inference_service_status.go)
  conditions IngressReady, PredictorReady, Ready, ... plus observedGeneration, url,
  address.url and modelStatus; after an update the OLD Ready=True stays visible with
  the ISVC's observedGeneration as KServe copies it from the Knative Service (or Deployment),
  whose generation is not the ISVC's; status.components.predictor has latestCreatedRevision
  and latestReadyRevision (pkg/apis/serving/v1beta1/component_status.go).

RELEASE PROFILES: ``K8sDouble(release="1.10.2")`` or ``("1.11.0")`` also replays what that
Kubeflow release does, each behaviour read from the release's own files (tests/k8s_releases.py,
which cites the upstream source of each):

- API discovery (``GET /apis``, ``/apis/{group}/{version}``) lists only the kinds the release's
  reference install has, and ``/openapi/v3/apis/trainer.kubeflow.org/v1alpha1`` serves the
  installed TrainJob schema (``podTemplateOverrides`` in Trainer v2.1.0);
- a request for a kind that is not installed gets 403 Forbidden, as a profile user sees it (the
  aggregated ``kubeflow-edit`` role only grants kinds whose operator is installed);
- admission validates against that release's CRDs; Knative's field masks reject a Serverless
  predictor's disallowed PodSpec fields; Katib's experiment validator rejects a trial kind missing
  from ``trialResources``;
- Katib injects its metrics collector only in namespaces with its injection label: elsewhere every
  trial ends MetricsUnavailable and the Experiment ends without a best trial;
- SelfSubjectAccessReview answers from ``rbac_rules`` (default: the Role the manifests bind);
- restarts by exit code: ``k8s_releases.training_operator_restarts`` and ``pytorchjob_after_exit``.

Extension points for other behaviours (KFP run states, Indexed Jobs, canary rollouts): ``add_route``
for new REST paths, ``on_create[plural]`` for what a controller does with a new object.

Limits (stated plainly): no controllers, scheduling, admission webhooks, CEL rules,
defaulting, watches or finalizers; deletion is immediate (Foreground is not
modelled); label selectors are equality-only. It shows that the launchers send
valid objects and react correctly to the documented status sequences, not that a
real cluster runs the job.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from kubernetes import client as k8s

import k8s_releases
import k8s_schemas
from bincounter.k8s import objects as o

T0 = "2026-11-22T01:00:00Z"
T1 = "2026-11-22T02:00:00Z"


def _cond(type_, status, reason, message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": T0, "lastUpdateTime": T0}


# ---------------------------------------------------------------- replayed status sequences

def pytorchjob_success(ns: str, name: str, workers: int = 1) -> list[dict]:
    rs = {"Master": {"active": 1}} | ({"Worker": {"active": workers - 1}} if workers > 1 else {})
    created = _cond("Created", "True", "PyTorchJobCreated", f"PyTorchJob {ns}/{name} is created.")
    running = _cond("Running", "True", "PyTorchJobRunning", f"PyTorchJob {ns}/{name} is running.")
    return [
        {},
        {"conditions": [created], "replicaStatuses": {}, "startTime": T0},
        {"conditions": [created, running], "replicaStatuses": rs, "startTime": T0},
        {"conditions": [created, {**running, "status": "False"},
                        _cond("Succeeded", "True", "PyTorchJobSucceeded",
                              f"PyTorchJob {ns}/{name} successfully completed.")],
         "replicaStatuses": {r: {"succeeded": 1 if r == "Master" else workers - 1} for r in rs},
         "startTime": T0, "completionTime": T1},
    ]


def pytorchjob_failure(ns: str, name: str) -> list[dict]:
    seq = pytorchjob_success(ns, name)[:3]
    created, running = seq[2]["conditions"]
    return seq + [{"conditions": [created, {**running, "status": "False"},
                                  _cond("Failed", "True", "PyTorchJobFailed",
                                        f"PyTorchJob {ns}/{name} is failed because 1 Master replica(s) failed.")],
                   "replicaStatuses": {"Master": {"failed": 1}}, "startTime": T0, "completionTime": T1}]


def pytorchjob_stuck_running(ns: str, name: str) -> list[dict]:
    return pytorchjob_success(ns, name)[:3]


def trainjob_success(ns: str, name: str) -> list[dict]:
    created = _cond("Created", "True", "JobsCreationSucceeded", "Succeeded to create Jobs")
    return [{}, {"conditions": [created]},
            {"conditions": [created, _cond("Complete", "True", "AllJobsCompleted", "jobset completed successfully")]}]


def trainjob_failure(ns: str, name: str) -> list[dict]:
    created = _cond("Created", "True", "JobsCreationSucceeded", "Succeeded to create Jobs")
    return [{}, {"conditions": [created]},
            {"conditions": [created, _cond("Failed", "True", "FailedJobs", "jobset failed: job node-0 has failed")]}]


def experiment_success(ns: str, name: str, best: dict[str, str], accuracy: float, trials: int = 3) -> list[dict]:
    created = _cond("Created", "True", "ExperimentCreated", "Experiment is created")
    running = _cond("Running", "True", "ExperimentRunning", "Experiment is running")
    optimal = {"bestTrialName": f"{name}-x7k2p9",
               "parameterAssignments": [{"name": k, "value": v} for k, v in best.items()],
               "observation": {"metrics": [
                   {"name": "val-accuracy", "min": "0.21", "max": str(accuracy), "latest": str(accuracy - 0.01)},
                   {"name": "val-loss", "min": "1.2", "max": "2.1", "latest": "1.3"}]}}
    return [
        {},
        {"conditions": [created], "startTime": T0},
        {"conditions": [created, running], "startTime": T0, "trials": 2, "trialsRunning": 2,
         "runningTrialList": [f"{name}-a", f"{name}-b"], "currentOptimalTrial": {"bestTrialName": "",
                                                                               "observation": {}}},
        {"conditions": [created, running], "startTime": T0, "trials": 3, "trialsRunning": 1, "trialsSucceeded": 2,
         "currentOptimalTrial": optimal},
        {"conditions": [created, {**running, "status": "False"},
                        _cond("Succeeded", "True", "ExperimentMaxTrialsReached",
                              "Experiment has succeeded because max trial count has reached")],
         "startTime": T0, "completionTime": T1, "trials": trials, "trialsSucceeded": trials - 1,
         "trialsEarlyStopped": 1, "currentOptimalTrial": optimal},
    ]


def experiment_failure(ns: str, name: str) -> list[dict]:
    created = _cond("Created", "True", "ExperimentCreated", "Experiment is created")
    return [{}, {"conditions": [created]},
            {"conditions": [created, _cond("Failed", "True", "ExperimentMaxFailedTrialsReached",
                                           "Experiment has failed because max failed count has reached")],
             "trials": 3, "trialsFailed": 3}]


def trial(ns: str, experiment: str, name: str, state: str, params: dict[str, str], accuracy: str) -> dict:
    """A Katib Trial as the experiment controller writes it (katib v1beta1 TrialStatus)."""
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
            "metadata": {"name": name, "namespace": ns, "labels": {"katib.kubeflow.org/experiment": experiment}},
            "spec": {"parameterAssignments": [{"name": k, "value": v} for k, v in params.items()]},
            "status": {"startTime": T0, "completionTime": T1,
                       "conditions": [_cond("Created", "True", "TrialCreated", "Trial is created"),
                                      _cond(state, "True", f"Trial{state}", f"Trial is {state.lower()}")],
                       "observation": {"metrics": [{"name": "val-accuracy", "min": "0.1", "max": accuracy,
                                                    "latest": accuracy}]}}}


def experiment_metrics_unavailable(ns: str, name: str, trials: int = 3) -> list[dict]:
    """What Katib writes when no trial reports a metric (the collector was never injected):
    each trial ends MetricsUnavailable (pkg/controller.v1beta1/trial/trial_controller_util.go),
    those count as completed trials, so the Experiment reaches maxTrialCount and Succeeds with
    an empty currentOptimalTrial (pkg/controller.v1beta1/experiment/util/status_util.go)."""
    created = _cond("Created", "True", "ExperimentCreated", "Experiment is created")
    running = _cond("Running", "True", "ExperimentRunning", "Experiment is running")
    return [{}, {"conditions": [created, running], "trials": trials, "trialsRunning": trials},
            {"conditions": [created, {**running, "status": "False"},
                            _cond("Succeeded", "True", "ExperimentMaxTrialsReached",
                                  "Experiment has succeeded because max trial count has reached")],
             "trials": trials, "trialMetricsUnavailableList": [f"{name}-t{i}" for i in range(trials)],
             "trialsMetricsUnavailable": trials, "currentOptimalTrial": {"bestTrialName": "", "observation": {}}}]


KATIB_COLLECTOR = "metrics-logger-and-collector"  # katib pkg/webhook/v1beta1/pod/inject_webhook.go (mccommon)


def katib_trial_pod(ns: str, trial: str, kind: str, primary: str, exit_code: int, output: str,
                    logs: dict) -> dict:
    """A finished trial's primary pod as Katib's pod webhook leaves it with the StdOut collector:
    the primary container's command is wrapped to write into /var/log/katib/metrics.log (its own
    log is empty), and the injected metrics-logger-and-collector container prints that output."""
    labels = ({"training.kubeflow.org/job-name": trial, "training.kubeflow.org/replica-type": "master"}
              if kind == "PyTorchJob" else {"jobset.sigs.k8s.io/jobset-name": trial})
    name = f"{trial}-master-0" if kind == "PyTorchJob" else f"{trial}-node-0-0-x1"
    p = pod(ns, name, labels, primary, exit_code=exit_code)
    p["spec"]["containers"].append({"name": KATIB_COLLECTOR, "image": "katib/file-metrics-collector"})
    p["status"]["containerStatuses"].append({"name": KATIB_COLLECTOR, "image": "img", "imageID": "", "ready": False,
                                             "restartCount": 0, "state": {"terminated": {"exitCode": 0,
                                                                                          "reason": "Completed"}}})
    logs[(ns, name, primary)] = ""
    logs[(ns, name, KATIB_COLLECTOR)] = output
    return p


def pytorchjob_after_exit(job: dict, exit_code: int, replica: str = "Master") -> list[dict]:
    """The PyTorchJob statuses after one replica's pod exits with exit_code (a lost peer: torchrun
    exits 1; a spot reclaim SIGTERMs it: also 1 through torchrun; SIGKILL: 137): Restarting, then
    Succeeded after the resumed run, when the Training Operator restarts it
    (k8s_releases.training_operator_restarts, bounded by backoffLimit); else Failed."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    spec = job["spec"]["pytorchReplicaSpecs"][replica]
    run = pytorchjob_success(ns, name)
    created, running = run[2]["conditions"]
    if k8s_releases.training_operator_restarts(spec.get("restartPolicy", "Never"), exit_code) and \
            job["spec"]["runPolicy"].get("backoffLimit", 0) >= 1:
        restarting = _cond("Restarting", "True", "PyTorchJobRestarting",
                           f"job {name} is restarting because 1 {replica} replica(s) failed.")
        return run[:3] + [{**run[2], "conditions": [created, {**running, "status": "False"}, restarting]},
                          {**run[2], "conditions": [created, running]}, run[3]]
    return run[:3] + [{"conditions": [created, {**running, "status": "False"},
                                      _cond("Failed", "True", "PyTorchJobFailed",
                                            f"job \"{name}\" is failing because \"{replica}\" replica(s) failed.")],
                       "replicaStatuses": {replica: {"failed": 1}}, "startTime": T0, "completionTime": T1}]


def _isvc_conditions(status: str, reason: str = "", message: str = "") -> list[dict]:
    names = ("IngressReady", "LatestDeploymentReady", "PredictorConfigurationReady", "PredictorReady",
             "PredictorRouteReady", "Ready")
    return [{"type": n, "status": status, **({"reason": reason, "message": message} if reason else {}),
             "lastTransitionTime": T0} for n in names]


def _revision(name: str, n: int) -> str:
    return f"{name}-predictor-{n:05d}"


def isvc_ready(ns: str, name: str, generation: int, revision: int | None = None) -> dict:
    """Ready at a revision; observedGeneration is the Knative Service's generation (KServe copies it)."""
    revision = revision or generation
    return {"observedGeneration": generation, "conditions": _isvc_conditions("True"),
            "url": f"http://{name}.{ns}.example.com",
            "address": {"url": f"http://{name}.{ns}.svc.cluster.local"},
            "components": {"predictor": {"latestReadyRevision": _revision(name, revision),
                                         "latestCreatedRevision": _revision(name, revision),
                                         "url": f"http://{name}-predictor.{ns}.example.com"}},
            "modelStatus": {"states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                            "transitionStatus": "UpToDate"},
            "deploymentMode": "Serverless"}


def isvc_rollout(ns: str, name: str, generation: int, ksvc_generation: int | None = None) -> list[dict]:
    """A new revision rolls out: first the old status (the old Ready=True, if any), then the new
    revision is created but not ready (Knative's Configuration, hence Ready, is Unknown while
    latestCreatedRevision != latestReadyRevision; the old revision keeps serving), then Ready.

    ksvc_generation is the Knative Service's generation, which KServe writes as the ISVC's
    observedGeneration; it runs ahead of the ISVC's own generation whenever KServe changed the
    Knative Service without a spec change of ours (e.g. after a KServe upgrade)."""
    ksvc = ksvc_generation or generation
    old = isvc_ready(ns, name, ksvc - 1) if ksvc > 1 else {}
    pending = {"observedGeneration": ksvc,
               "conditions": _isvc_conditions("Unknown", "RevisionMissing",
                                              f"Configuration \"{name}-predictor\" is waiting for a Revision to become ready."),
               "components": {"predictor": {"latestCreatedRevision": _revision(name, ksvc),
                                            **({"latestReadyRevision": _revision(name, ksvc - 1)} if ksvc > 1 else {})}},
               "modelStatus": {"states": {"activeModelState": "", "targetModelState": "Pending"},
                               "transitionStatus": "InProgress"}}
    return [old, old, pending, pending, isvc_ready(ns, name, ksvc)]


def isvc_failed_load(ns: str, name: str, generation: int) -> list[dict]:
    return isvc_rollout(ns, name, generation)[:3] + [{
        "observedGeneration": generation,
        "conditions": _isvc_conditions("False", "RevisionFailed",
                                       f"Revision \"{name}-predictor-00001\" failed with message: Container failed with: ..."),
        "components": {"predictor": {"latestCreatedRevision": _revision(name, generation)}},
        "modelStatus": {"states": {"activeModelState": "", "targetModelState": "FailedToLoad"},
                        "transitionStatus": "BlockedByFailedLoad",
                        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "model.pt not found in /mnt/models"}}}]


def deployment_rollout(ns: str, name: str, generation: int, replicas: int = 1) -> list[dict]:
    """A Deployment's status while a RawDeployment predictor rolls out (kubectl rollout status
    reads the same fields: observedGeneration, updatedReplicas, availableReplicas, replicas)."""
    return [{"observedGeneration": generation - 1, "replicas": replicas, "updatedReplicas": 0,
             "availableReplicas": replicas},
            {"observedGeneration": generation, "replicas": replicas + 1, "updatedReplicas": 1,
             "availableReplicas": replicas},
            {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
             "availableReplicas": replicas, "readyReplicas": replicas,
             "conditions": [_cond("Available", "True", "MinimumReplicasAvailable"),
                            _cond("Progressing", "True", "NewReplicaSetAvailable")]}]


def isvc_raw_ready(ns: str, name: str, generation: int) -> dict:
    st = isvc_ready(ns, name, generation)
    st["deploymentMode"] = "RawDeployment"
    st["components"]["predictor"] = {"url": f"http://{name}-predictor.{ns}.svc.cluster.local"}
    return st


def pod(ns: str, name: str, labels: dict, container: str, exit_code: int | None = None,
        init_container: str | None = None, init_exit_code: int | None = None) -> dict:
    """A Pod as the API returns it, with a terminated container when exit_code is given."""
    def status_of(cname, code):
        state = ({"terminated": {"exitCode": code, "reason": "Error" if code else "Completed"}}
                 if code is not None else {"running": {"startedAt": T0}})
        return {"name": cname, "image": "img", "imageID": "", "ready": code is None, "restartCount": 0,
                "state": state}
    status = {"phase": "Failed" if exit_code else "Running", "containerStatuses": [status_of(container, exit_code)]}
    spec = {"containers": [{"name": container, "image": "img"}]}
    if init_container:
        spec["initContainers"] = [{"name": init_container, "image": "img"}]
        status["initContainerStatuses"] = [status_of(init_container, init_exit_code)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec, "status": status}


# ---------------------------------------------------------------- the server

class K8sDouble:
    def __init__(self, release: str | None = None, namespaces: dict[str, dict[str, str]] | None = None):
        """release: a Kubeflow release profile ("1.10.2", "1.11.0"; see the module doc), or None
        for a permissive server (every kind installed, the newest schemas, no admission rules).
        namespaces: name -> labels of the namespaces that exist (``profile_namespace`` gives a
        Kubeflow profile's labels)."""
        self.release = k8s_releases.release_profile(release) if release else None
        self.profile = self.release or k8s_releases.newest_profile()  # what discovery shows
        self.namespaces: dict[str, dict[str, str]] = dict(namespaces or {})
        # What SelfSubjectAccessReview allows: the Role bincounter's manifests bind.
        self.rbac_rules: list[dict] = copy.deepcopy(o.ROLE_RULES)
        # plural -> fn(double, obj) run on a new object; may return the status sequence to replay.
        self.on_create: dict[str, object] = {}
        self.routes: list[tuple[str, str, object]] = []
        self.objects: dict[tuple[str, str, str], dict] = {}   # (plural, ns, name) -> object
        self.scripts: dict[tuple[str, str, int], list[dict]] = {}  # (plural, name, generation) -> statuses
        self.steps: dict[tuple[str, str, str], itertools.count] = {}
        self.pods: list[dict] = []
        self.logs: dict[tuple[str, str, str], str] = {}          # (ns, pod, container) -> text
        self.requests: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.rejected: list[list[str]] = []
        self._rv = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "K8sDouble":
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path, namespace: str) -> str:
        """A kubeconfig whose current context points at this double, as a laptop's would at a cluster."""
        path = Path(path)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "me", "user": {"token": "test-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "me", "namespace": namespace}}]}))
        return str(path)

    def api_client(self) -> k8s.ApiClient:
        cfg = k8s.Configuration(host=self.url)
        cfg.retries = 0
        return k8s.ApiClient(cfg)

    def add_route(self, method: str, path_prefix: str, fn):
        """Serve more REST paths: fn(double, method, parts, query, body) -> (code, body, content type)."""
        self.routes.append((method, path_prefix.rstrip("/"), fn))

    def seed(self, obj: dict) -> None:
        """Store a core object (Secret, ServiceAccount, ConfigMap) as the API server returns it:
        a Secret's stringData becomes base64 data."""
        import base64

        obj = copy.deepcopy(obj)
        if obj["kind"] == "Secret" and "stringData" in obj:
            obj.setdefault("data", {}).update(
                {k: base64.b64encode(v.encode()).decode() for k, v in obj.pop("stringData").items()})
        plural = {"Secret": "secrets", "ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps"}[obj["kind"]]
        self.put_object(obj, plural)
        del self.objects[(plural, obj["metadata"]["namespace"], obj["metadata"]["name"])]["status"]

    def profile_namespace(self, name: str) -> None:
        """A Kubeflow profile namespace: the labels the release's profile controller sets."""
        self.namespaces[name] = dict(self.release.profile_labels if self.release else {})

    def script(self, plural: str, name: str, statuses: list[dict], generation: int = 1):
        self.scripts[(plural, name, generation)] = statuses

    def put_object(self, obj: dict, plural: str, status: dict | None = None, generation: int = 1):
        """Seed an object as if it had been created earlier."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.update(generation=generation, resourceVersion=str(next(self._rv)), uid=str(uuid.uuid4()),
                    creationTimestamp=T0)
        obj["status"] = status if status is not None else obj.get("status") or {}
        self.objects[(plural, meta["namespace"], meta["name"])] = obj

    # -- request handling
    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with double._lock:
                    double.requests.append((method, url.path))
                    code, body, ctype = double.handle(method, parts, query, self._body() if method in ("POST", "PUT") else None)
                self._send(code, body, ctype)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_DELETE(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._route("DELETE")

        return Handler

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                "message": message, "code": code}

    @staticmethod
    def _matches(labels: dict, selector: str | None) -> bool:
        if not selector:
            return True
        return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))

    def handle(self, method, parts, query, body):
        path = "/" + "/".join(parts)
        for m, prefix, fn in self.routes:
            if m == method and (path == prefix or path.startswith(prefix + "/")):
                return fn(self, method, parts, query, body)
        answer = self._release_handle(method, parts, query, body)
        if answer:
            return answer
        return self._handle(method, parts, query, body)

    # -- release profile behaviours
    def _forbidden(self, verb: str, group: str, plural: str, ns: str):
        # As the API server words an RBAC denial for a profile's default-editor.
        return 403, self._status(403, "Forbidden", f'{plural}.{group} is forbidden: User "system:serviceaccount:{ns}:'
                                 f'default-editor" cannot {verb} resource "{plural}" in API group "{group}" '
                                 f'in the namespace "{ns}"'), "application/json"

    def _release_handle(self, method, parts, query, body):
        json_t, rel = "application/json", self.profile
        resources = rel.resources()
        if parts == ["apis"] and method == "GET":
            groups: dict[str, list[str]] = {}
            for g, v in resources:
                groups.setdefault(g, []).append(v)
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]}, json_t
        if len(parts) == 3 and parts[0] == "apis" and method == "GET":
            listed = resources.get((parts[1], parts[2]))
            if listed is None:
                return 404, self._status(404, "NotFound", "the server could not find the requested resource"), json_t
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{parts[1]}/{parts[2]}",
                         "resources": [{"name": p, "singularName": "", "namespaced": True, "kind": k,
                                        "verbs": ["create", "delete", "get", "list", "update"]} for p, k in listed]}, json_t
        if parts[:3] == ["openapi", "v3", "apis"] and len(parts) == 5 and method == "GET":
            return self._openapi(parts[3], parts[4])
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"] and method == "POST":
            attrs = body["spec"]["resourceAttributes"]
            allowed = rel.installed(attrs.get("group", ""), attrs["resource"]) and self._granted(attrs)
            return 201, {**body, "status": {"allowed": allowed}}, json_t
        if self.release and method == "GET" and parts[:2] == ["api", "v1"] and len(parts) in (4, 6) \
                and parts[2] == "namespaces":
            # Core reads are authorised like any request: by the identity's rules (rbac_rules).
            ns, resource, name = (None, "namespaces", parts[3]) if len(parts) == 4 else (parts[3], parts[4], parts[5])
            if resource in ("namespaces", "secrets", "serviceaccounts", "configmaps") and \
                    not self._granted({"group": "", "resource": resource, "verb": "get", "name": name}):
                return 403, self._status(403, "Forbidden", f'{resource} "{name}" is forbidden: User "system:serviceaccount:'
                                         f'{ns or "-"}:default-editor" cannot get resource "{resource}"'), json_t
        if self.release and parts[0] == "apis" and len(parts) in (6, 7) and parts[3] == "namespaces":
            group, plural, ns = parts[1], parts[5], parts[4]
            if not rel.installed(group, plural):
                verb = {"GET": "list" if len(parts) == 6 else "get", "POST": "create", "PUT": "update",
                        "DELETE": "delete"}[method]
                return self._forbidden(verb, group, plural, ns)
            if method in ("POST", "PUT"):
                rejected = self._admission(plural, ns, body)
                if rejected:
                    self.rejected.append([rejected[1]])
                    return rejected[0], self._status(rejected[0], "BadRequest" if rejected[0] == 400 else "Invalid",
                                                     rejected[1]), json_t
        return None

    def _granted(self, attrs: dict) -> bool:
        resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        for rule in self.rbac_rules:
            if attrs.get("group", "") in rule["apiGroups"] and resource in rule["resources"] \
                    and attrs["verb"] in rule["verbs"] \
                    and (not rule.get("resourceNames") or attrs.get("name") in rule["resourceNames"]):
                return True
        return False

    def _openapi(self, group: str, version: str):
        """The OpenAPI v3 document the API server publishes for a CRD group (readable by every
        authenticated user through the system:discovery role); only TrainJob's schema is served."""
        json_t = "application/json"
        if (group, version) != ("trainer.kubeflow.org", "v1alpha1") or "TrainJob" not in self.profile.kinds:
            return 404, self._status(404, "NotFound", "the server could not find the requested resource"), json_t
        spec = {f: {"type": "object"} for f in self.profile.trainjob_spec_fields}
        return 200, {"openapi": "3.0.0", "components": {"schemas": {"trainer.kubeflow.org.v1alpha1.TrainJob": {
            "type": "object", "x-kubernetes-group-version-kind": [
                {"group": group, "kind": "TrainJob", "version": version}],
            "properties": {"spec": {"type": "object", "properties": spec}}}}}}, json_t

    def _admission(self, plural: str, ns: str, obj: dict) -> tuple[int, str] | None:
        """What the release's API server and webhooks refuse at create: (code, message) or None."""
        problems = k8s_schemas.errors(obj, self.release.name)
        if problems:
            return 422, "; ".join(problems)
        if plural == "inferenceservices":
            mode = (obj["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode",
                                                                   self.release.kserve_default_mode)
            if mode == "Serverless":
                # KServe copies the predictor's PodSpec into a Knative Service, whose webhook masks it.
                # (On a real cluster the ISVC is accepted and never gets Ready; the double refuses
                # it at once, so a test sees the webhook's message.)
                bad = k8s_releases.knative_rejections(obj["spec"]["predictor"], self.release.knative_features)
                if bad:
                    return 400, ('admission webhook "validation.webhook.serving.knative.dev" denied the request: '
                                 f"validation failed: must not set the field(s): {', '.join(bad)}")
        if plural == "experiments":
            trial = obj["spec"]["trialTemplate"]["trialSpec"]
            group, _, version = trial["apiVersion"].rpartition("/")
            gvk = f"{trial['kind']}.{version}.{group}"
            if gvk not in self.release.katib_trial_resources:
                return 400, ('admission webhook "validator.experiment.katib.kubeflow.org" denied the request: '
                             f"{gvk} is not in katib-config trialResources {list(self.release.katib_trial_resources)}")
        return None

    def _katib_without_collector(self, ns: str, name: str, obj: dict) -> None:
        """Katib's pod webhook skips namespaces without the injection label: no metrics ever."""
        key, value = self.release.injection_label
        if self.namespaces.get(ns, {}).get(key) == value:
            return
        n = obj["spec"].get("maxTrialCount", 3)
        self.script("experiments", name, experiment_metrics_unavailable(ns, name, n))
        for i in range(n):
            t = trial(ns, name, f"{name}-t{i}", "MetricsUnavailable", {}, "unavailable")
            t["status"]["observation"] = {}
            self.put_object(t, "trials")

    def _handle(self, method, parts, query, body):
        json_t = "application/json"
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4 and method == "GET":
            if parts[3] not in self.namespaces:
                return 404, self._status(404, "NotFound", f'namespaces "{parts[3]}" not found'), json_t
            return 200, {"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": parts[3], "labels": self.namespaces[parts[3]]}}, json_t
        if parts[:2] == ["api", "v1"] and len(parts) == 6 and parts[4] in ("secrets", "serviceaccounts", "configmaps") \
                and method == "GET":
            obj = self.objects.get((parts[4], parts[3], parts[5]))
            if obj is None:
                return 404, self._status(404, "NotFound", f'{parts[4]} "{parts[5]}" not found'), json_t
            return 200, obj, json_t
        if parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[4] == "pods":
            ns = parts[3]
            if len(parts) == 5 and method == "GET":
                items = [p for p in self.pods if p["metadata"]["namespace"] == ns
                         and self._matches(p["metadata"].get("labels", {}), query.get("labelSelector"))]
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}, json_t
            if len(parts) == 7 and parts[6] == "log" and method == "GET":
                text = self.logs.get((ns, parts[5], query.get("container")))
                if text is None:
                    return 404, self._status(404, "NotFound", f"no log for {parts[5]}/{query.get('container')}"), json_t
                tail = int(query.get("tailLines", 0) or 0)
                lines = text.splitlines()[-tail:] if tail else text.splitlines()
                return 200, "\n".join(lines) + "\n", "text/plain"
        if parts[0] == "apis" and len(parts) in (6, 7) and parts[3] == "namespaces":
            group, version, ns, plural = parts[1], parts[2], parts[4], parts[5]
            name = parts[6] if len(parts) == 7 else None
            key = (plural, ns, name)
            if method == "GET" and name is None:
                items = [o for (p, n, _), o in self.objects.items() if p == plural and n == ns
                         and self._matches(o["metadata"].get("labels", {}), query.get("labelSelector"))]
                return 200, {"apiVersion": f"{group}/{version}", "kind": "List", "metadata": {}, "items": items}, json_t
            if method == "POST" and name is None:
                name = body.get("metadata", {}).get("name")
                if (plural, ns, name) in self.objects:
                    return 409, self._status(409, "AlreadyExists", f"{plural} \"{name}\" already exists"), json_t
                problems = [] if self.release else k8s_schemas.errors(body)  # a release validated at admission
                if problems:
                    self.rejected.append(problems)
                    return 422, self._status(422, "Invalid", "; ".join(problems)), json_t
                self.put_object(body, plural)
                self.steps[(plural, ns, name)] = itertools.count()
                if self.release and plural == "experiments":
                    self._katib_without_collector(ns, name, body)
                hook = self.on_create.get(plural)
                statuses = hook(self, self.objects[(plural, ns, name)]) if hook else None
                if statuses:
                    self.script(plural, name, statuses)
                return 201, self.objects[(plural, ns, name)], json_t
            obj = self.objects.get(key)
            if obj is None:
                return 404, self._status(404, "NotFound", f"{plural} \"{name}\" not found"), json_t
            if method == "GET":
                script = self.scripts.get((plural, name, obj["metadata"]["generation"]))
                if script:
                    i = next(self.steps.setdefault(key, itertools.count()))
                    obj["status"] = copy.deepcopy(script[min(i, len(script) - 1)])
                return 200, obj, json_t
            if method == "PUT":
                if body["metadata"].get("resourceVersion") != obj["metadata"]["resourceVersion"]:
                    return 409, self._status(409, "Conflict", "the object has been modified"), json_t
                problems = [] if self.release else k8s_schemas.errors(body)  # a release validated at admission
                if problems:
                    self.rejected.append(problems)
                    return 422, self._status(422, "Invalid", "; ".join(problems)), json_t
                generation = obj["metadata"]["generation"] + (body.get("spec") != obj.get("spec"))
                self.put_object(body, plural, status=obj.get("status"), generation=generation)
                self.steps[key] = itertools.count()
                return 200, self.objects[key], json_t
            if method == "DELETE":
                del self.objects[key]
                self.deleted.append(key)
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, json_t
        return 404, self._status(404, "NotFound", f"the test double does not implement {method} /{'/'.join(parts)}"), json_t


def serve_engine(tmp_path, monkeypatch, namespace: str, release: str | None = None):
    """Start a double and point the Kubernetes engine at it through a kubeconfig, as
    ``bincounter k8s`` and a pipeline step outside the cluster would find it; fast polling.
    A generator for a pytest fixture: ``yield from kd.serve_engine(tmp_path, monkeypatch, NS)``."""
    from bincounter.engines import kubernetes as engine

    d = K8sDouble(release)
    d.profile_namespace(namespace)
    d.start()
    monkeypatch.setenv("KUBECONFIG", d.write_kubeconfig(tmp_path / "kubeconfig", namespace))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(engine, "POLL_S", {"train": 0.01, "tune": 0.01, "deploy": 0.01})
    try:
        yield d
    finally:
        d.stop()
