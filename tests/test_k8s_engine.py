"""The Kubernetes engine (bincounter.engines.kubernetes), as the KFP components call it,
against the HTTP TEST DOUBLE of the API server (tests/k8s_double.py: replays the
upstream-documented status sequences; no real controller runs), reached through a
kubeconfig exactly as `bincounter k8s` and a laptop would."""

import json

import pytest

import k8s_double as kd
from bincounter.engines import kubernetes as engine
from bincounter.k8s import objects as o

NS = "team-a"
RUN = "3f2a9c1e-77aa-4bde-9a31-0c5e2f1d9b10"


@pytest.fixture
def double(tmp_path, monkeypatch):
    yield from kd.serve_engine(tmp_path, monkeypatch, NS)


def test_train_on_spot_gpus_labels_the_run_and_reads_the_final_metrics(double, tmp_path):
    name = engine.object_name("train", RUN)
    assert name == "bincounter-train-3f2a9c1e77aa"
    double.script("pytorchjobs", name, kd.pytorchjob_success(NS, name, workers=2))
    out = tmp_path / "model"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"epochs": [], "final": {"epoch": 3, "val-accuracy": 0.55}}))
    result = engine.train("s3://b/split", str(out), ["--epochs", "3", "--resume"], workers=2, gpus_per_worker=4,
                          run_id=RUN, namespace=NS, image_tag="1.2.3", spot=True)
    assert result.metrics == {"epoch": 3.0, "val-accuracy": 0.55}
    assert result.gpu_hours == pytest.approx(8.0)  # 2 nodes x 4 GPUs x 1 h
    job = double.objects[("pytorchjobs", NS, name)]
    assert job["metadata"]["labels"][o.RUN_LABEL] == RUN
    assert job["spec"]["nprocPerNode"] == "4"
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == o.SPOT_NODE_SELECTOR
    assert pod["containers"][0]["image"].endswith("/bincounter-trainer:1.2.3")


def test_tune_maps_katib_trials_to_the_local_engines_result(double, tmp_path):
    name = engine.object_name("tune", RUN)
    best = {"base-lr": "0.002", "batch-size": "64", "weight-decay": "0.05", "dropout": "0.1"}
    double.script("experiments", name, kd.experiment_success(NS, name, best, accuracy=0.7))
    double.objects[("trials", NS, f"{name}-x7k2p9")] = kd.trial(NS, name, f"{name}-x7k2p9", "Succeeded", best, "0.7")
    double.objects[("trials", NS, f"{name}-b")] = kd.trial(NS, name, f"{name}-b", "EarlyStopped", best, "0.2")
    result = engine.tune("s3://b/split", str(tmp_path / "tuning"), ["--epochs", "1"], trials=3, parallelism=2,
                         run_id=RUN, namespace=NS)
    assert result.best_params["batch-size"] == 64 and result.best_value == pytest.approx(0.7)
    assert sorted(t["state"] for t in result.trials) == ["COMPLETE", "PRUNED"]
    saved = json.loads((tmp_path / "tuning" / "tuning.json").read_text())
    assert saved["best_trial"] == f"{name}-x7k2p9" and saved["experiment"] == f"{NS}/{name}"


def test_deploy_returns_the_in_cluster_url_and_cleanup_removes_the_runs_jobs(double):
    double.script("inferenceservices", "counter", kd.isvc_rollout(NS, "counter", 1))
    # no namespace: the kubeconfig context's (inside a pipeline pod: the pod's own namespace)
    d = engine.deploy("s3://b/models/m", model_name="counter", run_id=RUN)
    assert d.url == "http://counter.team-a.svc.cluster.local"
    assert d.details["predict_v1"] == "http://counter.team-a.svc.cluster.local/v1/models/counter:predict"
    double.put_object(o.pytorchjob("left-over", NS, data_uri="s3://b/d", model_uri="s3://b/m",
                                   labels={o.RUN_LABEL: RUN}), "pytorchjobs")
    assert engine.cleanup(RUN) == ["PyTorchJob/left-over"]
    assert ("inferenceservices", NS, "counter") in double.objects
