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
from bincounter import runs
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

    # The last step records the run's success where the exit handler looks for it.
    components.deploy.python_func(model=model, shards=_shards(tmp_path), engine="kubernetes", run_id=RUN,
                                  smoke_images=0, work_uri=str(tmp_path))
    assert runs.missing_markers(str(tmp_path), RUN, ["deploy"]) == []
    assert ("inferenceservices", NS, "bincounter") in double.objects


@pytest.fixture(params=["1.10.2", "1.11.0"])
def release_double(request, tmp_path, monkeypatch):
    """The API double as a Kubeflow release profile: only the kinds that release installs are
    served; the others answer 403 (tests/k8s_releases.py)."""
    yield from kd.serve_engine(tmp_path, monkeypatch, NS, release=request.param)


def _leftovers(double) -> str:
    """What a run leaves in its namespace: its Experiment, a training job of the kind the release
    installs (PyTorchJob on 1.10.2, TrainJob on 1.11.0) and the serving model. Returns that kind."""
    double.put_object(o.experiment("tune-x", NS, data_uri="s3://b/d", trials_uri="s3://b/t",
                                   labels={o.RUN_LABEL: RUN}), "experiments")
    if "PyTorchJob" in double.release.kinds:
        double.put_object(o.pytorchjob("train-x", NS, data_uri="s3://b/d", model_uri="s3://b/m",
                                       labels={o.RUN_LABEL: RUN}), "pytorchjobs")
        kind = "pytorchjobs"
    else:
        double.put_object(o.trainjob("train-x", NS, data_uri="s3://b/d", model_uri="s3://b/m",
                                     labels={o.RUN_LABEL: RUN}), "trainjobs")
        kind = "trainjobs"
    double.put_object(o.inference_service("bincounter", NS, storage_uri="s3://b/m", labels={o.RUN_LABEL: RUN}),
                      "inferenceservices")
    return kind


# (markers the steps left, deploy_model) -> the run's outcome as the exit handler must read it.
OUTCOMES = {
    "succeeded": (["evaluate", "deploy"], True),
    "succeeded-without-deploy": (["evaluate"], False),
    "failed-in-train": ([], True),
    "cancelled-while-deploying": (["evaluate"], True),
}


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_exit_handler_cleans_up_only_a_run_that_did_not_succeed(release_double, tmp_path, outcome, capsys):
    double = release_double
    markers, deploy_model = OUTCOMES[outcome]
    for step in markers:
        runs.mark_succeeded(str(tmp_path), RUN, step)
    job_kind = _leftovers(double)

    components.cleanup.python_func(engine="kubernetes", work_uri=str(tmp_path), run_id=RUN,
                                   deploy_model=deploy_model)

    left = {key[0] for key in double.objects}
    if outcome.startswith("succeeded"):
        # A successful run keeps its Experiment (the trials' record) and its finished job (TTL cleans up).
        assert left == {"experiments", job_kind, "inferenceservices"}
        assert "nothing to clean up" in capsys.readouterr().out
    else:
        assert left == {"inferenceservices"}  # the model that serves is never torn down here
        # Experiments first: Katib would replace trial jobs deleted under a live Experiment.
        assert [key[0] for key in double.deleted] == ["experiments", job_kind]


def test_cleanup_skips_the_kind_the_release_does_not_install(release_double, tmp_path, capsys):
    # 1.11.0 installs Trainer v2 and leaves the Training Operator out (example/kustomization.yaml);
    # 1.10.2 has no Trainer v2. Listing the missing kind is a 403 for the profile's ServiceAccount.
    job_kind = _leftovers(release_double)
    missing = {"pytorchjobs": "TrainJob", "trainjobs": "PyTorchJob"}[job_kind]

    components.cleanup.python_func(engine="kubernetes", work_uri=str(tmp_path), run_id=RUN, deploy_model=False)

    assert [key[0] for key in release_double.deleted] == ["experiments", job_kind]
    assert f"skipped {missing}: not permitted in {NS}" in capsys.readouterr().out


def test_an_unreadable_working_store_counts_as_not_succeeded(release_double, tmp_path, capsys, monkeypatch):
    _leftovers(release_double)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")  # the component sets it: restore it after the test
    components.cleanup.python_func(engine="kubernetes", work_uri="s3://no-such-bucket-here", run_id=RUN,
                                   deploy_model=False, s3_endpoint_url="http://127.0.0.1:9")
    assert "cannot read its success markers" in capsys.readouterr().out
    assert {key[0] for key in release_double.objects} == {"inferenceservices"}


@pytest.mark.parametrize("bad", ["", "..", "../other-run", "a/b"])
def test_a_run_id_cannot_point_a_marker_outside_its_run_folder(tmp_path, bad):
    with pytest.raises(ValueError, match="Invalid run id"):
        runs.mark_succeeded(str(tmp_path), bad, "evaluate")


@pytest.mark.parametrize("release", ["1.10.2", "1.11.0"])
def test_cluster_path_on_each_release(tmp_path, monkeypatch, release):
    """The components' cluster path against each Kubeflow release's profile of the double: on 1.11.0
    (no Training Operator) training and trials run as TrainJobs with Trainer v2.1's API; the
    predictor passes Knative's masks on both."""
    gen = kd.serve_engine(tmp_path, monkeypatch, NS, release=release)
    double = next(gen)
    try:
        train_name, tune_name = k8s_engine.object_name("train", RUN), k8s_engine.object_name("tune", RUN)
        kind, plural = ("TrainJob", "trainjobs") if release == "1.11.0" else ("PyTorchJob", "pytorchjobs")
        double.script(plural, train_name, kd.trainjob_success(NS, train_name) if kind == "TrainJob"
                      else kd.pytorchjob_success(NS, train_name))
        model_dir = tmp_path / "runs" / RUN / "model"  # what rank 0 of the job leaves (no trainer runs here)
        model_dir.mkdir(parents=True)
        (model_dir / "model.pt").write_bytes(b"weights")
        (model_dir / "config.json").write_text(json.dumps({"arch": "resnet50", "max_count": 5, "input_size": 224}))
        model = dsl.Model(name="model", uri=str(tmp_path / "artifacts" / "model"), metadata={})
        components.train.python_func(shards=_shards(tmp_path), model=model, engine="kubernetes",
                                     work_uri=str(tmp_path), run_id=RUN, best_params={}, epochs=3, workers=2,
                                     gpus_per_worker=1)
        job = double.objects[(plural, NS, train_name)]
        if kind == "TrainJob":
            assert "podTemplateOverrides" in job["spec"] and job["spec"]["trainer"]["numNodes"] == 2

        best = {"base-lr": "0.002", "batch-size": "32", "weight-decay": "0.05", "dropout": "0.2"}
        double.script("experiments", tune_name, kd.experiment_success(NS, tune_name, best, accuracy=0.5))
        tuning = dsl.Metrics(name="tuning", uri=str(tmp_path / "artifacts" / "tuning"), metadata={})
        components.tune.python_func(shards=_shards(tmp_path), tuning=tuning, engine="kubernetes",
                                    work_uri=str(tmp_path), run_id=RUN, trials=3, parallelism=1, epochs=3)
        assert double.objects[("experiments", NS, tune_name)]["spec"]["trialTemplate"]["trialSpec"]["kind"] == kind

        double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1))
        dep = dsl.Model(name="model", uri=str(tmp_path / "m"), metadata={"uri": "s3://work/runs/x/model"})
        components.deploy.python_func(model=dep, shards=_shards(tmp_path), engine="kubernetes", run_id=RUN,
                                      smoke_images=0)
        assert not double.rejected, double.rejected
    finally:
        gen.close()
