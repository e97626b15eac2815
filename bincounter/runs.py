"""How a pipeline run tells its exit handler that it succeeded: markers in the working store.

The exit handler (``components/cleanup.py``) deletes what a failed or cancelled run
left behind, so it must know how the run ended. KFP can pass that as
``dsl.PipelineTaskFinalStatus``, but KFP backend 2.5.0 (Kubeflow 1.10.2) refuses to
compile any task with that input: kubeflow/pipelines
``backend/src/v2/compiler/argocompiler/dag.go`` at 2.5.0, ``addImplicitDependencies``,
returns "task final status not supported yet" for a ``taskFinalStatus`` parameter
(the exit-hook compiler that accepts it arrived in 2.14). One ``pipeline.yaml`` must
run on 2.5.0 and 2.15.0 (Kubeflow 1.11.0), so the run records its own outcome instead:
each final step writes ``{work_uri}/runs/{run_id}/succeeded/{step}.json`` as its
last act, and the exit handler reads the markers. All present: the run succeeded.
One missing: a step failed or the run was cancelled before it finished.
"""

from __future__ import annotations

import datetime
import json
import re

from bincounter import storage

MARKER_FOLDER = "succeeded"


def _check_run_id(run_id: str) -> str:
    # The run id names a folder in the working store: nothing that could climb out of it.
    if not re.fullmatch(r"[\w.-]+", run_id or "") or set(run_id) == {"."}:
        raise ValueError(f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only.")
    return run_id


def marker_uri(work_uri: str, run_id: str, step: str) -> str:
    return storage.join(work_uri, "runs", _check_run_id(run_id), MARKER_FOLDER, f"{step}.json")


def mark_succeeded(work_uri: str, run_id: str, step: str, **details) -> str:
    """Record that ``step`` of ``run_id`` finished; call it as the step's last act. Returns the marker's URI."""
    uri = marker_uri(work_uri, run_id, step)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes(uri, json.dumps({"run_id": run_id, "step": step, "finished": finished,
                                         **details}, indent=2).encode())
    return uri


def missing_markers(work_uri: str, run_id: str, steps: list[str] | tuple[str, ...]) -> list[str]:
    """The steps of ``steps`` that have not recorded success for ``run_id`` (empty: the run succeeded)."""
    return [step for step in steps if not storage.exists(marker_uri(work_uri, run_id, step))]
