"""Training end to end: torchrun with 2 CPU processes (gloo), 1 vs 2 processes, resume, restarts, Katib lines.

All runs train a ResNet-18 from scratch at 64 px on the shared ``synthetic_split``
(170 train / 35 val / 35 test bins, counts 0..5 roughly uniform) and are real
subprocesses, started exactly as a user or a PyTorchJob would start them.
Training is deterministic on one machine (every epoch reseeds from seed, epoch and
rank; gloo sums two ranks in a fixed order), which the resume tests rely on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bincounter import evaluate as ev
from bincounter import model as model_lib
from bincounter.data import shards

pytestmark = pytest.mark.slow

KATIB_REGEX = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"  # Katib's default StdOut filter
EPOCHS = 8
GLOBAL_BATCH = 16
# Small and explicit: the recipe's defaults (ResNet-50 with downloaded weights at 384 px) are far too big here.
COMMON = ["--arch", "resnet18", "--pretrained", "", "--input-size", "64", "--epochs", str(EPOCHS),
          "--lr", "2e-3", "--warmup-epochs", "1", "--loader-workers", "1", "--seed", "0", "--print-freq", "1",
          # 8 epochs on 170 bins with the device augmentation: the recipe's label smoothing and weight
          # decay (made for 324k bins and 30 epochs) leave this tiny run short of the skill the test asks for
          "--label-smoothing", "0", "--weight-decay", "1e-4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(data: str, output: Path, nproc: int | None, extra: list[str] = (), max_restarts: int = 0,
                 kill_after_epoch: int | None = None, timeout: float = 400) -> tuple[int, str]:
    """Run training as a subprocess; ``nproc=None`` runs ``python -m bincounter.train`` without torchrun.

    ``kill_after_epoch=N`` SIGKILLs, once epoch N's line is printed (its checkpoint is then written),
    rank 1's worker under torchrun, or the whole process without torchrun. Returns (exit code, output).
    """
    train_args = ["--data", data, "--output", str(output), *COMMON, *extra]
    if nproc is None:
        cmd = [sys.executable, "-m", "bincounter.train", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               # c10d rendezvous (what --standalone uses): each restart is a new round with a fresh store
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.5", "-m", "bincounter.train", *train_args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT") and not k.startswith("PET_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, pids, killed, deadline = [], {}, False, time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if time.monotonic() > deadline:
                raise TimeoutError("training ran past %ss:\n%s" % (timeout, "".join(lines)))
            if m := re.search(r"rank=(\d+)/\d+ .*pid=(\d+)", line):
                pids[int(m.group(1))] = int(m.group(2))
            if kill_after_epoch and not killed and line.startswith(f"epoch={kill_after_epoch} "):
                os.kill(pids[1] if nproc else proc.pid, signal.SIGKILL)
                killed = True
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if kill_after_epoch:
        assert killed, "the run ended before it could be killed:\n" + "".join(lines)
    return proc.returncode, "".join(lines)


def final_metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "metrics.json").read_text())["final"]


@pytest.fixture(scope="module")
def two_proc(synthetic_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-proc") / "model"
    rc, log = run_training(synthetic_split, out, nproc=2, extra=["--batch-size", str(GLOBAL_BATCH // 2)])
    assert rc == 0, log
    return out, log


@pytest.fixture(scope="module")
def one_proc(synthetic_split, tmp_path_factory):
    """One process without torchrun, stopped (SIGKILL) after epoch 1 and continued with --resume."""
    out = tmp_path_factory.mktemp("one-proc") / "model"
    extra = ["--batch-size", str(GLOBAL_BATCH), "--resume"]
    rc, stopped_log = run_training(synthetic_split, out, nproc=None, extra=extra, kill_after_epoch=1)
    assert rc == -signal.SIGKILL, stopped_log
    assert not (out / model_lib.CONFIG_FILE).exists()  # stopped before the model folder was written
    rc, log = run_training(synthetic_split, out, nproc=None, extra=extra)
    assert rc == 0, log
    return out, log


def test_two_processes_learn_to_count(two_proc, synthetic_split):
    """Test accuracy clearly above always answering the most frequent count.

    The test split has 35 bins; its majority class is ~23% of them (the classes are
    near uniform). We require majority + 0.15 (about 0.38), i.e. 5 more correct bins
    than the majority answer: a model without skill reaches that with ~3% chance
    (binomial, p=0.23, n=35), while this run reaches ~0.6 (training is deterministic
    here, so the margin does not vary from run to run on one platform).
    """
    out, _ = two_proc
    counts = shards.read_manifest(synthetic_split)["splits"]["test"]["class_counts"]
    majority = max(counts.values()) / sum(counts.values())
    metrics = ev.evaluate(str(out), synthetic_split, split="test", workers=0, device="cpu")
    assert metrics["samples"] == sum(counts.values())
    print(f"test accuracy {metrics['accuracy']:.3f} (majority {majority:.3f}), rmse {metrics['rmse']:.3f}")
    assert metrics["accuracy"] >= majority + 0.15, (metrics["accuracy"], majority)


def test_model_folder_is_what_serving_loads(two_proc):
    out, _ = two_proc
    net, cfg = model_lib.load_model_dir(out)
    assert (cfg.arch, cfg.max_count, cfg.num_classes, cfg.input_size, cfg.resize_size) == ("resnet18", 5, 6, 64, 64)
    assert cfg.train_args["batch_size"] == GLOBAL_BATCH // 2 and cfg.train_args["optimizer"] == "adamw"
    # The shipped weights are the best epoch's (trained or EMA) by val-accuracy, the tuning objective.
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert cfg.metrics == final_metrics(out)
    assert cfg.metrics["val-accuracy"] == max(row["val-accuracy"] for row in history)
    assert cfg.checkpoint["epoch"] == cfg.metrics["epoch"] and cfg.checkpoint["source"] in ("model", "ema")
    assert cfg.decoding in model_lib.DECODINGS
    assert (out.parent / f"{out.name}-checkpoints" / "checkpoint.pt").exists()
    assert not (out / "checkpoints").exists()  # KServe copies the whole model folder
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_metric_lines_parse_with_katib_regex(two_proc):
    out, log = two_proc
    lines = [line for line in log.splitlines() if line.startswith("epoch=")]
    assert len(lines) == EPOCHS  # rank 0 only, one line per epoch
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    for line, row in zip(lines, history):
        parsed = {name: value for name, value, *_ in re.findall(KATIB_REGEX, line)}
        assert list(parsed) == ["epoch", "train-loss", "val-loss", "val-accuracy", "val-rmse", "val-mae",
                                "val-within1", "lr"]
        assert int(parsed["epoch"]) == row["epoch"]
        for name in ("train-loss", "val-loss", "val-accuracy", "val-rmse"):
            assert float(parsed[name]) == pytest.approx(row[name], abs=5e-5)
    # the names Katib and optuna are told to collect (bincounter.search_space) are all printed
    from bincounter import search_space

    assert {search_space.OBJECTIVE_METRIC, *search_space.ADDITIONAL_METRICS} <= set(parsed)


def test_steps_per_epoch_is_the_longest_rank(two_proc):
    """The progress log's "step k/M": M, computed from the manifest's per-shard counts, is the
    number of steps the epoch really takes (before, ranks got 90 and 80 samples by shard count
    and the log said "step 12/11")."""
    _, log = two_proc
    steps: dict[int, tuple[int, set]] = {}
    for epoch, k, m in re.findall(r"epoch (\d+) step (\d+)/(\d+) ", log):
        last, totals = steps.get(int(epoch), (0, set()))
        steps[int(epoch)] = (max(last, int(k)), totals | {int(m)})
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    for epoch, (last, totals) in steps.items():
        assert totals == {last}, (epoch, last, totals)


def test_one_and_two_processes_with_the_same_global_batch_match(one_proc, two_proc):
    """1 x 16 and 2 x 8 images per step see the same data per epoch but not in the same order, and
    BatchNorm normalises over 16 vs 8 images, so the runs are not bit-equal. (The one-process run
    was stopped and resumed; resuming is exact, see the restart test.) Tolerance: validation
    accuracy within 0.15 (5 of 35 bins) and validation loss within 0.25 nats of each other."""
    # the last epochs (the shipped "final" is each run's best epoch, which need not be the same epoch)
    one, two = (json.loads((run[0] / "metrics.json").read_text())["last"] for run in (one_proc, two_proc))
    print({k: (round(one[k], 4), round(two[k], 4)) for k in ("val-accuracy", "val-loss", "train-loss")})
    assert one["train-samples"] == two["train-samples"]  # every training sample once per epoch, both ways
    assert abs(one["val-accuracy"] - two["val-accuracy"]) <= 0.15, (one, two)
    assert abs(one["val-loss"] - two["val-loss"]) <= 0.25, (one, two)


def test_worker_killed_mid_epoch_restarts_resumes_and_finishes(two_proc, synthetic_split, tmp_path):
    """torchrun --max-restarts 1: rank 1 is killed during epoch 3; the group restarts, resumes from the
    epoch-2 checkpoint and ends exactly where the uninterrupted run (same arguments) ended."""
    out = tmp_path / "model"
    rc, log = run_training(synthetic_split, out, nproc=2, extra=["--batch-size", str(GLOBAL_BATCH // 2)],
                           max_restarts=1, kill_after_epoch=2)
    assert rc == 0, log
    assert "resumed from" in log and "after epoch 2" in log, log
    resumed, reference = final_metrics(out), final_metrics(two_proc[0])
    for name in ("train-loss", "val-loss", "val-accuracy", "val-rmse"):
        assert resumed[name] == pytest.approx(reference[name], abs=1e-4), name


def test_stopped_run_continues_with_resume_flag(one_proc):
    out, log = one_proc
    assert "resumed from" in log and "after epoch 1" in log, log
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert [line for line in log.splitlines() if line.startswith("epoch=")][0].startswith("epoch=2 ")
