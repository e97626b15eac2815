"""The launchers against an HTTP TEST DOUBLE of the Kubernetes API server.

tests/k8s_double.py is a real HTTP server on 127.0.0.1 that checks every posted
object against the upstream schemas and REPLAYS the status sequences the real
controllers write (Training Operator v1, Trainer v2, Katib, KServe; each sequence
cites its source there). No controller or cluster runs: these tests show the
launchers send valid objects and react correctly to those sequences.
"""

import os
import signal
import threading

import pytest

import k8s_double as kd
from bincounter.k8s import launchers, objects as o

NS = "team-a"
FAST = dict(poll_s=0.01, report_every_s=0.05)


@pytest.fixture
def double():
    d = kd.K8sDouble().start()
    yield d
    d.stop()


@pytest.fixture
def lines():
    return []


def _train(double, lines, name="job1", **kw):
    args = dict(data_uri="s3://b/split", model_uri="s3://b/models/m1", workers=2, gpus_per_worker=1,
                extra_args=["--epochs", "2"], api_client=double.api_client(), log=lines.append, **FAST)
    args.update(kw)
    return launchers.train(name, NS, **args)


def test_pytorchjob_success_returns_the_model_uri(double, lines):
    double.script("pytorchjobs", "job1", kd.pytorchjob_success(NS, "job1", workers=2))
    result = _train(double, lines)
    assert result["model_uri"] == "s3://b/models/m1" and result["kind"] == "PyTorchJob"
    assert result["gpu_hours"] == pytest.approx(2.0)  # 2 workers x 1 GPU x the 1 h between start and completion
    job = double.objects[("pytorchjobs", NS, "job1")]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert not double.deleted  # kept on success (its TTL deletes it)
    text = "\n".join(lines)
    assert "Created,Running" in text and "Succeeded" in text  # progress was reported as it changed


def test_trainjob_success(double, lines):
    double.script("trainjobs", "job2", kd.trainjob_success(NS, "job2"))
    result = _train(double, lines, name="job2", kind="TrainJob")
    assert result["kind"] == "TrainJob"
    assert double.objects[("trainjobs", NS, "job2")]["spec"]["trainer"]["numNodes"] == 2


def test_trainjob_failure_shows_the_jobset_pods_log(double, lines):
    double.script("trainjobs", "job2", kd.trainjob_failure(NS, "job2"))
    double.pods = [kd.pod(NS, "job2-node-0-0-abcde", {"jobset.sigs.k8s.io/jobset-name": "job2"}, "node", exit_code=1)]
    double.logs[(NS, "job2-node-0-0-abcde", "node")] = "torch.distributed.DistNetworkError: timed out"
    with pytest.raises(launchers.LaunchError, match="TrainJob team-a/job2 failed: FailedJobs"):
        _train(double, lines, name="job2", kind="TrainJob")
    assert "DistNetworkError" in "\n".join(lines)
    assert double.deleted == [("trainjobs", NS, "job2")]


def test_job_failure_raises_shows_the_failing_pod_log_and_cleans_up(double, lines):
    double.script("pytorchjobs", "job1", kd.pytorchjob_failure(NS, "job1"))
    labels = {"training.kubeflow.org/job-name": "job1"}
    double.pods = [kd.pod(NS, "job1-worker-0", labels, "pytorch"),
                   kd.pod(NS, "job1-master-0", labels, "pytorch", exit_code=1)]
    double.logs[(NS, "job1-master-0", "pytorch")] = "\n".join(
        [f"epoch=1 step={i}" for i in range(100)] + ["RuntimeError: CUDA out of memory"])
    with pytest.raises(launchers.LaunchError, match=r"PyTorchJob team-a/job1 failed: PyTorchJobFailed.*Master replica"):
        _train(double, lines)
    text = "\n".join(lines)
    assert "pod job1-master-0, container pytorch" in text  # the failed pod, not the running worker
    assert "RuntimeError: CUDA out of memory" in text
    assert "epoch=1 step=10\n" not in text + "\n"  # only the last lines
    assert double.deleted == [("pytorchjobs", NS, "job1")]


def test_timeout_raises_and_cleans_up(double, lines):
    double.script("pytorchjobs", "job1", kd.pytorchjob_stuck_running(NS, "job1"))
    with pytest.raises(launchers.LaunchError, match="did not finish within the deadline"):
        _train(double, lines, timeout_s=0.3)
    assert double.deleted == [("pytorchjobs", NS, "job1")]
    assert "no pods found" in "\n".join(lines)


def test_cleanup_never_keeps_the_failed_job(double, lines):
    double.script("pytorchjobs", "job1", kd.pytorchjob_failure(NS, "job1"))
    with pytest.raises(launchers.LaunchError):
        _train(double, lines, cleanup="never")
    assert not double.deleted and ("pytorchjobs", NS, "job1") in double.objects


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_cancelled_wait_cleans_up(double, lines, sig):
    """SIGTERM is what a pipeline cancel sends the step's pod; SIGINT is Ctrl-C."""
    double.script("pytorchjobs", "job1", kd.pytorchjob_stuck_running(NS, "job1"))
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), sig))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="cancelled: PyTorchJob team-a/job1"):
            _train(double, lines, timeout_s=30)
    finally:
        timer.cancel()
    assert double.deleted == [("pytorchjobs", NS, "job1")]
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handler is gone again


def test_existing_job_is_refused_unless_replace(double, lines):
    double.put_object(o.pytorchjob("job1", NS, data_uri="s3://b/d", model_uri="s3://b/old"), "pytorchjobs")
    with pytest.raises(launchers.LaunchError, match="already exists.*replace=True"):
        _train(double, lines)
    assert not double.deleted
    double.script("pytorchjobs", "job1", kd.pytorchjob_success(NS, "job1"))
    _train(double, lines, replace=True)
    assert double.deleted == [("pytorchjobs", NS, "job1")]
    job = double.objects[("pytorchjobs", NS, "job1")]
    assert "s3://b/models/m1" in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]


def test_an_invalid_object_is_rejected_by_the_double(double, lines):
    with pytest.raises(launchers.LaunchError, match="could not create PyTorchJob.*422"):
        _train(double, lines, extra_args=["--epochs", "2"], tolerations=[{"key": "spot", "operater": "Exists"}])
    assert "operater" in double.rejected[0][0]


def test_experiment_success_returns_typed_best_hyperparameters(double, lines):
    best = {"base-lr": "0.00123", "batch-size": "32", "weight-decay": "0.05", "dropout": "0.2"}
    double.script("experiments", "tune1", kd.experiment_success(NS, "tune1", best, accuracy=0.61))
    for trial, state, acc in (("tune1-x7k2p9", "Succeeded", "0.61"), ("tune1-b", "EarlyStopped", "0.30")):
        double.objects[("trials", NS, trial)] = kd.trial(NS, "tune1", trial, state, best, acc)
    result = launchers.tune("tune1", NS, data_uri="s3://b/split", trials_uri="s3://b/trials",
                            extra_args=["--epochs", "1"], parallel_trials=2, max_trials=3,
                            api_client=double.api_client(), log=lines.append, **FAST)
    assert result["best_hyperparameters"] == {"base-lr": 0.00123, "batch-size": 32,
                                              "weight-decay": 0.05, "dropout": 0.2}
    assert result["best_metrics"]["val-accuracy"] == pytest.approx(0.61)
    assert result["best_trial"] == "tune1-x7k2p9"
    assert result["best_model_uri"] == "s3://b/trials/tune1-x7k2p9"
    assert result["trials"]["succeeded"] == 2 and result["trials"]["earlystopped"] == 1
    exp = double.objects[("experiments", NS, "tune1")]
    assert (exp["spec"]["parallelTrialCount"], exp["spec"]["maxTrialCount"]) == (2, 3)
    assert any("best val-accuracy=0.61" in line for line in lines)
    assert sorted((t["name"], t["state"], t["val-accuracy"]) for t in result["trial_list"]) == [
        ("tune1-b", "EarlyStopped", 0.30), ("tune1-x7k2p9", "Succeeded", 0.61)]
    assert result["gpu_hours"] == 0.0  # CPU trials


def test_cleanup_run_deletes_only_that_runs_jobs(double, lines):
    for name, run in (("a", "run-1"), ("b", "run-2")):
        double.put_object(o.pytorchjob(name, NS, data_uri="s3://b/d", model_uri="s3://b/m",
                                       labels=launchers.run_labels(run)), "pytorchjobs")
    double.put_object(o.experiment("e", NS, data_uri="s3://b/d", trials_uri="s3://b/t",
                                   labels=launchers.run_labels("run-1")), "experiments")
    double.put_object(o.inference_service("bincounter", NS, storage_uri="s3://b/m",
                                          labels=launchers.run_labels("run-1")), "inferenceservices")
    deleted = launchers.cleanup_run("run-1", NS, api_client=double.api_client(), log=lines.append)
    assert sorted(deleted) == ["Experiment/e", "PyTorchJob/a"]
    assert ("pytorchjobs", NS, "b") in double.objects  # another run's job
    assert ("inferenceservices", NS, "bincounter") in double.objects  # serving is never torn down here


def test_experiment_failure_shows_a_failed_trial_log(double, lines):
    double.script("experiments", "tune1", kd.experiment_failure(NS, "tune1"))
    trial = {"apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
             "metadata": {"name": "tune1-abc", "namespace": NS, "labels": {"katib.kubeflow.org/experiment": "tune1"}}}
    double.objects[("trials", NS, "tune1-abc")] = {
        **trial, "status": {"conditions": [kd._cond("Failed", "True", "TrialFailed", "Trial has failed")]}}
    # Katib's StdOut collector: the training output is in the injected container's log
    double.pods = [kd.katib_trial_pod(NS, "tune1-abc", "PyTorchJob", "pytorch", 1, "ValueError: Invalid optimizer",
                                      double.logs)]
    with pytest.raises(launchers.LaunchError, match="ExperimentMaxFailedTrialsReached"):
        launchers.tune("tune1", NS, data_uri="s3://b/split", trials_uri="s3://b/trials",
                       api_client=double.api_client(), log=lines.append, **FAST)
    assert "ValueError: Invalid optimizer" in "\n".join(lines)
    assert ("experiments", NS, "tune1") in double.deleted


def test_experiment_succeeded_without_a_best_trial_is_a_failure(double, lines):
    seq = kd.experiment_success(NS, "tune1", {}, accuracy=0.5)
    seq[-1]["currentOptimalTrial"] = {"bestTrialName": "", "observation": {}}
    double.script("experiments", "tune1", seq)
    with pytest.raises(launchers.LaunchError, match="without a best trial"):
        launchers.tune("tune1", NS, data_uri="s3://b/split", trials_uri="s3://b/trials",
                       api_client=double.api_client(), log=lines.append, **FAST)


def _deploy(double, lines, storage_uri="s3://b/models/m1", **kw):
    return launchers.deploy("bincounter", NS, storage_uri=storage_uri, api_client=double.api_client(),
                            log=lines.append, **{**FAST, **kw})


def test_inference_service_created_ready_returns_urls(double, lines):
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1))
    result = _deploy(double, lines)
    assert result["url"] == "http://bincounter.team-a.example.com"
    assert result["internal_url"] == "http://bincounter.team-a.svc.cluster.local"
    assert result["model_url"] == "http://bincounter.team-a.svc.cluster.local/v1/models/bincounter:predict"
    assert result["generation"] == 1


def test_updated_inference_service_waits_for_the_new_generation(double, lines):
    """Right after the update the old revision's Ready=True (observedGeneration 1) is still what
    a GET returns; the launcher must wait for Ready at generation 2."""
    old = o.inference_service("bincounter", NS, storage_uri="s3://b/models/m0")
    double.put_object(old, "inferenceservices", status=kd.isvc_ready(NS, "bincounter", 1))
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 2), generation=2)
    result = _deploy(double, lines)
    assert result["generation"] == 2
    stored = double.objects[("inferenceservices", NS, "bincounter")]
    assert stored["metadata"]["generation"] == 2 and stored["status"]["observedGeneration"] == 2
    assert {"name": "STORAGE_URI", "value": "s3://b/models/m1"} in stored["spec"]["predictor"]["containers"][0]["env"]
    gets = [r for r in double.requests if r == ("GET", f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/bincounter")]
    assert len(gets) >= 1 + 5  # the existence check, then the whole rollout sequence was polled
    assert any("revision created=bincounter-predictor-00002 ready=bincounter-predictor-00001" in line
               for line in lines)
    assert not double.deleted


def test_failed_model_load_raises_with_logs_and_keeps_an_updated_service(double, lines):
    old = o.inference_service("bincounter", NS, storage_uri="s3://b/models/m0")
    double.put_object(old, "inferenceservices", status=kd.isvc_ready(NS, "bincounter", 1))
    double.script("inferenceservices", "bincounter", kd.isvc_failed_load(NS, "bincounter", 2), generation=2)
    double.pods = [kd.pod(NS, "bincounter-predictor-00002-deployment-x", {"serving.kserve.io/inferenceservice": "bincounter"},
                          "kserve-container", init_container="storage-initializer", init_exit_code=1)]
    double.logs[(NS, "bincounter-predictor-00002-deployment-x", "storage-initializer")] = "botocore.exceptions.NoCredentialsError"
    with pytest.raises(launchers.LaunchError, match="BlockedByFailedLoad.*model.pt not found"):
        _deploy(double, lines)
    assert "NoCredentialsError" in "\n".join(lines)
    assert not double.deleted  # the old revision keeps serving


def test_new_inference_service_that_never_gets_ready_times_out_and_is_deleted(double, lines):
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1)[:3])
    with pytest.raises(launchers.LaunchError, match="did not finish within the deadline"):
        _deploy(double, lines, timeout_s=0.3)
    assert double.deleted == [("inferenceservices", NS, "bincounter")]


def test_cli_train_and_deploy_through_a_kubeconfig(double, tmp_path, capsys):
    from bincounter import cli

    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", NS)
    double.script("pytorchjobs", "cli-job", kd.pytorchjob_success(NS, "cli-job"))
    out = tmp_path / "result.json"
    rc = cli.main(["k8s", "train", "--name", "cli-job", "--namespace", NS, "--kubeconfig", kubeconfig,
                   "--data", "s3://b/split", "--output", "s3://b/models/m2", "--poll", "0.01",
                   "--toleration", "spot=true:NoSchedule", "--result-json", str(out), "--", "--epochs", "3"])
    assert rc == 0
    assert '"model_uri": "s3://b/models/m2"' in out.read_text()
    c = double.objects[("pytorchjobs", NS, "cli-job")]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert c["containers"][0]["args"][-2:] == ["--epochs", "3"]
    assert c["tolerations"] == [{"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]

    double.script("inferenceservices", "bincounter", kd.isvc_failed_load(NS, "bincounter", 1))
    rc = cli.main(["k8s", "deploy", "--namespace", NS, "--kubeconfig", kubeconfig, "--poll", "0.01",
                   "--storage-uri", "s3://b/models/m2"])
    assert rc == 1
    assert "error: InferenceService team-a/bincounter failed: model BlockedByFailedLoad" in capsys.readouterr().err


def test_cancelled_deploy_deletes_the_service_it_created(double, lines):
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1)[:3])
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _deploy(double, lines, timeout_s=30)
    finally:
        timer.cancel()
    assert double.deleted == [("inferenceservices", NS, "bincounter")]
