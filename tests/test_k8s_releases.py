"""bincounter on a stock Kubeflow 1.10.2 and 1.11.0, against the API double's release profiles.

tests/k8s_double.py with ``release=...`` replays what each release does (tests/k8s_releases.py
reads it from the release's own files under tests/schemas/releases and cites the upstream
source of each behaviour): API discovery, 403 for kinds not installed, the release's CRDs at
admission, Knative's field masks, Katib's trial resources and injection label, the Training
Operator's restarts by exit code, SelfSubjectAccessReview. No real cluster or controller runs.
Each defect of issue 10 has a test here that fails on the code before the fix.
"""

import copy

import pytest

import k8s_double as kd
import k8s_releases
import k8s_schemas
from bincounter import search_space
from bincounter.k8s import check, cli, launchers, objects as o

NS = "team-a"
FAST = dict(poll_s=0.01, report_every_s=0.05)
RELEASES = k8s_releases.RELEASES


@pytest.fixture(params=RELEASES)
def release(request):
    return request.param


@pytest.fixture
def double(release):
    d = kd.K8sDouble(release)
    d.profile_namespace(NS)
    d.seed(o.s3_secret(namespace=NS))
    d.seed(o.service_account(namespace=NS))
    d.start()
    yield d
    d.stop()


@pytest.fixture
def lines():
    return []


# ---------------------------------------------------------------- the profiles themselves

def test_profiles_are_read_from_the_release_files():
    old, new = k8s_releases.release_profile("1.10.2"), k8s_releases.release_profile("1.11.0")
    assert "PyTorchJob" in old.kinds and "TrainJob" not in old.kinds
    assert "TrainJob" in new.kinds and "PyTorchJob" not in new.kinds  # Training Operator commented out in 1.11.0
    assert new.trainjob_api == "podTemplateOverrides" and "runtimePatches" not in new.trainjob_spec_fields
    assert "TrainJob.v1alpha1.trainer.kubeflow.org" in new.katib_trial_resources
    assert "TrainJob.v1alpha1.trainer.kubeflow.org" not in old.katib_trial_resources
    for rel in (old, new):
        assert rel.kserve_default_mode == "Serverless"
        assert rel.injection_label == tuple(o.KATIB_INJECTION_LABEL.items())[0]
        assert rel.profile_labels[rel.injection_label[0]] == rel.injection_label[1]
        for flag in o.KNATIVE_GATED_FIELDS.values():
            assert rel.knative_features[flag] == "disabled", flag


def test_double_discovers_only_installed_kinds_and_forbids_the_rest(double, release):
    cluster = launchers.Cluster(double.api_client())
    assert cluster.installed("PyTorchJob") == (release == "1.10.2")
    assert cluster.installed("TrainJob") == (release == "1.11.0")
    assert cluster.trainjob_api() == ("podTemplateOverrides" if release == "1.11.0" else None)
    missing = "TrainJob" if release == "1.10.2" else "PyTorchJob"
    with pytest.raises(launchers.ApiException) as e:
        cluster.list(o.CUSTOM_KINDS[missing], NS, "a=b")
    assert e.value.status == 403


def test_training_operator_restarts_by_exit_code():
    # kubeflow/training-operator pkg/controller.v1/common/pod.go + pkg/util/train/train_util.go
    assert k8s_releases.training_operator_restarts("ExitCode", 137)
    assert not k8s_releases.training_operator_restarts("ExitCode", 1)  # torchrun's exit on a lost peer
    assert k8s_releases.training_operator_restarts("OnFailure", 1)
    assert not k8s_releases.training_operator_restarts("Never", 137)


# ---------------------------------------------------------------- defect 3: Knative masks

def test_serverless_predictor_passes_knative_masks(release):
    features = k8s_releases.release_profile(release).knative_features
    isvc = o.inference_service("m", NS, storage_uri="s3://b/m")
    assert k8s_releases.knative_rejections(isvc["spec"]["predictor"], features) == []
    c = isvc["spec"]["predictor"]["containers"][0]["securityContext"]
    assert c["runAsNonRoot"] is True and c["runAsUser"] == o.RUN_AS_UID and c["seccompProfile"]
    # the mask itself: a pod-level securityContext or a nodeSelector is refused
    bad = copy.deepcopy(isvc["spec"]["predictor"]) | {"securityContext": {"fsGroup": 1}, "nodeSelector": {"a": "b"}}
    assert k8s_releases.knative_rejections(bad, features) == ["spec.template.spec.securityContext",
                                                              "spec.template.spec.nodeSelector"]


def test_deploy_serverless_on_both_releases(double, lines):
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1))
    result = launchers.deploy("bincounter", NS, storage_uri="s3://b/models/m1", api_client=double.api_client(),
                              log=lines.append, **FAST)
    assert result["internal_url"] == f"http://bincounter.{NS}.svc.cluster.local"
    assert not double.rejected


def test_gpu_placement_needs_raw_deployment(double, lines):
    with pytest.raises(ValueError, match="RawDeployment"):
        o.inference_service(storage_uri="s3://b/m", node_selector={"nvidia.com/gpu.present": "true"})
    name = "bincounter"
    double.script("inferenceservices", name, [{}, kd.isvc_raw_ready(NS, name, 1)])
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{name}-predictor", "namespace": NS},
           "spec": {"replicas": 1}}
    double.put_object(dep, "deployments")
    double.script("deployments", f"{name}-predictor", kd.deployment_rollout(NS, name, 1))
    launchers.deploy(name, NS, storage_uri="s3://b/m", deployment_mode="RawDeployment",
                     node_selector={"nvidia.com/gpu.present": "true"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     api_client=double.api_client(), log=lines.append, **FAST)
    isvc = double.objects[("inferenceservices", NS, name)]
    assert isvc["metadata"]["annotations"][o.KSERVE_MODE_ANNOTATION] == "RawDeployment"
    assert isvc["spec"]["predictor"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert isvc["spec"]["predictor"]["scaleMetric"] == "cpu"  # Raw scales with an HPA
    # waited for the Deployment's rollout, not only the InferenceService's Ready
    dep_gets = [r for r in double.requests if r[1].endswith(f"/deployments/{name}-predictor")]
    assert len(dep_gets) >= 3 and "updated=1 available=1" in "\n".join(lines)


# ---------------------------------------------------------------- defect 4: Katib's namespace label

def _tune(double, lines, **kw):
    return launchers.tune("tune1", NS, data_uri="s3://b/split", trials_uri="s3://b/trials",
                          api_client=double.api_client(), log=lines.append, **FAST, **kw)


def test_our_namespace_gets_metrics_collector_injection(double, release, lines):
    ns = o.namespace("bincounter-ns")
    key, value = k8s_releases.release_profile(release).injection_label  # from Katib's webhooks.yaml
    assert ns["metadata"]["labels"].get(key) == value
    best = {"base-lr": "0.002", "batch-size": "32", "weight-decay": "0.05", "dropout": "0.2"}
    double.namespaces[NS] = ns["metadata"]["labels"]  # the namespace our manifests create
    double.script("experiments", "tune1", kd.experiment_success(NS, "tune1", best, accuracy=0.6))
    assert _tune(double, lines)["best_hyperparameters"]["batch-size"] == 32


def test_without_the_label_every_trial_ends_metrics_unavailable(double, lines):
    double.namespaces[NS] = {}
    with pytest.raises(launchers.LaunchError, match="without a best trial"):
        _tune(double, lines)


# ---------------------------------------------------------------- defect 5: restarts

def test_a_lost_peer_restarts_the_pytorchjob(lines):
    d = kd.K8sDouble("1.10.2")
    d.profile_namespace(NS)
    d.on_create["pytorchjobs"] = lambda double, job: kd.pytorchjob_after_exit(job, exit_code=1)  # torchrun: 1
    d.start()
    try:
        result = launchers.train("job1", NS, data_uri="s3://b/d", model_uri="s3://b/m", workers=2,
                                 api_client=d.api_client(), log=lines.append, **FAST)
    finally:
        d.stop()
    assert result["kind"] == "PyTorchJob" and "Restarting" in "\n".join(lines)
    job = d.objects[("pytorchjobs", NS, "job1")]
    assert {rs["restartPolicy"] for rs in job["spec"]["pytorchReplicaSpecs"].values()} == {"OnFailure"}
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1


# ---------------------------------------------------------------- defect 6: Trainer v2.1 / >= 2.2

def test_trainjob_uses_the_installed_trainer_api(lines):
    for release, api in (("1.11.0", "podTemplateOverrides"), (None, "runtimePatches")):  # None: Trainer v2.3
        d = kd.K8sDouble(release).start()
        try:
            d.script("trainjobs", "job2", kd.trainjob_success(NS, "job2"))
            launchers.train("job2", NS, data_uri="s3://b/d", model_uri="s3://b/m", kind="TrainJob",
                            api_client=d.api_client(), log=lines.append, **FAST)
        finally:
            d.stop()
        tj = d.objects[("trainjobs", NS, "job2")]
        assert api in tj["spec"] and not d.rejected, (release, d.rejected)


def test_tuning_trials_are_trainjobs_where_pytorchjob_is_absent(double, release, lines):
    best = {"base-lr": "0.002", "batch-size": "32", "weight-decay": "0.05", "dropout": "0.2"}
    double.script("experiments", "tune1", kd.experiment_success(NS, "tune1", best, accuracy=0.6))
    _tune(double, lines)
    exp = double.objects[("experiments", NS, "tune1")]
    tmpl = exp["spec"]["trialTemplate"]
    want = "TrainJob" if release == "1.11.0" else "PyTorchJob"
    assert tmpl["trialSpec"]["kind"] == want and not double.rejected
    assert tmpl["primaryContainerName"] == ("node" if want == "TrainJob" else "pytorch")
    kind, version, group = (f"{want}.{tmpl['trialSpec']['apiVersion'].split('/')[1]}."
                            f"{tmpl['trialSpec']['apiVersion'].split('/')[0]}").split(".", 2)
    assert f"{kind}.{version}.{group}" in k8s_releases.release_profile(release).katib_trial_resources


# ---------------------------------------------------------------- defect 8: bayesianoptimization

def test_bayesianoptimization_is_refused_for_a_double_from_zero():
    assert "bayesianoptimization" not in o.ALGORITHMS
    assert any(p.kind == "double" and p.low <= 0 for p in search_space.SEARCH_SPACE)  # dropout from 0
    with pytest.raises(ValueError, match="log-transforms"):
        o.experiment("e", data_uri="s3://b/d", trials_uri="s3://b/t", algorithm="bayesianoptimization")
    positive = [search_space.Param("lr", "double", low=1e-4, high=1e-2)]
    search_space.check_algorithm("bayesianoptimization", positive)  # fine when every min > 0


# ---------------------------------------------------------------- defect 9: readiness

@pytest.mark.parametrize("rel", [None, *RELEASES])  # None: no release's admission rules, readiness alone
def test_update_waits_for_the_new_revision_not_observed_generation(rel, lines):
    """KServe copies observedGeneration from the Knative Service, which is ahead of the ISVC's own
    generation after KServe changed it: the old Ready=True must not count as the new model."""
    double = kd.K8sDouble(rel).start()
    try:
        old = o.inference_service("bincounter", NS, storage_uri="s3://b/models/m0")
        double.put_object(old, "inferenceservices", status=kd.isvc_ready(NS, "bincounter", 5), generation=3)
        double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 4, ksvc_generation=6),
                      generation=4)
        launchers.deploy("bincounter", NS, storage_uri="s3://b/models/m1", api_client=double.api_client(),
                         log=lines.append, **FAST)
    finally:
        double.stop()
    final = double.objects[("inferenceservices", NS, "bincounter")]["status"]["components"]["predictor"]
    assert final["latestReadyRevision"] == final["latestCreatedRevision"] == "bincounter-predictor-00006"


# ---------------------------------------------------------------- defect 10: failed trial logs

def test_failed_trial_log_comes_from_katibs_collector(double, release, lines):
    kind = "TrainJob" if release == "1.11.0" else "PyTorchJob"
    double.script("experiments", "tune1", kd.experiment_failure(NS, "tune1"))
    double.put_object(kd.trial(NS, "tune1", "tune1-abc", "Failed", {}, "0"), "trials")
    primary = "node" if kind == "TrainJob" else "pytorch"
    double.pods = [kd.katib_trial_pod(NS, "tune1-abc", kind, primary, 1, "ValueError: Invalid optimizer", double.logs)]
    with pytest.raises(launchers.LaunchError, match="ExperimentMaxFailedTrialsReached"):
        _tune(double, lines)
    text = "\n".join(lines)
    assert "ValueError: Invalid optimizer" in text and o.KATIB_COLLECTOR_CONTAINER in text
    assert double.objects.get(("experiments", NS, "tune1")) is None  # cleaned up on failure
    exp = o.experiment("e", data_uri="s3://b/d", trials_uri="s3://b/t")
    assert exp["spec"]["trialTemplate"]["retain"] is True


# ---------------------------------------------------------------- every rendered object, per release

@pytest.mark.parametrize("release", RELEASES)
def test_launcher_objects_validate_against_each_release(release):
    kw = dict(data_uri="s3://b/d", model_uri="s3://b/m")
    kinds = k8s_releases.release_profile(release).kinds
    objs = [o.inference_service("m", NS, storage_uri="s3://b/m"),
            o.inference_service("m", NS, storage_uri="s3://b/m", deployment_mode="RawDeployment",
                                node_selector={"a": "b"})]
    trial_kind = "PyTorchJob" if "PyTorchJob" in kinds else "TrainJob"
    objs.append(o.experiment("e", NS, data_uri="s3://b/d", trials_uri="s3://b/t", trial_kind=trial_kind))
    objs.append(o.pytorchjob("j", NS, **kw) if trial_kind == "PyTorchJob" else o.trainjob("j", NS, **kw))
    for obj in objs:
        assert k8s_schemas.errors(obj, release) == [], obj["kind"]


# ---------------------------------------------------------------- bincounter k8s check

def _rows(double, **kw):
    return {r.name: r for r in check.run_checks(NS, api_client=double.api_client(), **kw)}


def test_check_passes_on_a_ready_profile(double, release):
    rows = _rows(double)
    assert check.failed(rows.values()) == [], check.format_table(list(rows.values()))
    training = rows["training API"].detail
    if release == "1.11.0":
        assert "TrainJob trainer.kubeflow.org/v1alpha1: installed (podTemplateOverrides: Trainer v2.1)" in training
        assert not any("pytorchjobs" in name for name in rows)  # not used there: not checked
    else:
        assert "PyTorchJob kubeflow.org/v1: installed" in training and "runs as PyTorchJob" in training
    assert rows["rights: experiments.kubeflow.org"].ok is True
    assert rows["namespace label"].ok is None  # a profile user cannot read its Namespace object
    assert "Kubeflow 1.10.2 and 1.11.0 default to Serverless" in rows["KServe deployment mode"].detail
    assert rows["Knative features"].ok is True


def test_check_reads_katib_trial_resources_when_it_may(double, release):
    """katib-config as the release installs it (tests/schemas/releases/<release>/katib-config.yaml)."""
    text = k8s_schemas.release_file(release, "katib-config.yaml").read_text()
    double.seed({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "katib-config", "namespace": "kubeflow"},
                 "data": {"katib-config.yaml": text}})
    assert _rows(double)["Katib trial kind"].ok is None  # a profile user cannot read it
    double.rbac_rules.append({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]})
    row = _rows(double)["Katib trial kind"]
    assert row.ok is True and ("TrainJob.v1alpha1" if release == "1.11.0" else "PyTorchJob.v1") in row.detail
    # 1.10.2's Katib v0.18 cannot run TrainJob trials
    if release == "1.10.2":
        cluster = launchers.Cluster(double.api_client())
        assert check._katib_trial_row(cluster, "TrainJob").ok is False


def test_check_reports_what_would_break_a_run_with_the_fix(double, release):
    del double.objects[("secrets", NS, o.S3_SECRET)]
    double.rbac_rules[0] = {**double.rbac_rules[0], "verbs": ["create", "get", "list"]}  # no delete
    double.rbac_rules.append({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]})
    double.namespaces[NS] = {}
    rows = _rows(double)
    bad = {r.name: r for r in check.failed(rows.values())}
    assert set(bad) >= {"S3 Secret", "namespace label", "rights: experiments.kubeflow.org"}
    assert "kubectl -n team-a create secret generic bincounter-s3" in bad["S3 Secret"].fix
    assert bad["namespace label"].fix == "kubectl label namespace team-a katib.kubeflow.org/metrics-collector-injection=enabled"
    assert bad["rights: experiments.kubeflow.org"].detail == "denied: delete"
    table = check.format_table(list(rows.values()))
    assert "FAIL" in table and "fix: kubectl label namespace" in table


def test_check_cli_and_the_pipeline_step(double, tmp_path, monkeypatch, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import components

    monkeypatch.setenv("KUBECONFIG", double.write_kubeconfig(tmp_path / "kubeconfig", NS))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    args = cli.get_args_parser().parse_args(["check", "--namespace", NS])
    assert cli.main(args) == 0 and "all checks passed" in capsys.readouterr().out
    components.check.python_func(engine="kubernetes", namespace=NS)  # passes: the run goes on
    del double.objects[("serviceaccounts", NS, o.WORKLOAD_SA)]
    assert cli.main(args) == 1
    with pytest.raises(RuntimeError, match="ServiceAccount bincounter"):
        components.check.python_func(engine="kubernetes", namespace=NS)  # stops the run with the table
    components.check.python_func(engine="local")
    assert "local engine: no cluster checks" in capsys.readouterr().out
