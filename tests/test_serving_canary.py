"""Canary rollouts and a gRPC InferenceService, against the API double (tests/k8s_double.py).

The double replays the InferenceService statuses KServe writes during a canary rollout
(ksvc_reconciler.go's traffic split, cited there); it shows that deploy, promote and rollback
send the right spec changes and wait for the right traffic, not that a real cluster routes it.
"""

from __future__ import annotations

import json

import pytest

import k8s_double as kd
from bincounter.k8s import launchers, objects as o

NS = "team-a"
FAST = dict(poll_s=0.01, report_every_s=0.05)
OLD, NEW = "bincounter-predictor-00001", "bincounter-predictor-00002"


@pytest.fixture
def double():
    d = kd.K8sDouble(release="1.10.2").start()
    yield d
    d.stop()


def _serving_model_1(double):
    old = o.inference_service("bincounter", NS, storage_uri="s3://b/models/m1")
    double.put_object(old, "inferenceservices", status=kd.isvc_ready(NS, "bincounter", 1))


def _canary(double, lines, percent=10):
    _serving_model_1(double)
    double.script("inferenceservices", "bincounter", kd.isvc_canary(NS, "bincounter", 2, percent), generation=2)
    return launchers.deploy("bincounter", NS, storage_uri="s3://b/models/m2", canary_percent=percent,
                            api_client=double.api_client(), log=lines.append, **FAST)


def stored(double) -> dict:
    return double.objects[("inferenceservices", NS, "bincounter")]


def test_deploy_with_canary_percent_splits_the_traffic():
    lines = []
    double = kd.K8sDouble(release="1.11.0").start()
    try:
        result = _canary(double, lines, 10)
        spec = stored(double)["spec"]["predictor"]
        assert spec["canaryTrafficPercent"] == 10
        assert {"name": "STORAGE_URI", "value": "s3://b/models/m2"} in spec["containers"][0]["env"]
        assert result["traffic"] == {NEW: 10, OLD: 90}
    finally:
        double.stop()


def test_promote_sends_all_traffic_to_the_canary(double):
    lines = []
    _canary(double, lines)
    double.script("inferenceservices", "bincounter", kd.isvc_traffic_moved(NS, "bincounter", 3, 2, 1, 100),
                  generation=3)
    result = launchers.promote("bincounter", NS, api_client=double.api_client(), log=lines.append, **FAST)
    assert "canaryTrafficPercent" not in stored(double)["spec"]["predictor"]
    assert result["traffic"] == {NEW: 100} and result["revision"] == NEW
    assert any(f"traffic {{'{NEW}': 10, '{OLD}': 90}}" in line for line in lines)  # waited past the old split


def test_rollback_pins_all_traffic_to_the_previous_model(double, tmp_path, capsys):
    from bincounter import cli

    _canary(double, [])
    double.script("inferenceservices", "bincounter", kd.isvc_traffic_moved(NS, "bincounter", 3, 2, 1, 0),
                  generation=3)
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", NS)
    assert cli.main(["k8s", "rollback", "--namespace", NS, "--kubeconfig", kubeconfig, "--poll", "0.01"]) == 0
    assert stored(double)["spec"]["predictor"]["canaryTrafficPercent"] == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["traffic"] == {NEW: 0, OLD: 100} and result["revision"] == OLD


def test_promote_or_rollback_without_a_canary_is_an_error(double, tmp_path, capsys):
    from bincounter import cli

    _serving_model_1(double)
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", NS)
    for action in ("promote", "rollback"):
        assert cli.main(["k8s", action, "--namespace", NS, "--kubeconfig", kubeconfig]) == 1
        assert f"has no canary rollout to {action}" in capsys.readouterr().err
    assert stored(double)["metadata"]["generation"] == 1  # nothing was changed


def test_canary_needs_serverless_and_a_percentage():
    with pytest.raises(ValueError, match="canary rollouts need deployment_mode Serverless"):
        o.inference_service("b", NS, storage_uri="s3://b/m", deployment_mode="RawDeployment",
                            canary_traffic_percent=10)
    with pytest.raises(ValueError, match="0..100"):
        o.inference_service("b", NS, storage_uri="s3://b/m", canary_traffic_percent=101)
    for replace in (0, 100):
        spec = o.inference_service("b", NS, storage_uri="s3://b/m", canary_traffic_percent=replace)
        assert "canaryTrafficPercent" not in spec["spec"]["predictor"]


def test_grpc_inference_service_passes_admission(double):
    """gRPC on port 8081 named h2c (Knative routes HTTP/2 to it), with TCP probes; the release's
    CRD and Knative's field masks accept it."""
    lines = []
    double.script("inferenceservices", "bincounter", kd.isvc_rollout(NS, "bincounter", 1))
    launchers.deploy("bincounter", NS, storage_uri="s3://b/models/m1", grpc=True, api_client=double.api_client(),
                     log=lines.append, **FAST)
    [container] = stored(double)["spec"]["predictor"]["containers"]
    assert container["args"][-4:] == ["--enable_grpc", "true", "--grpc_port", "8081"]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": 8081}
    assert "httpGet" not in container["livenessProbe"]
