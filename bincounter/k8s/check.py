"""`bincounter k8s check`: will a run work on this cluster? A preflight, one row per check.

    bincounter k8s check --namespace kubeflow-user-example-com

Run it before a multi-hour run; the pipeline's first step runs the same checks and stops the
run at once with the same table. Each row is (name, ok, detail, fix): ok is True, False (the
run would fail: the fix says what to do) or None (could not be checked with this identity's
rights; the detail says what was assumed). What is checked, all through the API server with
the caller's own identity:

- the training APIs and versions installed (API discovery; for TrainJob, which Trainer API:
  podTemplateOverrides = Trainer v2.1, runtimePatches = Trainer >= 2.2);
- Katib and KServe installed, the trial kind in Katib's trialResources, KServe's default
  deployment mode;
- Katib's metrics-collector injection label on the namespace;
- the S3 Secret and its keys; the ServiceAccounts (and that the workload one lists the Secret);
- every verb the launchers use, with SelfSubjectAccessReview;
- the Knative features the predictor needs in Serverless mode.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from bincounter.k8s import objects as o

# Where a Kubeflow install puts KServe's and Knative's configuration (kubeflow/manifests:
# applications/kserve/kserve/kserve.yaml, common/knative/knative-serving).
KSERVE_CONFIG = ("kubeflow", "inferenceservice-config")
KNATIVE_FEATURES = ("knative-serving", "config-features")
# Katib's configuration: the ConfigMap its kustomize installs generate from katib-config.yaml
# (applications/katib/upstream/installs/*); init.controller.trialResources lists the trial kinds.
KATIB_CONFIG = ("kubeflow", "katib-config", "katib-config.yaml")
TRAINING_CHOICES = ("auto", "PyTorchJob", "TrainJob")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    ok: bool | None
    detail: str
    fix: str = ""


def local_rows() -> list[Row]:
    return [Row("engine", True, "local engine: no cluster checks")]


def failed(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.ok is False]


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: check, status, detail, and the fix under a failed row."""
    mark = {True: "ok", False: "FAIL", None: "??"}
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'check':<{width}}  {'':4}  detail", f"{'-' * width}  ----  {'-' * 40}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {mark[r.ok]:<4}  {r.detail}")
        if r.fix and r.ok is not True:
            lines.append(f"{'':<{width}}        fix: {r.fix}")
    bad = failed(rows)
    lines.append(f"{len(bad)} check(s) failed" if bad else "all checks passed" +
                 (" (?? = not checkable with these rights)" if any(r.ok is None for r in rows) else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- the checks

def _forbidden_or_missing(e) -> str:
    return {403: "no right to read it", 404: "not found"}.get(e.status, f"{e.status} {e.reason}")


def _training_row(cluster, training: str) -> tuple[Row, str | None]:
    have = {k: cluster.installed(k) for k in ("PyTorchJob", "TrainJob")}
    parts = []
    for kind, ok in have.items():
        g, v, _ = o.CUSTOM_KINDS[kind]
        text = f"{kind} {g}/{v}: {'installed' if ok else 'not installed'}"
        if kind == "TrainJob" and ok:
            api = cluster.trainjob_api()
            text += {"podTemplateOverrides": " (podTemplateOverrides: Trainer v2.1)",
                     "runtimePatches": " (runtimePatches: Trainer >= 2.2)"}.get(api, " (Trainer API unknown)")
        parts.append(text)
    wanted = [k for k in ("PyTorchJob", "TrainJob") if training in ("auto", k)]
    kind = next((k for k in wanted if have[k]), None)
    if kind is None and training != "auto" and any(have.values()):
        # The launchers use the other kind when the preferred one is absent.
        kind = next(k for k, ok in have.items() if ok)
    fix = "" if kind else ("install Kubeflow's Training Operator (1.10.2) or Trainer v2 (1.11.0): "
                           "see example/kustomization.yaml of kubeflow/manifests")
    detail = "; ".join(parts) + (f"; training runs as {kind}" if kind else "")
    return Row("training API", kind is not None, detail, fix), kind


def _installed_row(cluster, name: str, kind: str, fix: str) -> Row:
    g, v, _ = o.CUSTOM_KINDS[kind]
    ok = cluster.installed(kind)
    return Row(name, ok, f"{kind} {g}/{v}: {'installed' if ok else 'not installed'}", "" if ok else fix)


def _configmap(cluster, namespace: str, name: str) -> tuple[dict | None, str]:
    from kubernetes.client.exceptions import ApiException

    try:
        return cluster.core.read_namespaced_config_map(name, namespace).data or {}, ""
    except ApiException as e:
        return None, f"cannot read {namespace}/{name}: {_forbidden_or_missing(e)}"


def _katib_trial_row(cluster, trial_kind: str | None) -> Row | None:
    if trial_kind is None:
        return None
    g, v, _ = o.CUSTOM_KINDS[trial_kind]
    gvk = f"{trial_kind}.{v}.{g}"
    data, why = _configmap(cluster, *KATIB_CONFIG[:2])
    if data is None:
        return Row("Katib trial kind", None, f"trials run as {gvk}; {why} (Katib v0.19 in Kubeflow 1.11.0 lists "
                   "TrainJob, v0.18 in 1.10.2 does not)")
    import yaml

    resources = ((((yaml.safe_load(data.get(KATIB_CONFIG[2]) or "") or {}).get("init") or {})
                  .get("controller") or {}).get("trialResources") or [])
    ok = gvk in resources
    return Row("Katib trial kind", ok, f"trials run as {gvk}; katib-config trialResources: {', '.join(resources)}",
               "" if ok else f"add {gvk} to trialResources in {KATIB_CONFIG[0]}/{KATIB_CONFIG[1]} "
                             "and restart katib-controller")


def _kserve_mode_row(cluster, wanted: str) -> tuple[Row, str]:
    data, why = _configmap(cluster, *KSERVE_CONFIG)
    if data is None:
        return Row("KServe deployment mode", None,
                   f"default unknown ({why}); Kubeflow 1.10.2 and 1.11.0 default to Serverless; bincounter "
                   f"deploys {wanted} (annotation {o.KSERVE_MODE_ANNOTATION} when RawDeployment)"), "Serverless"
    try:
        default = json.loads(data.get("deploy") or "{}").get("defaultDeploymentMode", "Serverless")
    except ValueError:
        default = "Serverless"
    return Row("KServe deployment mode", True, f"cluster default {default}; bincounter deploys {wanted}"), default


def _namespace_label_row(cluster, namespace: str) -> Row:
    from kubernetes.client.exceptions import ApiException

    ((key, value),) = o.KATIB_INJECTION_LABEL.items()
    fix = f"kubectl label namespace {namespace} {key}={value}"
    try:
        labels = cluster.core.read_namespace(namespace).metadata.labels or {}
    except ApiException as e:
        return Row("namespace label", False if e.status == 404 else None,
                   f"namespace {namespace}: {_forbidden_or_missing(e)} (Kubeflow profile namespaces carry "
                   f"{key}={value})", fix)
    ok = labels.get(key) == value
    return Row("namespace label", ok, f"{namespace}: {key}={labels.get(key, '(absent)')}"
               + ("" if ok else ": Katib injects no metrics collector, every trial would end MetricsUnavailable"),
               "" if ok else fix)


def _secret_row(cluster, namespace: str, secret: str) -> Row:
    from kubernetes.client.exceptions import ApiException

    fix = (f"kubectl -n {namespace} create secret generic {secret} --from-literal=AWS_ACCESS_KEY_ID=... "
           f"--from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_ENDPOINT_URL=...] "
           f"(template: manifests/common/s3-secret.template.yaml)")
    try:
        sec = cluster.core.read_namespaced_secret(secret, namespace)
    except ApiException as e:
        return Row("S3 Secret", False if e.status == 404 else None, f"{namespace}/{secret}: {_forbidden_or_missing(e)}",
                   fix)
    keys = set(sec.data or {}) | set(getattr(sec, "string_data", None) or {})
    missing = [k for k in o.S3_KEYS if k not in keys]
    optional = [k for k in o.S3_OPTIONAL_KEYS if k not in keys]
    detail = f"{namespace}/{secret}: keys {', '.join(sorted(keys)) or '(none)'}"
    if missing:
        return Row("S3 Secret", False, detail + f"; missing {', '.join(missing)}", fix)
    if optional:
        detail += f"; without {', '.join(optional)} (AWS S3 defaults apply)"
    return Row("S3 Secret", True, detail)


def _service_account_rows(cluster, namespace: str, names: Sequence[str], secret: str) -> list[Row]:
    from kubernetes.client.exceptions import ApiException

    rows = []
    for name in names:
        fix = f"kubectl apply -k manifests/common (or create ServiceAccount {name} in {namespace})"
        try:
            sa = cluster.core.read_namespaced_service_account(name, namespace)
        except ApiException as e:
            rows.append(Row(f"ServiceAccount {name}", False if e.status == 404 else None,
                            f"{namespace}/{name}: {_forbidden_or_missing(e)}", fix))
            continue
        listed = [s.name for s in sa.secrets or []]
        if name == o.WORKLOAD_SA and secret not in listed:
            rows.append(Row(f"ServiceAccount {name}", False,
                            f"does not list Secret {secret} (KServe's storage initializer finds S3 credentials there)",
                            f"kubectl -n {namespace} patch serviceaccount {name} -p "
                            f"'{{\"secrets\": [{{\"name\": \"{secret}\"}}]}}'"))
        else:
            rows.append(Row(f"ServiceAccount {name}", True, f"{namespace}/{name} exists"))
    return rows


def _needed_rules(training_kind: str | None, tune: bool, deploy: bool, deployment_mode: str) -> list[dict]:
    """The ROLE_RULES entries this run's launchers will use."""
    plural = {"PyTorchJob": "pytorchjobs", "TrainJob": "trainjobs"}
    skip = {p for k, p in plural.items() if k != training_kind}
    if not tune:
        skip |= {"experiments", "trials"}
    if not deploy:
        skip |= {"inferenceservices"}
    if not deploy or deployment_mode != "RawDeployment":
        skip |= {"deployments"}
    out = []
    for rule in o.ROLE_RULES:
        resources = [r for r in rule["resources"] if r not in skip]
        if resources:
            out.append({**rule, "resources": resources})
    return out


def _permission_rows(cluster, namespace: str, rules: Sequence[dict]) -> list[Row]:
    from kubernetes import client as k8s

    authz = k8s.AuthorizationV1Api(cluster.api_client)
    rows = []
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                res, _, sub = resource.partition("/")
                names = rule.get("resourceNames") or [None]
                denied = []
                for verb in rule["verbs"]:
                    for name in names:
                        review = k8s.V1SelfSubjectAccessReview(spec=k8s.V1SelfSubjectAccessReviewSpec(
                            resource_attributes=k8s.V1ResourceAttributes(
                                namespace=namespace, verb=verb, group=group, resource=res,
                                subresource=sub or None, name=name)))
                        if not authz.create_self_subject_access_review(review).status.allowed:
                            denied.append(verb)
                label = f"{resource}" + (f".{group}" if group else "") + (f" ({', '.join(names)})" if names[0] else "")
                if denied:
                    rows.append(Row(f"rights: {label}", False, f"denied: {', '.join(denied)}",
                                    f"bind the Role in manifests/common/rbac.yaml (kubectl apply -k manifests/common) "
                                    f"or ask your admin for {', '.join(denied)} on {resource}"))
                else:
                    rows.append(Row(f"rights: {label}", True, ", ".join(rule["verbs"])))
    return rows


def _knative_row(cluster, deployment_mode: str) -> Row:
    if deployment_mode != "Serverless":
        return Row("Knative features", True, f"not used ({deployment_mode})")
    if not cluster.resources("serving.knative.dev", "v1"):
        return Row("Knative features", False, "Knative Serving (serving.knative.dev/v1) is not installed",
                   "install Knative Serving, or deploy with --deployment-mode RawDeployment")
    predictor = o.inference_service(storage_uri="s3://check/model", deployment_mode=deployment_mode)["spec"]["predictor"]
    needed = [o.KNATIVE_GATED_FIELDS[f] for f in o.KNATIVE_GATED_FIELDS if f in predictor]
    data, why = _configmap(cluster, *KNATIVE_FEATURES)
    if not needed:
        return Row("Knative features", True, "the predictor needs none of the flags Kubeflow leaves disabled "
                   f"({', '.join(o.KNATIVE_GATED_FIELDS.values())})" + (f"; {why}" if why else ""))
    if data is None:
        return Row("Knative features", None, f"the predictor needs {', '.join(needed)}; {why}",
                   "ask your admin to enable them in knative-serving/config-features, or use RawDeployment")
    off = [f for f in needed if data.get(f, "disabled") == "disabled"]
    return Row("Knative features", not off, f"needs {', '.join(needed)}; disabled: {', '.join(off) or 'none'}",
               "enable them in knative-serving/config-features, or use RawDeployment" if off else "")


def run_checks(namespace: str, *, api_client=None, s3_secret: str = o.S3_SECRET,
               service_accounts: Sequence[str] = (o.WORKLOAD_SA,), training: str = "auto",
               tune: bool = True, deploy: bool = True, deployment_mode: str = "Serverless") -> list[Row]:
    """Every check, in order, against the cluster api_client points at (in-cluster or kubeconfig)."""
    from bincounter.k8s.cluster import Cluster

    if training not in TRAINING_CHOICES:
        raise ValueError(f"Invalid training {training!r}. Only {', '.join(TRAINING_CHOICES)} are supported.")
    if deployment_mode not in o.DEPLOYMENT_MODES:
        raise ValueError(f"Invalid deployment_mode {deployment_mode!r}. Only {', '.join(o.DEPLOYMENT_MODES)} are supported.")
    cluster = Cluster(api_client)
    row, kind = _training_row(cluster, training)
    rows = [row]
    if tune:
        rows.append(_installed_row(cluster, "Katib", "Experiment",
                                   "install Katib (applications/katib of kubeflow/manifests), or run with tune_trials=0"))
        trial_row = _katib_trial_row(cluster, kind) if rows[-1].ok else None
        if trial_row:
            rows.append(trial_row)
    if deploy:
        rows.append(_installed_row(cluster, "KServe", "InferenceService",
                                   "install KServe (applications/kserve), or run with deploy_model=false"))
        rows.append(_kserve_mode_row(cluster, deployment_mode)[0])
    if tune:
        rows.append(_namespace_label_row(cluster, namespace))
    rows.append(_secret_row(cluster, namespace, s3_secret))
    rows += _service_account_rows(cluster, namespace, service_accounts, s3_secret)
    rows += _permission_rows(cluster, namespace, _needed_rules(kind, tune, deploy, deployment_mode))
    if deploy:
        rows.append(_knative_row(cluster, deployment_mode))
    return rows


def preflight(engine: str, **kwargs: Any) -> list[Row]:
    """What the pipeline's first step runs: the local engine has no cluster to check."""
    if engine == "local":
        return local_rows()
    from bincounter.k8s.cluster import resolve_namespace

    return run_checks(resolve_namespace(kwargs.pop("namespace", "") or None), **kwargs)
