"""Security-scan the rendered manifests with checkov, pod templates of custom resources included.

    python -m bincounter.k8s.scan --checkov .venv/tools/checkov/bin/checkov manifests

checkov's Kubernetes checks only look inside the built-in workload kinds (Pod,
Deployment, Job, ...), so a PyTorchJob, TrainJob, Katib trial template or
InferenceService predictor would pass unseen. This renders every overlay with
``kubectl kustomize``, writes each pod those objects would create as a plain Pod
(named after its source object), and runs checkov on both. Every skipped check is
in SKIPS below, with its reason and the pods it applies to; it is passed to checkov
as its own per-resource skip annotation, so checkov reports it as skipped, with
the reason, instead of passed.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

import yaml

# trainer-v2 (Trainer v2.1's podTemplateOverrides) is not scanned: that API cannot set a security
# context, so its pods run with the ClusterTrainingRuntime's (docs/kubernetes.md, known limits);
# trainer-v2.2 scans the same TrainJob with runtimePatches, which sets ours.
OVERLAYS = ("overlays/cpu-smoke", "overlays/gpu", "overlays/kubeflow", "trainer-v2.2", "audit")
TRAINING = ("PyTorchJob", "Experiment", "TrainJob")
BATCH = TRAINING + ("Job",)  # the audit's Indexed Job: checkov scans Jobs itself, skips go on the Job
ALL = BATCH + ("InferenceService",)

# check id -> (kinds whose pods skip it, reason). Nothing else is skipped.
SKIPS: dict[str, tuple[tuple[str, ...], str]] = {
    "CKV_K8S_8": (BATCH, "batch training and audit pods serve nothing to probe; the InferenceService has liveness and readiness probes"),
    "CKV_K8S_9": (BATCH, "batch training and audit pods serve nothing to probe; the InferenceService has liveness and readiness probes"),
    "CKV_K8S_15": (ALL, "images use immutable release tags from bincounter/images.py; IfNotPresent lets kind-loaded images run (cpu-smoke)"),
    "CKV_K8S_43": (ALL, "tags come from bincounter/images.py; pin digests at release with `kustomize edit set image NAME@sha256:...`"),
    "CKV_K8S_35": (BATCH, "boto3 reads S3 credentials from AWS_* env vars (the convention KServe and KFP use too); TrainJob's API takes env only"),
    "CKV_K8S_38": (("TrainJob",), "Trainer v2 runtimePatches cannot set automountServiceAccountToken; the bincounter ServiceAccount sets it false"),
    "CKV_K8S_29": (("InferenceService",), "Knative 1.16 (KServe Serverless) rejects a pod-level securityContext with Kubeflow's "
                                          "default config-features; the container securityContext sets non-root, UID, seccomp"),
    "CKV2_K8S_6": (ALL, "NetworkPolicies depend on the cluster's CNI and mesh: torchrun needs pod-to-pod rendezvous and S3 egress, "
                        "serving traffic is governed by Knative/Istio (AuthorizationPolicy in the kubeflow overlay)"),
}


def pod_specs(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(suffix, pod metadata, pod spec) of every pod a custom resource would create."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "PyTorchJob":
        for role, rs in spec["pytorchReplicaSpecs"].items():
            yield role.lower(), rs["template"].get("metadata", {}), rs["template"]["spec"]
    elif kind == "Experiment":
        for suffix, meta, pod in pod_specs(spec["trialTemplate"]["trialSpec"]):
            yield "trial-" + suffix, meta, pod
    elif kind == "InferenceService":
        pod = {k: v for k, v in spec["predictor"].items()
               if k not in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "scaleMetricType",
                            "containerConcurrency", "timeout", "canaryTrafficPercent", "batcher", "logger")}
        yield "predictor", {}, pod
    elif kind == "TrainJob":
        # The runtime's pod, with what the TrainJob sets: trainer image/command/resources/env
        # and the runtimePatches pod patch (the runtime's own template is not ours to scan).
        trainer = spec["trainer"]
        for patch in spec.get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                tmpl = job["template"]["spec"]["template"]
                pod = dict(tmpl["spec"])
                pod["containers"] = [{**c, "image": trainer["image"], "command": trainer["command"],
                                      "args": trainer["args"], "env": trainer["env"],
                                      "resources": trainer["resourcesPerNode"]} for c in tmpl["spec"]["containers"]]
                yield job["name"], tmpl.get("metadata", {}), pod


def skip_annotations(kind: str) -> dict[str, str]:
    ids = [(check, reason) for check, (kinds, reason) in SKIPS.items() if kind in kinds]
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(ids, 1)}


def as_pods(obj: dict) -> list[dict]:
    name, ns = obj["metadata"].get("name", "x"), obj["metadata"].get("namespace")
    # An Experiment's pods are its trial job's pods: they skip what that kind skips.
    skips = skip_annotations(obj["kind"] if obj["kind"] != "Experiment" else
                             obj["spec"]["trialTemplate"]["trialSpec"]["kind"])
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{obj['kind'].lower()}-{name}-{suffix}", "namespace": ns,
                          "labels": meta.get("labels", {}), "annotations": skips},
             "spec": pod} for suffix, meta, pod in pod_specs(obj)]


def render(manifests: pathlib.Path, out: pathlib.Path, overlays=OVERLAYS) -> list[pathlib.Path]:
    files = []
    for rel in overlays:
        text = subprocess.run(["kubectl", "kustomize", str(manifests / rel)], capture_output=True, text=True,
                              check=True).stdout
        objs = [d for d in yaml.safe_load_all(text) if d]
        for obj in objs:
            if obj["kind"] == "Job":  # a built-in workload: checkov reads its skips from the Job itself
                meta = obj.setdefault("metadata", {})
                meta["annotations"] = {**meta.get("annotations", {}), **skip_annotations("Job")}
        pods = [p for obj in objs for p in as_pods(obj)]
        path = out / (rel.replace("/", "_") + ".yaml")
        path.write_text(yaml.safe_dump_all(objs + pods, sort_keys=False))
        files.append(path)
    return files


def run_checkov(checkov: str, manifests: pathlib.Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        render(manifests, pathlib.Path(tmp))
        cmd = [checkov, "--directory", tmp, "--framework", "kubernetes", "--skip-download", "--compact", *extra]
        # BC_* off: never phone home (no network here, and none needed).
        env = {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_COLOR": "1", "ANSI_COLORS_DISABLED": "1",
               "PATH": "/usr/bin:/bin", "HOME": tmp}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("manifests", nargs="?", default="manifests", help="the manifests/ folder")
    p.add_argument("--checkov", default=shutil.which("checkov") or ".venv/tools/checkov/bin/checkov",
                   help="checkov executable")
    return p


def main(args: argparse.Namespace) -> int:
    if not pathlib.Path(args.checkov).exists():
        print(f"checkov not found: {args.checkov}. Install it with `bash manifests/install-checkov.sh`.",
              file=sys.stderr)
        return 2
    proc = run_checkov(args.checkov, pathlib.Path(args.manifests))
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
