"""The audit at bucket scale: the Indexed Job builder, its launcher against the HTTP TEST DOUBLE of
the API server (tests/k8s_double.py, permissive and with each release profile:
batch/v1 is in every cluster), and the parts the Job's pods write merged into one table.

The Job status sequences below REPLAY what the Kubernetes Job controller writes
(kubernetes/kubernetes pkg/controller/job/job_controller.go, constants in
k8s.io/api/batch/v1/types.go, Kubernetes 1.31+):
- success: ``SuccessCriteriaMet`` (reason ``CompletionsReached``) is added first, then ``Complete``
  (reason ``CompletionsReached``, message "Reached expected number of succeeded pods") once the
  pods have terminated; ``completedIndexes`` lists the finished indexes as ranges ("0-2").
- with ``backoffLimitPerIndex``: an index that fails more often than that is listed in
  ``failedIndexes``; the Job gets ``FailureTarget`` then ``Failed`` with reason ``FailedIndexes``
  ("Job has failed indexes").
- pods carry ``batch.kubernetes.io/job-name`` and ``batch.kubernetes.io/job-completion-index``.
No controller runs here: the tests show the launcher sends a valid Job and reacts to these sequences.
"""

from __future__ import annotations

import pytest

import k8s_double as kd
import k8s_schemas
from bincounter.audit import cli as audit_cli
from bincounter.k8s import launchers, objects as o

NS = "team-a"
FAST = dict(poll_s=0.01, report_every_s=0.05)


def _cond(type_, reason, message):
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": kd.T0, "lastTransitionTime": kd.T0}


def job_success(parts: int) -> list[dict]:
    last = f"0-{parts - 1}" if parts > 1 else "0"
    met = _cond("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")
    return [
        {},
        {"active": parts, "ready": parts, "startTime": kd.T0, "terminating": 0},
        {"active": 1, "succeeded": parts - 1, "completedIndexes": f"0-{parts - 2}" if parts > 2 else "0",
         "startTime": kd.T0},
        {"succeeded": parts, "completedIndexes": last, "startTime": kd.T0, "conditions": [met]},
        {"succeeded": parts, "completedIndexes": last, "startTime": kd.T0, "completionTime": kd.T1,
         "conditions": [met, _cond("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]},
    ]


def job_failed_index(parts: int, index: int) -> list[dict]:
    target = _cond("FailureTarget", "FailedIndexes", "Job has failed indexes")
    return [
        {"active": parts, "startTime": kd.T0},
        {"active": 0, "succeeded": parts - 1, "failed": 3, "failedIndexes": str(index), "startTime": kd.T0,
         "conditions": [target]},
        {"succeeded": parts - 1, "failed": 3, "failedIndexes": str(index), "startTime": kd.T0,
         "conditions": [target, _cond("Failed", "FailedIndexes", "Job has failed indexes")]},
    ]


@pytest.fixture(params=[None, "1.10.2", "1.11.0"], ids=["permissive", "1.10.2", "1.11.0"])
def double(request):
    """The permissive double and each release profile (batch/v1 is served by every API server)."""
    d = kd.K8sDouble(request.param)
    if request.param:
        d.profile_namespace(NS)
    d.start()
    yield d
    d.stop()


def _audit(double, lines, name="audit1", **kw):
    args = dict(model_uri="s3://b/models/m", source="s3://aft-vbi-pds", output_uri="s3://b/audit/all", parts=3,
                api_client=double.api_client(), log=lines.append, **FAST)
    args.update(kw)
    return launchers.audit(name, NS, **args)


def test_indexed_job_validates_and_runs_the_audit_cli_per_index():
    job = o.audit_job("a", NS, model_uri="s3://b/m", source="s3://src", output_uri="s3://b/out", parts=8,
                      parallelism=4, extra_args=["--chunk-size", "256"], resources=o.Resources(gpus=1))
    assert k8s_schemas.errors(job) == []
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 8, 4)
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    (c,) = spec["template"]["spec"]["containers"]
    assert c["command"] == ["bincounter", "audit"] and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The args parse with the real CLI parser; the part comes from the index the Job controller sets.
    args = audit_cli.get_args_parser()
    import os
    os.environ["JOB_COMPLETION_INDEX"] = "5"
    try:
        parsed = audit_cli.get_args_parser().parse_args(c["args"])
    finally:
        del os.environ["JOB_COMPLETION_INDEX"]
    assert (parsed.part, parsed.parts, parsed.score_only, parsed.chunk_size) == (5, 8, True, 256)
    assert args.parse_args(c["args"]).part == 0
    with pytest.raises(ValueError, match="parallelism"):
        o.audit_job("a", NS, model_uri="m", source="s", output_uri="o", parts=2, parallelism=3)


def test_launcher_waits_for_complete_and_reports_progress(double):
    lines: list[str] = []
    double.script("jobs", "audit1", job_success(3))
    result = _audit(double, lines)
    assert result["parts"] == 3 and result["output_uri"] == "s3://b/audit/all"
    job = double.objects[("jobs", NS, "audit1")]
    assert job["spec"]["completions"] == 3 and job["spec"]["activeDeadlineSeconds"] == 12 * 3600
    text = "\n".join(lines)
    assert "completedIndexes=0-1" in text and "SuccessCriteriaMet" in text and "Complete" in text
    assert not double.deleted


def test_failed_index_raises_prints_that_pods_log_and_cleans_up(double):
    lines: list[str] = []
    double.script("jobs", "audit1", job_failed_index(3, 1))
    labels = {"batch.kubernetes.io/job-name": "audit1", "batch.kubernetes.io/job-completion-index": "1"}
    double.pods.append(kd.pod(NS, "audit1-1-x7k2p", labels, o.AUDIT_CONTAINER, exit_code=1))
    double.logs[(NS, "audit1-1-x7k2p", o.AUDIT_CONTAINER)] = "botocore.exceptions.NoCredentialsError: no creds\n"
    with pytest.raises(launchers.LaunchError, match="FailedIndexes: Job has failed indexes"):
        _audit(double, lines)
    text = "\n".join(lines)
    assert "NoCredentialsError" in text and "failedIndexes=1" in text
    assert ("jobs", NS, "audit1") in double.deleted


def test_deadline_and_cleanup_never(double):
    lines: list[str] = []
    double.script("jobs", "audit1", job_success(3)[:2])  # stays running
    with pytest.raises(launchers.LaunchError, match="did not finish"):
        _audit(double, lines, timeout_s=0.2, cleanup="never")
    assert ("jobs", NS, "audit1") in double.objects and "leaving Job" in "\n".join(lines)


def test_role_lets_the_launcher_manage_jobs():
    granted = {(g, r, v) for rule in o.ROLE_RULES for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert {("batch", "jobs", v) for v in ("create", "get", "delete")} <= granted
