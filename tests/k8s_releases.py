"""What each supported Kubeflow release does to bincounter's objects, read from its own files.

The API double (tests/k8s_double.py) takes a release profile, ``release_profile("1.10.2")``
or ``("1.11.0")``, and replays these behaviours. Every fact below is READ from the files
that release installs (copied into tests/schemas/releases/, provenance in SOURCES.json there)
or is upstream controller logic, cited by file; none is our guess:

- which kinds the reference install has (``example/kustomization.yaml``: 1.11.0 comments the
  Training Operator out and installs Trainer v2), hence API discovery and 403 for the others;
- which TrainJob API the installed Trainer has (its CRD: ``podTemplateOverrides`` in v2.1.0,
  ``runtimePatches`` from v2.2);
- Katib's trial resources (``katib-config.yaml``) and the namespace label its pod webhook needs
  to inject the metrics collector (``katib-webhooks.yaml`` namespaceSelector); the labels every
  profile namespace gets (``namespace-labels.yaml``);
- KServe's default deployment mode (``inferenceservice-config`` in kserve.yaml);
- Knative's feature flags (``config-features`` in serving-core.yaml) and the field masks they
  switch (knative/serving ``pkg/apis/serving/fieldmask.go``, see ``knative_rejections``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import yaml

import k8s_schemas

# What an `example/kustomization.yaml` line installs -> the kinds (group, version, plural).
_COMPONENT_KINDS = {
    "applications/training-operator/": {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs")},
    "applications/trainer/": {"TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs")},
    "applications/katib/": {"Experiment": ("kubeflow.org", "v1beta1", "experiments"),
                            "Trial": ("kubeflow.org", "v1beta1", "trials")},
    "applications/kserve/kserve": {"InferenceService": ("serving.kserve.io", "v1beta1", "inferenceservices")},
    "common/knative/knative-serving": {"Service": ("serving.knative.dev", "v1", "services")},
}
# Built into every API server.
CORE_KINDS = {
    "Deployment": ("apps", "v1", "deployments"),
    # batch/v1 Job (completionMode Indexed GA since Kubernetes 1.24) is built into every API server.
    "Job": ("batch", "v1", "jobs"),
    "SelfSubjectAccessReview": ("authorization.k8s.io", "v1", "selfsubjectaccessreviews"),
}


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    kinds: dict[str, tuple[str, str, str]]      # installed by the reference install
    trainjob_api: str | None                    # "podTemplateOverrides" | "runtimePatches" | None
    trainjob_spec_fields: tuple[str, ...]       # TrainJob .spec properties of the installed CRD
    katib_trial_resources: tuple[str, ...]      # "Kind.version.group"
    injection_label: tuple[str, str]            # the namespace label Katib's pod webhook selects
    profile_labels: dict[str, str]              # what the profile controller puts on a profile namespace
    kserve_default_mode: str                    # "Serverless" | "RawDeployment"
    knative_features: dict[str, str]            # config-features flag -> enabled|disabled|allowed

    def installed(self, group: str, plural: str) -> bool:
        if group == "":
            return True  # the core API (pods, secrets, ...) is always served
        return any((g, p) == (group, plural) for g, _, p in {**self.kinds, **CORE_KINDS}.values())

    def resources(self) -> dict[tuple[str, str], list[tuple[str, str]]]:
        """(group, version) -> [(plural, kind)], as API discovery lists them."""
        out: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for kind, (g, v, p) in {**self.kinds, **CORE_KINDS}.items():
            out.setdefault((g, v), []).append((p, kind))
        return out


def _read(release: str, name: str) -> str:
    path = k8s_schemas.release_file(release, name)
    if path is None:
        raise FileNotFoundError(f"Kubeflow {release} has no {name}")
    return path.read_text()


def _installed_kinds(release: str) -> dict[str, tuple[str, str, str]]:
    kinds: dict[str, tuple[str, str, str]] = {}
    for line in _read(release, "example-kustomization.yaml").splitlines():
        m = re.match(r"^- \.\./(\S+)", line)  # a commented "# - ../..." line is not installed
        if m:
            for prefix, found in _COMPONENT_KINDS.items():
                if m.group(1).startswith(prefix):
                    kinds.update(found)
    return kinds


def _trainjob_fields(release: str | None) -> tuple[str, ...]:
    path = (k8s_schemas.release_file(release, "trainer.kubeflow.org_trainjobs.yaml") if release
            else k8s_schemas.SCHEMAS / k8s_schemas.CRDS[("trainer.kubeflow.org/v1alpha1", "TrainJob")])
    if path is None:
        return ()
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    (v,) = crd["spec"]["versions"]
    return tuple(v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])


def _injection_label(release: str) -> tuple[str, str]:
    for doc in yaml.safe_load_all(_read(release, "katib-webhooks.yaml")):
        if doc and doc["kind"] == "MutatingWebhookConfiguration":
            for hook in doc["webhooks"]:
                if any("pods" in r.get("resources", []) for r in hook.get("rules", [])):
                    ((k, v),) = hook["namespaceSelector"]["matchLabels"].items()
                    return k, v
    raise ValueError(f"no pod webhook in Katib's webhooks of {release}")


def _knative_features(release: str) -> dict[str, str]:
    """The flags in force: the `_example` block lists every flag with its default (Knative's
    pkg/apis/config/features.go defaultFeaturesConfig), real keys in `data` override it."""
    data = yaml.safe_load(_read(release, "knative-config-features.yaml"))["data"]
    features = dict(re.findall(r'^\s*([\w.-]+): "(enabled|disabled|allowed)"', data.get("_example", ""), re.M))
    features.update({k: v for k, v in data.items() if k != "_example"})
    return features


def _kserve_default_mode(release: str) -> str:
    data = yaml.safe_load(_read(release, "kserve-inferenceservice-config.yaml"))["data"]
    return json.loads(data["deploy"])["defaultDeploymentMode"]


@functools.lru_cache(maxsize=None)
def release_profile(name: str) -> Release:
    fields = _trainjob_fields(name)
    api = next((f for f in ("runtimePatches", "podTemplateOverrides") if f in fields), None)
    katib = yaml.safe_load(_read(name, "katib-config.yaml"))
    return Release(
        name=name, kinds=_installed_kinds(name), trainjob_api=api, trainjob_spec_fields=fields,
        katib_trial_resources=tuple(katib["init"]["controller"]["trialResources"]),
        injection_label=_injection_label(name),
        profile_labels={k: str(v) for k, v in yaml.safe_load(_read(name, "namespace-labels.yaml")).items()},
        kserve_default_mode=_kserve_default_mode(name), knative_features=_knative_features(name))


RELEASES = k8s_schemas.RELEASES


@functools.lru_cache(maxsize=None)
def newest_profile() -> Release:
    """Not a release: what the permissive double (no release) discovers, every kind at the newest
    schemas in tests/schemas (Trainer v2.3: runtimePatches), no admission rules of a release."""
    from bincounter.k8s import objects as o

    fields = _trainjob_fields(None)
    return Release(name="newest", kinds={k: v for k, v in o.CUSTOM_KINDS.items() if k not in CORE_KINDS} | {
        "Trial": ("kubeflow.org", "v1beta1", "trials")},
        trainjob_api=next((f for f in ("runtimePatches", "podTemplateOverrides") if f in fields), None),
        trainjob_spec_fields=fields, katib_trial_resources=(), injection_label=("", ""), profile_labels={},
        kserve_default_mode="Serverless", knative_features={})

# ---------------------------------------------------------------- Knative's field masks

# knative/serving pkg/apis/serving/fieldmask.go (v1.16), PodSpecMask: fields kept always, and
# fields kept only when their config-features flag is not "disabled"; every other PodSpec field
# is dropped, and the validation webhook rejects a spec whose masked copy differs
# ("must not set the field(s)").
_PODSPEC_ALWAYS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
_PODSPEC_FLAGS = {
    "affinity": "kubernetes.podspec-affinity", "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector", "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations", "securityContext": "kubernetes.podspec-securitycontext",
    "priorityClassName": "kubernetes.podspec-priorityclassname", "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "dnsPolicy": "kubernetes.podspec-dnspolicy", "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostNetwork": "kubernetes.podspec-hostnetwork", "hostPID": "kubernetes.podspec-hostpid",
    "hostIPC": "kubernetes.podspec-hostipc", "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
}
# SecurityContextMask (container level) at v1.16: what a container may keep.
_CONTAINER_SECURITY = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                       "allowPrivilegeEscalation", "seccompProfile"}
# The PodSpec fields of a KServe predictor (the rest are KServe's own: minReplicas, scaleMetric, ...).
POD_SPEC_FIELDS = frozenset(_PODSPEC_ALWAYS | set(_PODSPEC_FLAGS) | {
    "automountServiceAccountToken", "restartPolicy", "terminationGracePeriodSeconds", "activeDeadlineSeconds",
    "nodeName", "hostname", "subdomain", "priority", "readinessGates", "overhead", "preemptionPolicy",
    "ephemeralContainers", "os", "hostUsers", "schedulingGates", "resourceClaims", "setHostnameAsFQDN",
    "serviceAccount"})


def knative_rejections(pod_spec: dict, features: dict[str, str], where: str = "spec.template.spec") -> list[str]:
    """The fields Knative's validation webhook refuses in pod_spec under these flags."""
    bad = []
    for key, value in pod_spec.items():
        if key not in POD_SPEC_FIELDS or key in _PODSPEC_ALWAYS:
            continue
        if key == "automountServiceAccountToken" and value is False:
            continue  # PodSpecMask: "Only allow setting AutomountServiceAccountToken to false"
        flag = _PODSPEC_FLAGS.get(key)
        if flag is None or features.get(flag, "disabled") == "disabled":
            bad.append(f"{where}.{key}")
    for i, c in enumerate(pod_spec.get("containers") or []):
        for key in (c.get("securityContext") or {}):
            if key not in _CONTAINER_SECURITY:
                bad.append(f"{where}.containers[{i}].securityContext.{key}")
        if ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") and \
                features.get("kubernetes.containerspec-addcapabilities", "disabled") == "disabled":
            bad.append(f"{where}.containers[{i}].securityContext.capabilities.add")
    return bad


# ---------------------------------------------------------------- Training Operator restarts

def training_operator_restarts(restart_policy: str, exit_code: int) -> bool:
    """Whether the Training Operator v1 recreates a replica's failed pod, or fails the job.

    kubeflow/training-operator pkg/controller.v1/common/pod.go ReconcilePods: a Failed pod is
    restarted for OnFailure and Always, and for ExitCode only when
    trainutil.IsRetryableExitCode(exitCode) (pkg/util/train/train_util.go: exitCode >= 128);
    ExitCode with a smaller code fails the job; policy Never fails it too. The restarts are
    bounded by runPolicy.backoffLimit (pkg/controller.v1/common/job.go pastBackoffLimit).
    """
    if restart_policy in ("OnFailure", "Always"):
        return True
    if restart_policy == "ExitCode":
        return exit_code >= 128
    return False
