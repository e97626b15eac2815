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
  the old observedGeneration until the controller observes the new generation.

Limits (stated plainly): no controllers, scheduling, admission webhooks, CEL rules,
defaulting, watches or finalizers; deletion is immediate (Foreground is not
modelled); label selectors are equality-only. It shows that the launchers send
valid objects and react correctly to the documented status sequences, not that a
real cluster runs the job.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from kubernetes import client as k8s

import k8s_schemas

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


def _isvc_conditions(status: str, reason: str = "", message: str = "") -> list[dict]:
    names = ("IngressReady", "LatestDeploymentReady", "PredictorConfigurationReady", "PredictorReady",
             "PredictorRouteReady", "Ready")
    return [{"type": n, "status": status, **({"reason": reason, "message": message} if reason else {}),
             "lastTransitionTime": T0} for n in names]


def isvc_ready(ns: str, name: str, generation: int) -> dict:
    return {"observedGeneration": generation, "conditions": _isvc_conditions("True"),
            "url": f"http://{name}.{ns}.example.com",
            "address": {"url": f"http://{name}.{ns}.svc.cluster.local"},
            "components": {"predictor": {"latestReadyRevision": f"{name}-predictor-0000{generation}",
                                         "url": f"http://{name}-predictor.{ns}.example.com"}},
            "modelStatus": {"states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                            "transitionStatus": "UpToDate"},
            "deploymentMode": "Serverless"}


def isvc_rollout(ns: str, name: str, generation: int) -> list[dict]:
    """A new generation: first the controller has not observed it (the old Ready=True, if any,
    is what a GET shows), then Unknown while the revision starts, then Ready."""
    old = isvc_ready(ns, name, generation - 1) if generation > 1 else {}
    pending = {"observedGeneration": generation,
               "conditions": _isvc_conditions("Unknown", "RevisionMissing",
                                              f"Configuration \"{name}-predictor\" is waiting for a Revision to become ready."),
               "modelStatus": {"states": {"activeModelState": "", "targetModelState": "Pending"},
                               "transitionStatus": "InProgress"}}
    return [old, old, pending, pending, isvc_ready(ns, name, generation)]


def isvc_failed_load(ns: str, name: str, generation: int) -> list[dict]:
    return isvc_rollout(ns, name, generation)[:3] + [{
        "observedGeneration": generation,
        "conditions": _isvc_conditions("False", "RevisionFailed",
                                       f"Revision \"{name}-predictor-00001\" failed with message: Container failed with: ..."),
        "modelStatus": {"states": {"activeModelState": "", "targetModelState": "FailedToLoad"},
                        "transitionStatus": "BlockedByFailedLoad",
                        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "model.pt not found in /mnt/models"}}}]


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
    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}   # (plural, ns, name) -> object
        self.scripts: dict[tuple[str, str, int], list[dict]] = {}  # (plural, name, generation) -> statuses
        self.steps: dict[tuple[str, str, str], itertools.count] = {}
        self.pods: list[dict] = []
        self.logs: dict[tuple[str, str, str], str] = {}          # (ns, pod, container) -> text
        self.requests: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.rejected: list[list[str]] = []
        # Plurals whose operator is not installed. Inside Kubeflow nothing then grants a profile's
        # ServiceAccount that resource (the rights come from the operator's ClusterRole labelled
        # rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit), and the API server's
        # authorizer answers 403 Forbidden before any lookup could answer 404.
        self.not_installed: set[str] = set()
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

    def script(self, plural: str, name: str, statuses: list[dict], generation: int = 1):
        self.scripts[(plural, name, generation)] = statuses

    def put_object(self, obj: dict, plural: str, status: dict | None = None, generation: int = 1):
        """Seed an object as if it had been created earlier."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.update(generation=generation, resourceVersion=str(next(self._rv)), uid=str(uuid.uuid4()),
                    creationTimestamp=T0)
        obj["status"] = status or {}
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
        json_t = "application/json"
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
            if plural in self.not_installed:
                verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "DELETE": "delete"}[method]
                return 403, self._status(403, "Forbidden", (
                    f'{plural}.{group} is forbidden: User "system:serviceaccount:{ns}:default-editor" cannot '
                    f'{verb} resource "{plural}" in API group "{group}" in the namespace "{ns}"')), json_t
            key = (plural, ns, name)
            if method == "GET" and name is None:
                items = [o for (p, n, _), o in self.objects.items() if p == plural and n == ns
                         and self._matches(o["metadata"].get("labels", {}), query.get("labelSelector"))]
                return 200, {"apiVersion": f"{group}/{version}", "kind": "List", "metadata": {}, "items": items}, json_t
            if method == "POST" and name is None:
                name = body.get("metadata", {}).get("name")
                if (plural, ns, name) in self.objects:
                    return 409, self._status(409, "AlreadyExists", f"{plural} \"{name}\" already exists"), json_t
                problems = k8s_schemas.errors(body)
                if problems:
                    self.rejected.append(problems)
                    return 422, self._status(422, "Invalid", "; ".join(problems)), json_t
                self.put_object(body, plural)
                self.steps[(plural, ns, name)] = itertools.count()
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
                problems = k8s_schemas.errors(body)
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


def serve_engine(tmp_path, monkeypatch, namespace: str):
    """Start a double and point the Kubernetes engine at it through a kubeconfig, as
    ``bincounter k8s`` and a pipeline step outside the cluster would find it; fast polling.
    A generator for a pytest fixture: ``yield from kd.serve_engine(tmp_path, monkeypatch, NS)``."""
    from bincounter.engines import kubernetes as engine

    d = K8sDouble().start()
    monkeypatch.setenv("KUBECONFIG", d.write_kubeconfig(tmp_path / "kubeconfig", namespace))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(engine, "POLL_S", {"train": 0.01, "tune": 0.01, "deploy": 0.01})
    try:
        yield d
    finally:
        d.stop()
