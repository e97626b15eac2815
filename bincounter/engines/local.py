"""The local engine: train with torchrun, tune with optuna, serve with a local model-server process.

Everything here runs real processes on this machine -- the same entrypoints a
cluster runs (``python -m bincounter.train`` under torchrun, ``bincounter
serve``) -- so a laptop run exercises the production code paths, only smaller.
``bincounter tune`` is this module's command line.

Processes start in their own session (process group), so a deadline, a failure
or Ctrl-C stops the whole tree (torchrun and its workers). Each started process
is recorded under a run id, so ``cleanup(run_id)`` can stop what a failed or
cancelled pipeline run left behind (the pipeline's exit handler calls it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from bincounter import search_space, storage
from bincounter.engines import Deployment, TrainResult, TuneResult

TAIL_LINES = 60
# Katib's default StdOut metrics-collector filter; the trainer's lines are written for it.
KATIB_METRIC_RE = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(?:\.\d+)?(?:[Ee][+-]?\d+)?)")
EPOCH_RE = re.compile(r"(?:^|\s)epoch=(\d+)(?:\s|$)")


class LocalRunError(RuntimeError):
    """A local process failed or ran past its deadline; the message ends with its last output lines."""

    def __init__(self, message: str, tail: Sequence[str] = ()):
        self.tail = list(tail)
        if self.tail:
            message += f"\n--- last {len(self.tail)} lines of output ---\n" + "\n".join(self.tail)
        super().__init__(message)


class StopProcess(Exception):
    """Raised by an ``on_line`` callback to stop the process early (e.g. optuna pruned the trial)."""


# ---------------------------------------------------------------------------
# Processes


def state_dir(run_id: str) -> Path:
    """Where the pids of a run's processes are recorded (``BINCOUNTER_STATE_DIR`` overrides the base)."""
    base = os.environ.get("BINCOUNTER_STATE_DIR") or Path.home() / ".cache" / "bincounter" / "local-runs"
    if not re.fullmatch(r"[\w.-]+", run_id):
        raise ValueError(f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only.")
    return Path(base, run_id)


def _record(run_id: str | None, pid: int, what: str) -> Path | None:
    if not run_id:
        return None
    path = state_dir(run_id) / f"{pid}.json"
    storage.write_bytes(str(path), json.dumps({"pid": pid, "what": what}).encode())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but not ours
        return False
    return True


def _stop_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:  # reap it if it is our child, so it does not linger as a zombie
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.1)


@contextlib.contextmanager
def sigterm_raises():
    """Turn SIGTERM into ``SystemExit`` while waiting, so ``finally`` blocks stop the process groups
    this engine started. KFP (and Kubernetes) stop a cancelled step with SIGTERM, whose default
    action would end this process at once and orphan torchrun and its workers (their own sessions).
    A no-op outside the main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_process(cmd: Sequence[str], *, deadline_s: float | None = None, env: dict[str, str] | None = None,
                on_line: Callable[[str], None] | None = None, name: str = "process", run_id: str | None = None,
                echo: bool = True) -> list[str]:
    """Run ``cmd`` to the end, streaming its output; return the last output lines.

    Raises ``LocalRunError`` (with the tail of the output) when it exits non-zero or
    runs past ``deadline_s``; the whole process group is stopped first. ``on_line``
    sees every line and may raise ``StopProcess`` to end the process early, which
    is re-raised after the process group has been stopped.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    start = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    record = _record(run_id, proc.pid, name)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            timeout = None if deadline_s is None else deadline_s - (time.monotonic() - start)
            if timeout is not None and timeout <= 0:
                raise LocalRunError(f"{name} did not finish within its deadline of {deadline_s:.0f} s; stopped it.",
                                    tail)
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                continue  # the deadline check above raises
            if line is None:
                break
            tail.append(line)
            if echo:
                print(line, flush=True)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
        if code != 0:
            cause = _root_cause(tail)
            raise LocalRunError(f"{name} failed with exit code {code}{': ' + cause if cause else ''}\n"
                                f"command: {' '.join(cmd)}", tail)
        return list(tail)
    finally:
        if proc.poll() is None:
            _stop_group(proc.pid)
        if proc.stdout:
            proc.stdout.close()
        if record:
            record.unlink(missing_ok=True)


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def _root_cause(tail: Sequence[str]) -> str:
    """The first ``SomeError: message`` line of the output: the worker's own error, which torchrun's
    ChildFailedError report (printed after it) does not repeat."""
    for line in tail:
        m = _EXCEPTION_LINE.match(line)
        if m and m.group(1) != "ChildFailedError":
            return f"{m.group(1)}: {m.group(2)}"
    return ""


def cleanup(run_id: str) -> list[int]:
    """Stop every process still recorded for ``run_id`` (e.g. after a failed or cancelled run).

    Returns the pids that were stopped. Only processes this engine started are
    touched: each record is checked against the live process's command line.
    """
    stopped = []
    folder = state_dir(run_id)
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        pid = json.loads(record.read_text())["pid"]
        if _alive(pid) and _is_bincounter_process(pid):
            _stop_group(pid)
            stopped.append(pid)
        record.unlink(missing_ok=True)
    return stopped


def _is_bincounter_process(pid: int) -> bool:
    # Guards against a recycled pid: only stop a process whose command line is ours.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        cmdline = out.stdout
    return "bincounter" in cmdline


# ---------------------------------------------------------------------------
# Training


def parse_metric_line(line: str) -> dict[str, float] | None:
    """``epoch=3 train-loss=0.91 val-accuracy=0.55`` -> ``{"epoch": 3.0, ...}``; None for other lines.

    Uses Katib's StdOut collector regex, so what counts here counts on a cluster too.
    """
    if not EPOCH_RE.search(line):
        return None
    metrics = {}
    for name, value in KATIB_METRIC_RE.findall(line):
        try:
            metrics[name] = float(value)
        except ValueError:
            continue
    return metrics if "epoch" in metrics else None


TRAIN_MODULE = "bincounter.train"


def train_command(data: str, output: str, train_args: Sequence[str] = (), *, nproc_per_node: int = 2,
                  max_restarts: int = 0, module: str = TRAIN_MODULE) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m bincounter.train --data D --output O ARGS``.

    ``python -m torch.distributed.run`` is torchrun, run with this interpreter so the
    venv's torch is the one used. ``--standalone`` picks a free rendezvous port, so
    several local runs (tuning trials, tests) never collide.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            f"--max-restarts={max_restarts}", "-m", module,
            "--data", data, "--output", output, *train_args]


def train(data: str, output: str, train_args: Sequence[str] = (), *, nproc_per_node: int = 2,
          max_restarts: int = 0, deadline_s: float | None = None, run_id: str | None = None,
          on_metrics: Callable[[dict[str, float]], None] | None = None, echo: bool = True,
          module: str = TRAIN_MODULE) -> TrainResult:
    """Train with ``nproc_per_node`` local processes under torchrun (DDP, gloo on CPU).

    ``train_args`` are ``bincounter train`` flags (``["--epochs", "3", ...]``).
    Returns the model folder and the last epoch's metrics as the trainer printed them.
    Raises ``LocalRunError`` with the tail of the output on failure or at the deadline.
    ``module`` is the entrypoint torchrun starts (only tests pass another: a stand-in that
    prints metric lines without training).
    """
    epochs: list[dict[str, float]] = []

    def on_line(line: str):
        metrics = parse_metric_line(line)
        if metrics is not None:
            epochs.append(metrics)
            if on_metrics is not None:
                on_metrics(metrics)

    start = time.monotonic()
    with sigterm_raises():
        run_process(train_command(data, output, train_args, nproc_per_node=nproc_per_node,
                                  max_restarts=max_restarts, module=module),
                    deadline_s=deadline_s, on_line=on_line, name=f"torchrun {module}", run_id=run_id, echo=echo)
    seconds = time.monotonic() - start
    if not epochs:
        raise LocalRunError(f"Training finished but printed no 'epoch=N ... {search_space.OBJECTIVE_METRIC}=...' "
                            "line; the objective cannot be read.")
    return TrainResult(model_uri=output, metrics=epochs[-1], seconds=seconds,
                       gpu_hours=seconds / 3600 * _local_gpus(nproc_per_node))


def _local_gpus(nproc_per_node: int) -> int:
    # One GPU per process when the trainer finds CUDA; CPU time is not billed as GPU-hours.
    import torch

    return min(nproc_per_node, torch.cuda.device_count()) if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------
# Tuning


def tune(data: str, output: str, fixed_args: Sequence[str] = (), *, trials: int = 3, parallelism: int = 1,
         max_failed_trials: int | None = None, nproc_per_node: int = 1, seed: int = 0, prune: bool = True,
         trial_deadline_s: float | None = None, timeout_s: float | None = None, run_id: str | None = None,
         space: Sequence[search_space.Param] = search_space.SEARCH_SPACE, echo: bool = True,
         module: str = TRAIN_MODULE) -> TuneResult:
    """Search ``space`` with optuna (TPE), each trial a real training run; maximise val-accuracy.

    Mirrors the Katib Experiment: the same search space and objective (the best
    epoch's ``val-accuracy``, Katib's ``max`` strategy for a maximised objective),
    median early stopping (optuna's ``MedianPruner``, the counterpart of Katib's
    median-stop), and a budget of trials, parallel trials and failed trials.
    ``fixed_args`` are the ``bincounter train`` flags every trial shares; they may
    not name a searched parameter. Trial models go to ``output/trial-NNN`` and
    the search's record to ``output/tuning.json``.
    """
    import optuna

    searched = {p.flag for p in space}
    clash = sorted(searched & {a.split("=")[0] for a in fixed_args if a.startswith("--")})
    if clash:
        raise ValueError(f"Fixed training args {clash} are searched by the tuner; remove them "
                         f"(searched: {', '.join(sorted(searched))}).")
    if trials < 1 or parallelism < 1:
        raise ValueError(f"trials and parallelism must be >= 1, got trials={trials} parallelism={parallelism}")
    max_failed = trials if max_failed_trials is None else max_failed_trials
    objective_name = search_space.OBJECTIVE_METRIC
    record_lock = threading.Lock()
    records: list[dict[str, Any]] = []

    def objective(trial: "optuna.Trial") -> float:
        values = search_space.suggest_optuna(trial, space)
        trial_dir = storage.join(output, f"trial-{trial.number:03d}")
        best = [float("-inf")]

        def on_metrics(metrics: dict[str, float]):
            if objective_name not in metrics:
                return
            best[0] = max(best[0], metrics[objective_name])
            trial.report(metrics[objective_name], step=int(metrics["epoch"]))
            if prune and trial.should_prune():
                raise StopProcess()

        start = time.monotonic()
        record = {"number": trial.number, "params": values, "dir": trial_dir}
        try:
            result = train(data, trial_dir, [*fixed_args, *search_space.to_train_args(values)],
                           nproc_per_node=nproc_per_node, deadline_s=trial_deadline_s, run_id=run_id,
                           on_metrics=on_metrics, echo=echo, module=module)
            if objective_name not in result.metrics:
                raise LocalRunError(f"Trial {trial.number} printed no {objective_name}=... metric.")
            record.update(state="COMPLETE", value=best[0], metrics=result.metrics)
            return best[0]
        except StopProcess:
            record.update(state="PRUNED", value=best[0])
            raise optuna.TrialPruned()
        except LocalRunError as e:
            record.update(state="FAIL", error=str(e).splitlines()[0])
            raise
        finally:
            record["seconds"] = round(time.monotonic() - start, 2)
            with record_lock:
                records.append(record)
            print(f"trial {trial.number}: {record['state']} {objective_name}={record.get('value')} "
                  f"params={json.dumps(values)}", flush=True)

    def stop_on_failures(study: "optuna.Study", _trial):
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
        if failed > max_failed:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=search_space.OBJECTIVE_GOAL,
        sampler=optuna.samplers.TPESampler(seed=seed),
        # Katib's median-stop waits for a few finished trials before it stops any.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if prune else None,
    )
    start = time.monotonic()
    with sigterm_raises():
        study.optimize(objective, n_trials=trials, n_jobs=parallelism, timeout=timeout_s,
                       catch=(LocalRunError,), callbacks=[stop_on_failures])
    seconds = time.monotonic() - start
    records.sort(key=lambda r: r["number"])
    failed = [r for r in records if r["state"] == "FAIL"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(failed) > max_failed or not complete:
        reasons = "; ".join(f"trial {r['number']}: {r.get('error', '')}" for r in failed[:3])
        raise LocalRunError(f"Tuning failed: {len(complete)} of {len(records)} trials completed, "
                            f"{len(failed)} failed (allowed: {max_failed}). {reasons}")
    best = study.best_trial
    result = TuneResult(best_params=dict(best.params), best_value=float(best.value), trials=records,
                        seconds=seconds,
                        gpu_hours=sum(r["seconds"] for r in records) / 3600 * _local_gpus(nproc_per_node))
    storage.write_bytes(storage.join(output, "tuning.json"), json.dumps({
        "objective": {"metric": objective_name, "goal": search_space.OBJECTIVE_GOAL},
        "best_params": result.best_params, "best_value": result.best_value, "best_trial": best.number,
        "trials": records, "seconds": round(seconds, 2), "gpu_hours": result.gpu_hours,
        "fixed_args": list(fixed_args),
    }, indent=2).encode())
    return result


# ---------------------------------------------------------------------------
# Serving


AUDIT_COMMAND = (sys.executable, "-m", "bincounter.cli", "audit")


def audit(model_dir: str, source: str, output: str, audit_args: Sequence[str] = (), *, parts: int = 1,
          run_id: str | None = None, deadline_s: float | None = None) -> dict[str, Any]:
    """Score ``source`` as the cluster's Indexed Job would, with ``parts`` local processes
    (``bincounter audit --part i --parts N --score-only``) side by side; the caller merges.

    Returns {"parts", "seconds"}. A failed part raises ``LocalRunError`` with its output; the
    chunks the parts finished stay, so a rerun scores only the rest.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base = [*AUDIT_COMMAND, "--model", model_dir, "--source", source, "--output", output, "--parts", str(parts),
            "--score-only", "--no-progress", *map(str, audit_args)]
    start = time.monotonic()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            run_process([*base, "--part", str(i)], deadline_s=deadline_s, name=f"audit part {i}/{parts}",
                        run_id=run_id)
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"parts": parts, "seconds": round(time.monotonic() - start, 1)}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(model_dir: str, *, model_name: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bincounter.cli", "serve", "--model", model_dir, "--model-name", model_name,
            "--port", str(port)]


def model_ready(url: str, model_name: str, timeout_s: float = 2.0) -> bool:
    """True when the server at ``url`` says ``model_name`` is ready (KServe V1 model-status endpoint)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models/{model_name}", timeout=timeout_s) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("ready"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_server(model_dir: str, *, model_name: str = "bincounter", port: int = 0, host: str = "127.0.0.1",
                 ready_timeout_s: float = 180.0, log_path: str | None = None, run_id: str | None = None) -> Deployment:
    """Start ``bincounter serve`` as a background process and wait until the model is ready.

    The server outlives this call (it is the deployment); ``stop_server`` ends it.
    ``port=0`` picks a free port. Raises ``LocalRunError`` with the server's log
    if it exits or is not ready within ``ready_timeout_s``.
    """
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log_path = log_path or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bincounter-serve-{port}.log")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(serve_command(model_dir, model_name=model_name, port=port), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _record(run_id, proc.pid, "bincounter serve")
    deadline = time.monotonic() + ready_timeout_s
    while not model_ready(url, model_name):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                   else f"was not ready within {ready_timeout_s:.0f} s")
            _stop_group(proc.pid)
            raise LocalRunError(f"Model server for {model_dir} {why}. Log: {log_path}", _tail_file(log_path))
        time.sleep(0.5)
    return Deployment(url=url, model_name=model_name, handle=str(proc.pid),
                      details={"pid": proc.pid, "log": log_path, "model_dir": model_dir,
                               "predict_v1": f"{url}/v1/models/{model_name}:predict",
                               "infer_v2": f"{url}/v2/models/{model_name}/infer"})


def stop_server(deployment_or_pid: Deployment | int | str, grace_s: float = 10.0) -> None:
    """Stop a server started by ``start_server`` (no error if it already exited)."""
    pid = int(deployment_or_pid.handle if isinstance(deployment_or_pid, Deployment) else deployment_or_pid)
    if _alive(pid) and _is_bincounter_process(pid):
        _stop_group(pid, grace_s)


def _tail_file(path: str, n: int = TAIL_LINES) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# ---------------------------------------------------------------------------
# `bincounter tune`


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tune hyperparameters locally with optuna over the shared search space "
                    "(bincounter/search_space.py); each trial is a real `bincounter train` run. "
                    "Training flags shared by every trial follow `--`, e.g. "
                    "`bincounter tune --data SPLIT --output DIR --trials 4 -- --arch resnet18 --epochs 2`.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="split folder or s3:// prefix written by `bincounter split`")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for trial models and tuning.json")
    parser.add_argument("--trials", type=int, default=8, help="number of trials")
    parser.add_argument("--parallelism", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--max-failed-trials", type=int, default=None,
                        help="stop and fail after more failed trials than this (default: no limit; the search "
                             "fails only when no trial completes)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="torchrun processes per trial")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--no-prune", dest="prune", action="store_false",
                        help="disable median early stopping of weak trials")
    parser.add_argument("--trial-timeout", type=float, default=None, help="seconds before a trial is stopped")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole search")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="`bincounter train` flags shared by all trials, after `--`")
    return parser


def tune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    fixed = list(args.train_args)
    if fixed and fixed[0] == "--":
        fixed = fixed[1:]
    return dict(data=args.data, output=args.output, fixed_args=fixed, trials=args.trials,
                parallelism=args.parallelism, max_failed_trials=args.max_failed_trials,
                nproc_per_node=args.nproc_per_node, seed=args.seed, prune=args.prune,
                trial_deadline_s=args.trial_timeout, timeout_s=args.timeout)


def main(args: argparse.Namespace) -> int:
    result = tune(**tune_kwargs(args))
    print(json.dumps({"best_params": result.best_params, "best_value": result.best_value,
                      "tuning": storage.join(args.output, "tuning.json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
