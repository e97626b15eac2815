"""Strict offline validation of Kubernetes objects against upstream schemas.

- Custom resources (PyTorchJob, TrainJob, InferenceService): the openAPIV3Schema of
  the upstream CRDs copied into tests/schemas (see tests/schemas/README.md), made
  strict: ``additionalProperties: false`` wherever a node lists properties and does
  not carry ``x-kubernetes-preserve-unknown-fields`` (what the API server's pruning
  would silently drop, we reject), and the root metadata checked as ObjectMeta.
- Katib Experiment: its CRD is schemaless, so Katib's typed OpenAPI definitions
  (tests/schemas/katib-openapi/swagger.json) made strict the same way, with their
  core references (v1.Container, v1.ObjectMeta, ...) resolved against the Kubernetes
  core schemas; the trial template (``trialSpec``) is validated as a PyTorchJob.
- Core kinds (Namespace, ServiceAccount, Role, RoleBinding, Secret, Pod): the strict
  Kubernetes JSON schemas shipped by the ``kubernetes-validate`` package (PyPI).
- Per Kubeflow release (``errors(obj, release="1.10.2")``): the CRDs that release
  installs, copied from kubeflow/manifests at its tag into tests/schemas/releases/
  (provenance in tests/schemas/releases/SOURCES.json, refreshed by refresh.py there).
  A kind the release does not ship is an error.
- Istio AuthorizationPolicy: a HAND-WRITTEN minimal schema of the documented API
  (no Istio CRD is vendored); see tests/schemas/istio/.

CEL rules (``x-kubernetes-validations``) and list-map uniqueness are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import re

import jsonschema
import yaml
from referencing import Registry, Resource

import kubernetes_validate

SCHEMAS = pathlib.Path(__file__).parent / "schemas"
K8S_VERSION = "v1.33.0"  # Kubeflow 1.10 supports Kubernetes 1.31-1.33
_K8S_DIR = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{K8S_VERSION}-local-strict"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}

CRDS = {
    ("kubeflow.org/v1", "PyTorchJob"): "trainer-v1/kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer-v2/trainer.kubeflow.org_trainjobs.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve/serving.kserve.io_inferenceservices.yaml",
}
CORE = {
    ("v1", "Namespace"): "namespace-v1.json",
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "Pod"): "pod-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json",
}
RELEASES = ("1.10.2", "1.11.0")
# kind -> file name in tests/schemas/releases/<release>/ (SOURCES.json says where each file lives).
RELEASE_CRDS = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservices-crd.yaml",
}


@functools.lru_cache(maxsize=None)
def _release_sources() -> dict[tuple[str, str], pathlib.Path]:
    """(release, file name) -> the copied file (a file both releases ship is stored once)."""
    entries = json.loads((SCHEMAS / "releases" / "SOURCES.json").read_text())
    return {(e["release"], e["file"].split("/", 1)[1]): SCHEMAS / "releases" / e["file"] for e in entries}


def release_file(release: str, name: str) -> pathlib.Path | None:
    """A file as the Kubeflow release ships it, or None when the release has no such file."""
    if release not in RELEASES:
        raise KeyError(f"Unknown release {release!r}; known: {', '.join(RELEASES)}")
    return _release_sources().get((release, name))


# Katib swagger refs that are Kubernetes core types.
_KATIB_CORE = {
    "v1.Container": "io.k8s.api.core.v1.Container",
    "v1.HTTPGetAction": "io.k8s.api.core.v1.HTTPGetAction",
    "v1.ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "v1.ListMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta",
}


def strict(node):
    """Copy of an OpenAPI v3 (CRD) schema node with unknown fields rejected."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.lru_cache(maxsize=None)
def _registry() -> Registry:
    defs = json.loads((_K8S_DIR / "_definitions.json").read_text())
    return Registry().with_resource(K8S_DEFS_ID, Resource.from_contents(defs))


@functools.lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str, release: str | None = None) -> dict:
    if release is None:
        path = SCHEMAS / CRDS[(api_version, kind)]
    else:
        path = release_file(release, RELEASE_CRDS[(api_version, kind)])
        if path is None:
            raise NotInstalled(f"{kind} ({api_version}) is not part of Kubeflow {release}")
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    version = api_version.split("/")[1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.lru_cache(maxsize=None)
def katib_schema() -> dict:
    swagger = json.loads((SCHEMAS / "katib-openapi" / "swagger.json").read_text())

    def convert(node):
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/definitions/")
            if name in _KATIB_CORE:
                return {"$ref": f"{K8S_DEFS_ID}#/$defs/{_KATIB_CORE[name]}"}
            if name == "v1.Time":
                return {"type": "string"}
            if name == "v1.unstructured.Unstructured":
                return {"type": "object"}  # trialSpec: validated separately against its own kind
            return {"$ref": "#/$defs/" + name}
        return strict({k: convert(v) for k, v in node.items()})

    defs = {name: convert(d) for name, d in swagger["definitions"].items()}
    root = copy.deepcopy(defs["v1beta1.Experiment"])
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    root["$defs"] = defs
    return root


@functools.lru_cache(maxsize=None)
def core_schema(api_version: str, kind: str) -> dict:
    return json.loads((_K8S_DIR / CORE[(api_version, kind)]).read_text())


@functools.lru_cache(maxsize=None)
def istio_schema() -> dict:
    schema = json.loads((SCHEMAS / "istio" / "authorizationpolicy.schema.json").read_text())
    schema["properties"]["metadata"] = OBJECT_META
    return schema


class NotInstalled(KeyError):
    """The release installs no CRD for this kind."""


def _schema_for(obj: dict, release: str | None = None) -> dict:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if release is not None and key in RELEASE_CRDS:
        return crd_schema(*key, release)
    if key in CRDS:
        return crd_schema(*key)
    if key in CORE:
        return core_schema(*key)
    if key == ("kubeflow.org/v1beta1", "Experiment"):
        return katib_schema()
    if key[1] == "AuthorizationPolicy" and str(key[0]).startswith("security.istio.io/"):
        return istio_schema()
    raise KeyError(f"No schema for apiVersion={key[0]} kind={key[1]}; add it to tests/k8s_schemas.py")


@functools.lru_cache(maxsize=None)
def _validator(release: str | None, api_version: str, kind: str):
    schema = _schema_for({"apiVersion": api_version, "kind": kind}, release)
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def errors(obj: dict, release: str | None = None) -> list[str]:
    """Every schema violation of obj as 'kind/name: path: message' (empty when valid); with
    release, against the CRDs that Kubeflow release installs (its kinds only)."""
    if not isinstance(obj, dict):
        return [f"not an object: {obj!r:.80}"]
    name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name', '?')}"
    try:
        validator = _validator(release, obj.get("apiVersion"), obj.get("kind"))
    except NotInstalled as e:
        return [f"{name}: {e.args[0]}"]
    found = [f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in validator.iter_errors(obj)]
    if obj.get("kind") == "Experiment" and not found:
        trial = obj["spec"].get("trialTemplate", {}).get("trialSpec")
        if trial is not None:
            trial = {"metadata": {"name": "trial"}, **trial}
            found += [f"{name}: spec.trialTemplate.trialSpec: {e}" for e in errors(trial, release)]
    return found


def validate(obj: dict, release: str | None = None) -> None:
    problems = errors(obj, release)
    if problems:
        raise AssertionError("schema validation failed:\n  " + "\n  ".join(problems[:20]))


def load_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


PLACEHOLDER = re.compile(r"\$\{trial(Parameters|Spec)\.[A-Za-z]+\}")
