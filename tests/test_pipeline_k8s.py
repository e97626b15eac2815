"""The components with engine=kubernetes, called as KFP calls them (their Python functions with real
artifact objects), against the HTTP test double of the Kubernetes API server (tests/k8s_double.py,
which replays the controllers' documented status sequences; no real controller runs).

What this checks is the glue the cluster path depends on: what each component hands the
Kubernetes engine (the working-store URIs, --resume, tuned values back in their types, the run
label, spot placement, the image tag) and what it publishes from the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from kfp import dsl

import k8s_double as kd
from bincounter.engines import kubernetes as k8s_engine
from bincounter.k8s import objects as o

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import components  # noqa: E402

NS = "team-a"
RUN = "5d0c1f7a-0b1e-4c55-9d2e-6f3a1b2c3d4e"


@pytest.fixture
def double(tmp_path, monkeypatch):
    yield from kd.serve_engine(tmp_path, monkeypatch, NS)


def _shards(work: Path) -> dsl.Dataset:
    return dsl.Dataset(name="shards", uri=str(work / "artifacts" / "shards"),
                       metadata={"uri": str(work / "runs" / RUN / "split")})


def test_train_component_runs_a_pytorchjob_and_publishes_the_model(double, tmp_path):
    name = k8s_engine.object_name("train", RUN)
    double.script("pytorchjobs", name, kd.pytorchjob_success(NS, name, workers=2))
    # What rank 0 of the job leaves in the working store (no real trainer runs here).
    model_dir = tmp_path / "runs" / RUN / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.pt").write_bytes(b"weights")
    (model_dir / "config.json").write_text(json.dumps({"arch": "resnet50", "max_count": 5, "input_size": 224}))
    (model_dir / "metrics.json").write_text(json.dumps({"final": {"epoch": 20, "val-accuracy": 0.61}}))
    model = dsl.Model(name="model", uri=str(tmp_path / "artifacts" / "model"), metadata={})

    out = components.train.python_func(
        shards=_shards(tmp_path), model=model, engine="kubernetes", work_uri=str(tmp_path), run_id=RUN,
        # as KFP hands over tune's output: every number a float
        best_params={"base-lr": 0.002, "batch-size": 64.0, "weight-decay": 0.05, "dropout": 0.1},
        epochs=20, arch="resnet50", workers=2, gpus_per_worker=4, image_tag="9.9.9", spot=True)

    job = double.objects[("pytorchjobs", NS, name)]
    assert job["metadata"]["labels"][o.RUN_LABEL] == RUN
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    args = master["containers"][0]["args"]
    assert args[:4] == ["--data", str(tmp_path / "runs" / RUN / "split"), "--output", str(model_dir)]
    assert "--resume" in args and args[args.index("--batch-size") + 1] == "64"
    assert args[args.index("--base-lr") + 1] == "0.002" and args[args.index("--epochs") + 1] == "20"
    assert master["containers"][0]["image"].endswith("/bincounter-trainer:9.9.9")
    assert master["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    assert job["spec"]["nprocPerNode"] == "4"

    assert out.val_accuracy == pytest.approx(0.61) and out.gpu_hours > 0
    assert model.metadata["uri"] == str(model_dir) and model.metadata["arch"] == "resnet50"
    assert (Path(model.path) / "model.pt").read_bytes() == b"weights"  # the artifact keeps a copy


def test_tune_component_runs_a_katib_experiment(double, tmp_path):
    name = k8s_engine.object_name("tune", RUN)
    best = {"base-lr": "0.002", "batch-size": "32", "weight-decay": "0.05", "dropout": "0.2"}
    double.script("experiments", name, kd.experiment_success(NS, name, best, accuracy=0.58))
    double.objects[("trials", NS, f"{name}-a")] = kd.trial(NS, name, f"{name}-a", "Succeeded", best, "0.58")
    tuning = dsl.Metrics(name="tuning", uri=str(tmp_path / "artifacts" / "tuning"), metadata={})

    out = components.tune.python_func(
        shards=_shards(tmp_path), tuning=tuning, engine="kubernetes", work_uri=str(tmp_path), run_id=RUN,
        trials=6, parallelism=2, epochs=2, gpus_per_trial=1, extra_train_args=["--workers", "8"])

    experiment = double.objects[("experiments", NS, name)]
    assert experiment["spec"]["maxTrialCount"] == 6 and experiment["spec"]["parallelTrialCount"] == 2
    trial_args = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"][0]["args"]
    assert "--workers" in trial_args and trial_args[trial_args.index("--epochs") + 1] == "2"
    assert out.best_value == pytest.approx(0.58)
    assert out.best_params["batch-size"] == 32 and out.best_params["base-lr"] == 0.002
    assert tuning.metadata["best-val-accuracy"] == pytest.approx(0.58)
    assert (tmp_path / "runs" / RUN / "tune" / "tuning.json").is_file()


def test_deploy_and_cleanup_components(double, tmp_path):
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1))
    model = dsl.Model(name="model", uri=str(tmp_path / "m"), metadata={"uri": "s3://work/runs/x/model"})
    out = components.deploy.python_func(model=model, shards=_shards(tmp_path), engine="kubernetes", run_id=RUN,
                                        smoke_images=0)
    isvc = double.objects[("inferenceservices", NS, "bincounter")]
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == "s3://work/runs/x/model"
    assert out.endpoint == "http://bincounter.team-a.svc.cluster.local" and out.predictions == []

    # The exit handler: nothing is deleted after a successful run; a failed run's jobs go.
    double.put_object(o.pytorchjob("left-over", NS, data_uri="s3://b/d", model_uri="s3://b/m",
                                   labels={o.RUN_LABEL: RUN}), "pytorchjobs")
    ok = dsl.PipelineTaskFinalStatus(state="SUCCEEDED", pipeline_job_resource_name="r", pipeline_task_name="t",
                                     error_code=None, error_message=None)
    components.cleanup.python_func(status=ok, engine="kubernetes", run_id=RUN)
    assert ("pytorchjobs", NS, "left-over") in double.objects
    failed = dsl.PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="r", pipeline_task_name="t",
                                         error_code=1, error_message="train failed")
    components.cleanup.python_func(status=failed, engine="kubernetes", run_id=RUN)
    assert ("pytorchjobs", NS, "left-over") not in double.objects
    assert ("inferenceservices", NS, "bincounter") in double.objects  # never deleted by cleanup
