"""The local engine: real processes, their failures and deadlines, metric parsing, the tune command line."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from bincounter import search_space
from bincounter.engines import local


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_failure_raises_with_tail_of_output():
    cmd = _python("""
        import sys
        for i in range(100):
            print(f"line {i}")
        print("Traceback: the real reason", file=sys.stderr)
        sys.exit(3)
    """)
    with pytest.raises(local.LocalRunError) as err:
        local.run_process(cmd, name="fake trainer", echo=False)
    message = str(err.value)
    assert message.startswith("fake trainer failed with exit code 3\ncommand: ")
    assert "Traceback: the real reason" in message  # stderr is in the tail
    assert "line 99" in message and "line 0\n" not in message  # only the tail, not everything
    assert len(err.value.tail) == local.TAIL_LINES


def test_deadline_stops_the_whole_process_group(tmp_path):
    # The parent starts a child (like torchrun starts workers); both must be gone after the deadline.
    pid_file = tmp_path / "child.pid"
    cmd = _python(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    start = time.monotonic()
    with pytest.raises(local.LocalRunError, match="deadline of 2 s") as err:
        local.run_process(cmd, deadline_s=2, echo=False)
    assert time.monotonic() - start < 20
    assert "started" in err.value.tail
    child = int(pid_file.read_text())
    for _ in range(50):
        if not local._alive(child):
            break
        time.sleep(0.1)
    assert not local._alive(child)


def test_on_line_can_stop_the_process():
    cmd = _python("""
        import time
        for i in range(1000):
            print(f"epoch={i} val-accuracy=0.{i}", flush=True)
            time.sleep(0.05)
    """)
    seen = []

    def on_line(line):
        seen.append(local.parse_metric_line(line))
        if len(seen) == 3:
            raise local.StopProcess()

    start = time.monotonic()
    with pytest.raises(local.StopProcess):
        local.run_process(cmd, on_line=on_line, echo=False)
    assert time.monotonic() - start < 15
    assert [m["epoch"] for m in seen] == [0, 1, 2]


def test_cleanup_stops_recorded_processes_of_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BINCOUNTER_STATE_DIR", str(tmp_path))
    # A process this engine started for run "r1" (its command line names bincounter, as ours do).
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "bincounter"],
                            start_new_session=True)
    local._record("r1", proc.pid, "test sleeper")
    # A record whose pid is not one of ours (pid 1) must not be touched.
    (tmp_path / "r1" / "1.json").write_text('{"pid": 1, "what": "not ours"}')
    assert local.cleanup("r1") == [proc.pid]
    assert proc.wait(timeout=10) is not None
    assert list((tmp_path / "r1").glob("*.json")) == []
    assert local.cleanup("r1") == []
    with pytest.raises(ValueError, match="Invalid run id"):
        local.cleanup("../etc")


def test_parse_metric_line_uses_katib_format():
    line = "epoch=3 train-loss=0.91 val-loss=1.02 val-accuracy=0.55 val-rmse=0.93 lr=1e-3"
    assert local.parse_metric_line(line) == {"epoch": 3, "train-loss": 0.91, "val-loss": 1.02,
                                             "val-accuracy": 0.55, "val-rmse": 0.93, "lr": 0.001}
    assert local.parse_metric_line("loading shards: 3 of 4") is None
    assert local.parse_metric_line("nepoch=3 val-accuracy=0.5") is None


def test_train_command_is_torchrun_of_the_one_entrypoint():
    cmd = local.train_command("s3://b/split", "/tmp/m", ["--epochs", "1"], nproc_per_node=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "bincounter.train"
    assert cmd[-6:] == ["--data", "s3://b/split", "--output", "/tmp/m", "--epochs", "1"][-6:]
    with pytest.raises(ValueError):
        local.train_command("d", "o", nproc_per_node=0)


def test_tune_rejects_fixed_args_that_are_searched(tmp_path):
    with pytest.raises(ValueError, match=r"--base-lr"):
        local.tune("d", str(tmp_path), ["--base-lr", "0.1", "--epochs", "1"], trials=1)


def test_tune_command_line():
    parser = local.get_args_parser()
    args = parser.parse_args(["--data", "D", "--output", "O", "--trials", "2", "--no-prune", "--",
                              "--arch", "resnet18", "--epochs", "1"])
    kwargs = local.tune_kwargs(args)
    assert kwargs["fixed_args"] == ["--arch", "resnet18", "--epochs", "1"]
    assert kwargs["trials"] == 2 and kwargs["prune"] is False and kwargs["data"] == "D"
    # The CLI maps `bincounter tune` to this module.
    from bincounter import cli

    assert cli.SUBCOMMANDS["tune"][0] == "bincounter.engines.local"


def test_optuna_samples_the_shared_search_space():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        values = search_space.suggest_optuna(trial)
        assert set(values) == {p.name for p in search_space.SEARCH_SPACE}
        assert all(search_space.by_name(k).contains(v) for k, v in values.items())
        args = search_space.to_train_args(values)
        assert args[::2] == [p.flag for p in search_space.SEARCH_SPACE]
        study.tell(trial, 0.0)


def test_real_torchrun_failure_raises_with_the_trainers_error(tmp_path):
    # The real entrypoint under the real torchrun: a split folder without a manifest is an
    # error the trainer names; the engine must surface it, not just "exit code 1".
    with pytest.raises(local.LocalRunError) as err:
        local.train(str(tmp_path / "no-split"), str(tmp_path / "model"),
                    ["--arch", "resnet18", "--epochs", "1", "--warmup-epochs", "0"],
                    nproc_per_node=1, deadline_s=300, echo=False)
    first_line, _, rest = str(err.value).partition("\n")
    # The trainer's own error is named in the first line, above torchrun's generic report.
    assert first_line.startswith("torchrun bincounter.train failed with exit code 1: FileNotFoundError: "
                                 "No manifest.json under")
    assert "bincounter split" in first_line and "ChildFailedError" in rest
    assert not (tmp_path / "model" / "model.pt").exists()


def test_sigterm_to_the_waiting_step_stops_the_process_it_started(tmp_path):
    # KFP cancels a step with SIGTERM. The process the engine started lives in its own session
    # (like torchrun), so it survives its parent unless the engine stops it on the way out.
    pid_file = tmp_path / "child.pid"
    waiter = textwrap.dedent(f"""
        import sys
        from bincounter.engines import local
        cmd = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                     "print('started', flush=True); time.sleep(60)"]
        with local.sigterm_raises():
            local.run_process(cmd, echo=True)
    """)
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    child = int(pid_file.read_text())
    assert local._alive(child)
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    for _ in range(100):
        if not local._alive(child):
            break
        time.sleep(0.1)
    assert not local._alive(child)


FAKE_TRAINER = '''
"""A stand-in for bincounter.train under torchrun: prints Katib metric lines from the hyperparameters."""
import argparse, math, sys, time
p = argparse.ArgumentParser()
for flag in ("--data", "--output"):
    p.add_argument(flag)
for flag in ("--base-lr", "--weight-decay", "--dropout", "--label-smoothing"):
    p.add_argument(flag, type=float)
p.add_argument("--batch-size", type=int)
p.add_argument("--epochs", type=int)
a = p.parse_args()
if a.dropout > 0.25:
    print("ValueError: simulated divergence", flush=True)
    sys.exit(1)
for epoch in range(1, a.epochs + 1):
    acc = max(0.0, 1 - abs(math.log10(a.base_lr) + 3) / 2) * epoch / a.epochs  # best near 1e-3
    print(f"epoch={epoch} train-loss={1 - acc:.4f} val-accuracy={acc:.4f}", flush=True)
    time.sleep(0.2)
'''


def _fake_accuracy(lr: float, epoch: int, epochs: int) -> float:
    import math

    return round(max(0.0, 1 - abs(math.log10(lr) + 3) / 2) * epoch / epochs, 4)


def test_tune_records_complete_pruned_and_failed_trials(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = local.tune("unused-split", str(tmp_path / "tune"), ["--epochs", "4"], trials=8, seed=3,
                        module="fake_trainer", echo=False)
    states = {r["number"]: r["state"] for r in result.trials}
    assert len(states) == 8 and set(states.values()) <= {"COMPLETE", "PRUNED", "FAIL"}
    assert "PRUNED" in states.values(), states  # median stopping ended a weak trial early
    for r in result.trials:
        if r["state"] == "COMPLETE":  # objective: the best epoch's val-accuracy, as Katib's "max" strategy
            assert r["value"] == _fake_accuracy(r["params"]["base-lr"], 4, 4)
        if r["state"] == "FAIL":
            assert r["params"]["dropout"] > 0.25 and "simulated divergence" in r["error"]
        if r["state"] == "PRUNED":
            assert r["value"] < _fake_accuracy(r["params"]["base-lr"], 4, 4)  # stopped before its last epoch
    complete = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert result.best_value == max(r["value"] for r in complete)
    assert result.best_params == next(r["params"] for r in complete if r["value"] == result.best_value)
    saved = json.loads((tmp_path / "tune" / "tuning.json").read_text())
    assert saved["best_params"] == result.best_params and len(saved["trials"]) == 8


def test_tune_fails_when_no_trial_completes(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    only_failing = [search_space.Param("dropout", "double", low=0.45, high=0.5)]
    with pytest.raises(local.LocalRunError, match=r"0 of 2 trials completed, 2 failed"):
        local.tune("unused-split", str(tmp_path / "tune"), ["--epochs", "2"], trials=2, module="fake_trainer",
                   space=only_failing, echo=False)
