"""The Kubernetes objects: generated base without drift, every overlay renders with
kubectl kustomize, and every rendered object validates strictly against the
upstream schemas (tests/k8s_schemas.py says which)."""

import copy
import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

import k8s_schemas
from bincounter import images, search_space
from bincounter.k8s import manifests, objects as o

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = ["common", "base", "trainer-v2", "trainer-v2.2", "overlays/cpu-smoke", "overlays/gpu",
                  "overlays/kubeflow", "audit"]
# The Kubeflow releases each folder claims to run on (docs/kubernetes.md, support matrix); every
# rendered object must validate against each of those releases' own CRDs. trainer-v2.2 is for
# Trainer >= 2.2, which no supported release ships: it is checked against Trainer v2.3's CRD.
CLAIMS = {"common": ("1.10.2", "1.11.0"), "base": ("1.10.2",), "trainer-v2": ("1.11.0",), "trainer-v2.2": (None,),
          "overlays/cpu-smoke": ("1.10.2",), "overlays/gpu": ("1.10.2",), "overlays/kubeflow": ("1.10.2",),
          "audit": ("1.10.2", "1.11.0")}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


def kustomize(rel: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / rel)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return k8s_schemas.load_all(out.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {rel: kustomize(rel) for rel in KUSTOMIZATIONS}


def by_kind(objs, kind):
    return [x for x in objs if x["kind"] == kind]


def pod_templates(obj):
    """(where, pod spec, pod metadata) of every pod a rendered object would create."""
    if obj["kind"] == "PyTorchJob":
        for role, rs in obj["spec"]["pytorchReplicaSpecs"].items():
            yield role, rs["template"]["spec"], rs["template"]["metadata"]
    elif obj["kind"] == "Experiment":
        for item in pod_templates(obj["spec"]["trialTemplate"]["trialSpec"]):
            yield item
    elif obj["kind"] == "InferenceService":
        yield "predictor", obj["spec"]["predictor"], {}


def test_checked_in_manifests_match_the_builders():
    stale = manifests.drift(MANIFESTS)
    assert not stale, f"regenerate with `python -m bincounter.k8s.manifests --write manifests`: {stale}"


def test_drift_check_notices_an_edited_file(tmp_path):
    manifests.write(tmp_path)
    assert manifests.drift(tmp_path) == []
    job = tmp_path / "base" / "pytorchjob.yaml"
    job.write_text(job.read_text().replace("backoffLimit: 3", "backoffLimit: 4"))
    assert manifests.drift(tmp_path) == ["base/pytorchjob.yaml"]
    assert manifests.main(manifests.get_args_parser().parse_args(["--check", str(tmp_path)])) == 1


@needs_kubectl
@pytest.mark.parametrize("rel, release", [(rel, r) for rel in KUSTOMIZATIONS for r in CLAIMS[rel]])
def test_every_rendered_object_validates_strictly(rendered, rel, release):
    objs = rendered[rel]
    assert objs
    problems = [p for obj in objs for p in k8s_schemas.errors(obj, release)]
    assert problems == []


def test_trainer_v2_folder_has_what_trainer_2_1_accepts():
    """Defect: manifests/trainer-v2 used runtimePatches, which Trainer v2.1.0 (Kubeflow 1.11.0) lacks."""
    (tj,) = k8s_schemas.load_all((MANIFESTS / "trainer-v2" / "trainjob.yaml").read_text())
    assert "podTemplateOverrides" in tj["spec"] and k8s_schemas.errors(tj, "1.11.0") == []
    assert k8s_schemas.errors(o.trainjob("t", data_uri="s3://b/d", model_uri="s3://b/m", api="runtimePatches"),
                              "1.11.0")  # the >= 2.2 API is refused by 1.11.0's CRD


def test_secret_template_validates_and_holds_no_real_secret():
    (secret,) = k8s_schemas.load_all((MANIFESTS / "common" / "s3-secret.template.yaml").read_text())
    k8s_schemas.validate(secret)
    assert all(v.startswith("REPLACE-WITH") for k, v in secret["stringData"].items() if k in o.S3_KEYS)
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == "s3.amazonaws.com"
    # never applied by -k: it would overwrite real credentials
    assert "s3-secret.template.yaml" not in (MANIFESTS / "common" / "kustomization.yaml").read_text()


@pytest.mark.parametrize("mutate, where", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolcy", "Always"), "imagePullPolcy"),
    (lambda j: j["spec"]["runPolicy"].__setitem__("cleanPodPolicie", "All"), "cleanPodPolicie"),
    (lambda j: j["metadata"].__setitem__("lables", {}), "lables"),
    (lambda j: j["spec"].__setitem__("nprocPerNode", 2), "is not of type 'string'"),
])
def test_a_misspelled_or_mistyped_field_fails(mutate, where):
    job = o.pytorchjob("j", data_uri="s3://b/d", model_uri="s3://b/m", workers=2)
    k8s_schemas.validate(job)
    mutate(job)
    problems = k8s_schemas.errors(job)
    assert problems and where in problems[0]


def test_misspellings_inside_katib_and_kserve_objects_fail():
    exp = o.experiment("e", data_uri="s3://b/d", trials_uri="s3://b/t")
    k8s_schemas.validate(exp)
    bad = copy.deepcopy(exp)
    bad["spec"]["paralelTrialCount"] = 1
    assert "paralelTrialCount" in k8s_schemas.errors(bad)[0]
    bad = copy.deepcopy(exp)  # the trial template is checked as the PyTorchJob it is
    bad["spec"]["trialTemplate"]["trialSpec"]["spec"]["runPolicy"]["backofLimit"] = 1
    assert "backofLimit" in k8s_schemas.errors(bad)[0]
    bad = copy.deepcopy(exp)  # core types inside Katib's definitions resolve to Kubernetes' schemas
    bad["spec"]["metricsCollectorSpec"]["collector"]["kindd"] = "StdOut"
    assert "kindd" in k8s_schemas.errors(bad)[0]
    isvc = o.inference_service(storage_uri="s3://b/m")
    k8s_schemas.validate(isvc)
    isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    assert "paht" in k8s_schemas.errors(isvc)[0]
    tj = o.trainjob("t", data_uri="s3://b/d", model_uri="s3://b/m")
    k8s_schemas.validate(tj, "1.11.0")
    tj["spec"]["trainer"]["numNode"] = 2
    assert "numNode" in k8s_schemas.errors(tj, "1.11.0")[0]


def test_experiment_is_the_pytorchjob_with_the_shared_search_space():
    kw = dict(data_uri="s3://b/d", extra_args=["--epochs", "2"], workers=2, nproc_per_node=2,
              resources=o.Resources(cpu="2", memory="4Gi", gpus=1))
    exp = o.experiment("e", trials_uri="s3://b/t", **kw)
    spec = exp["spec"]
    assert spec["parameters"] == search_space.to_katib_parameters()
    assert spec["objective"]["objectiveMetricName"] == search_space.OBJECTIVE_METRIC == "val-accuracy"
    assert spec["objective"]["type"] == "maximize"
    assert spec["algorithm"]["algorithmName"] in o.ALGORITHMS
    assert spec["earlyStopping"]["algorithmName"] == "medianstop"
    assert spec["metricsCollectorSpec"]["collector"]["kind"] == "StdOut"
    tmpl = spec["trialTemplate"]
    assert tmpl["primaryContainerName"] == "pytorch"
    assert tmpl["primaryPodLabels"] == {"training.kubeflow.org/replica-type": "master"}
    assert 'type=="Succeeded"' in tmpl["successCondition"] and 'type=="Failed"' in tmpl["failureCondition"]
    # every searched flag is passed to the trainer from a trial parameter that references it
    refs = {p["name"]: p["reference"] for p in tmpl["trialParameters"]}
    args = tmpl["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    for p in search_space.SEARCH_SPACE:
        placeholder = args[args.index(p.flag) + 1]
        assert refs[placeholder.removeprefix("${trialParameters.").removesuffix("}")] == p.name
    assert refs["trialName"] == "${trialSpec.Name}"
    # apart from the searched flags, the trial is exactly the standalone job's pod
    job = o.pytorchjob(None, None, model_uri="s3://b/t/${trialParameters.trialName}", backoff_limit=0, **kw)
    trial = copy.deepcopy(tmpl["trialSpec"])
    for rs in trial["spec"]["pytorchReplicaSpecs"].values():
        c = rs["template"]["spec"]["containers"][0]
        c["args"] = c["args"][:c["args"].index(search_space.SEARCH_SPACE[0].flag)]
    assert trial["spec"] == job["spec"]


def test_experiment_rejects_extra_args_that_katib_searches():
    with pytest.raises(ValueError, match="base-lr"):
        o.experiment("e", data_uri="s3://b/d", trials_uri="s3://b/t", extra_args=["--base-lr", "0.1"])
    with pytest.raises(ValueError, match="Only tpe, random"):
        o.experiment("e", data_uri="s3://b/d", trials_uri="s3://b/t", algorithm="grid")


def test_pytorchjob_topology_and_policies():
    job = o.pytorchjob("j", data_uri="s3://b/d", model_uri="s3://b/m", workers=3, nproc_per_node=4,
                       resources=o.Resources(cpu="8", memory="32Gi", gpus=4))
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert {"backoffLimit", "ttlSecondsAfterFinished"} <= set(spec["runPolicy"])
    for rs in spec["pytorchReplicaSpecs"].values():
        assert rs["restartPolicy"] == "OnFailure"
        assert rs["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        (c,) = rs["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["command"] == ["torchrun", "-m", "bincounter.train"]
        assert c["args"][:4] == ["--data", "s3://b/d", "--output", "s3://b/m"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["image"] == images.image("trainer")
    single = o.pytorchjob("j", data_uri="s3://b/d", model_uri="s3://b/m")
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    with pytest.raises(ValueError, match="workers"):
        o.pytorchjob("j", data_uri="s3://b/d", model_uri="s3://b/m", workers=0)


def test_trainjob_is_the_same_training_on_trainer_v2():
    kw = dict(data_uri="s3://b/d", model_uri="s3://b/m", extra_args=["--epochs", "2"], workers=2, nproc_per_node=2)
    pj = o.pytorchjob("t", node_selector={"a": "b"}, **kw)
    pod = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    c = pod["spec"]["containers"][0]
    for api in o.TRAINJOB_APIS:
        tj = o.trainjob("t", api=api, node_selector={"a": "b"}, **kw)
        trainer = tj["spec"]["trainer"]
        assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
        assert (trainer["command"], trainer["args"], trainer["image"]) == (c["command"], c["args"], c["image"])
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)
        assert trainer["resourcesPerNode"] == c["resources"]
    # Trainer >= 2.2: the whole pod patch, security context included
    tj = o.trainjob("t", api="runtimePatches", **kw)
    patched = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_patch = patched["template"]["spec"]["template"]
    assert patched["name"] == "node" and pod_patch["metadata"] == pod["metadata"]
    assert pod_patch["spec"]["securityContext"] == pod["spec"]["securityContext"]
    # Trainer v2.1: what podTemplateOverrides can carry (no security context in that API)
    tj = o.trainjob("t", api="podTemplateOverrides", node_selector={"a": "b"}, **kw)
    (override,) = tj["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}] and override["metadata"] == pod["metadata"]
    assert override["spec"]["nodeSelector"] == {"a": "b"} and override["spec"]["volumes"] == pod["spec"]["volumes"]
    assert override["spec"]["containers"] == [{"name": "node", "volumeMounts": c["volumeMounts"]}]


@needs_kubectl
def test_every_pod_runs_non_root_with_requests_and_limits(rendered):
    for rel in KUSTOMIZATIONS:
        for obj in rendered[rel]:
            for where, spec, _ in pod_templates(obj):
                for c in spec["containers"]:
                    # non-root on the pod, or on each container (a Serverless predictor: Knative
                    # allows only the container securityContext)
                    assert (spec.get("securityContext") or c["securityContext"])["runAsNonRoot"] is True, (rel, where)
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False
                    assert set(c["resources"]) == {"requests", "limits"}
                    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
                    assert c["image"].split(":")[0] in {
                        images.image(r, registry_=images.DEFAULT_REGISTRY).split(":")[0] for r in images.IMAGES}


@needs_kubectl
def test_overlays_change_what_they_say(rendered):
    smoke = rendered["overlays/cpu-smoke"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(smoke)
    (job,) = by_kind(smoke, "PyTorchJob")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"] and job["spec"]["nprocPerNode"] == "2"
    (exp,) = by_kind(smoke, "Experiment")
    assert (exp["spec"]["parallelTrialCount"], exp["spec"]["maxTrialCount"]) == (1, 3)

    gpu = rendered["overlays/gpu"]
    (job,) = by_kind(gpu, "PyTorchJob")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    for obj in by_kind(gpu, "PyTorchJob") + by_kind(gpu, "Experiment"):
        for _, spec, _ in pod_templates(obj):
            # the overlay's spot placement is the one launchers use (objects.SPOT_*)
            assert spec["nodeSelector"] == o.SPOT_NODE_SELECTOR
            assert spec["tolerations"] == o.SPOT_TOLERATIONS
            assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in ("1", "4")

    kf = rendered["overlays/kubeflow"]
    assert not by_kind(kf, "Namespace")  # the Profile owns the namespace
    assert {x["metadata"]["namespace"] for x in kf} == {"kubeflow-user-example-com"}
    (binding,) = by_kind(kf, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == "kubeflow-user-example-com"
    (policy,) = by_kind(kf, "AuthorizationPolicy")
    assert policy["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "bincounter"}


def test_role_grants_only_what_the_launchers_call():
    granted = {(g, r, v) for rule in o.ROLE_RULES for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert not any(v in ("*", "list", "watch") and r in ("secrets",) for _, r, v in granted)
    assert all("*" not in (g, r, v) for g, r, v in granted)
    assert ("", "pods/log", "get") in granted and ("kubeflow.org", "pytorchjobs", "create") in granted


def test_inference_service_custom_predictor():
    isvc = o.inference_service("m", "ns", storage_uri="s3://b/m", min_replicas=1, max_replicas=4,
                               scale_metric="rps", scale_target=20)
    p = isvc["spec"]["predictor"]
    (c,) = p["containers"]
    assert c["name"] == "kserve-container" and {"name": "STORAGE_URI", "value": "s3://b/m"} in c["env"]
    assert c["args"] == ["--model", "/mnt/models", "--model-name", "bincounter", "--port", "8080"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models/bincounter"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert (p["minReplicas"], p["maxReplicas"], p["scaleMetric"], p["scaleTarget"]) == (1, 4, "rps", 20)
    assert p["serviceAccountName"] == o.WORKLOAD_SA
    with pytest.raises(ValueError, match="scale_metric"):
        o.inference_service(storage_uri="s3://b/m", scale_metric="gpu")


@needs_kubectl
def test_kustomize_edit_set_image_reaches_every_trainer_container(tmp_path):
    """docs/kubernetes.md tells users to retag with kustomize's images transformer."""
    base = os.path.relpath(MANIFESTS / "base", tmp_path)  # kustomize refuses absolute resource paths
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}]\n"
        "images: [{name: ghcr.io/bincounter/bincounter-trainer, newName: my.registry/t, newTag: '9'}]\n")
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objs = k8s_schemas.load_all(out.stdout)
    trainer_images = [c["image"] for obj in objs for _, spec, _ in pod_templates(obj) for c in spec["containers"]
                      if obj["kind"] != "InferenceService"]
    assert len(trainer_images) == 3 and set(trainer_images) == {"my.registry/t:9"}
