"""`bincounter train`: fine-tune an ImageNet network to count the items in bin photos, on one process or many (DDP).

The one training entrypoint. Started directly for one process, by ``torchrun``
on a laptop, and by a PyTorchJob or TrainJob on a cluster; ``bincounter.distributed``
reads whichever env contract the launcher set. Examples::

    bincounter train --data runs/split --output runs/model --arch resnet18 --epochs 5
    torchrun --nproc-per-node 2 -m bincounter.train --data runs/split --output runs/model

Each epoch rank 0 prints one ``name=value`` line that Katib's StdOut collector parses::

    epoch=3 train-loss=0.9100 val-loss=1.0200 val-accuracy=0.5500 val-rmse=0.9300 ...

Data: each rank reads its share of the train shards and each DataLoader worker a
share of that (``distributed.partition``), so an epoch sees every training sample
exactly once. Shards go to ranks by the manifest's per-shard sample counts
(``distributed.balance``); ranks can still end up with different numbers of
batches, and ``train_one_epoch`` keeps them in step with empty padding batches that
touch neither BatchNorm statistics nor the optimizer (see its docstring).

What ships: each epoch validates the trained weights and their EMA; the model
folder gets the best of all of them by val-accuracy (the tuning objective), and
config.json records which (``checkpoint``) and the decoding chosen on validation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from bincounter import augment as augment_lib
from bincounter import distributed as dist_utils
from bincounter import model as model_lib
from bincounter import calibration, errors, presets, storage
from bincounter.data import shards
from bincounter.data.loader import ShardDataset, count_samples, make_loader, shard_sample_counts
from bincounter.evaluate import metrics_from_confusion

log = logging.getLogger("bincounter.train")

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"  # the weights to ship, beside the checkpoint (atomic, like it)
OPTIMIZERS = ("adamw", "sgd")


# Settings that do not shape the weights: a resumed run may change them. Every other
# TrainConfig field must match the checkpoint (``load_checkpoint``).
OPERATIONAL = ("output", "workers", "device", "resume", "checkpoint_dir", "metrics_file", "tensorboard_dir",
               "profile", "print_freq")
SYNC_BN = ("auto", "on", "off")
DECODING_CHOICES = ("auto", *model_lib.DECODINGS)


@dataclasses.dataclass
class TrainConfig:
    """Every training setting, with its default (the CLI flags are built from these fields).

    The defaults are the recipe; docs/training.md gives the reason for each.
    """

    data: str = ""  # split folder or s3:// prefix written by `bincounter split`
    output: str = ""  # model folder or s3:// prefix (written by rank 0 at the end)
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # torchvision's DEFAULT ImageNet weights; or a path / s3:// URI; "" = scratch
    max_count: int = 5  # classes 0..K, the standard ABID counting task
    k_or_more: bool = True  # map counts above K to class K ("K or more") instead of dropping them
    epochs: int = 30
    batch_size: int = 32  # PER RANK; the global batch is batch_size * world size
    base_lr: float = 5e-4  # peak lr per 256 images of global batch (linear scaling rule)
    lr: float = 0.0  # peak lr for the actual global batch; 0: base_lr * global batch / 256
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05  # decoupled (AdamW); on conv/linear weights, not on norms and biases
    dropout: float = 0.0  # before the counting head
    head: str = "softmax"  # counting head: softmax over K+1 counts, or ordinal (cumulative logit)
    label_smoothing: float = 0.1
    warmup_epochs: float = 2.0  # linear warmup, then cosine to 0; capped at half the epochs
    ema_epochs: float = 1.0  # weight EMA horizon in epochs (decay per step from it); 0: no EMA
    sync_bn: str = "auto"  # SyncBatchNorm: auto = on GPUs when the per-rank batch is below 32
    decoding: str = "auto"  # how probabilities become a count; auto: chosen on validation
    input_size: int = presets.INPUT_SIZE
    resize_size: int = 0  # eval: resize the whole image to this square, then centre-crop input_size (0: = input_size)
    workers: int = 4  # DataLoader worker processes per rank
    augment: str = "trivial"  # photometric policy, run batch-wise on the device (bincounter/augment.py)
    gpu_decode: str = "auto"  # auto: nvJPEG on the training GPU under CUDA; off: decode in the workers
    shuffle_buffer: int = 1000  # samples per worker shuffled on the fly (shard order is shuffled too)
    seed: int = 0
    device: str = "auto"
    resume: bool = False  # continue from the checkpoint in checkpoint_dir when there is one
    checkpoint_dir: str = ""  # default <output>-checkpoints, beside the model folder (see default_checkpoint_dir)
    metrics_file: str = ""  # default <output>/metrics.json
    tensorboard_dir: str = ""  # default <output>/tensorboard
    profile: bool = False  # torch.profiler trace of a few steps of the first epoch, to <output>/profile
    print_freq: int = 50  # progress log every N steps (stderr)
    val_split: str = "val"

    def __post_init__(self):
        if not self.data or not self.output:
            raise ValueError("Both data (a split folder) and output (the model folder) are required")
        for name, choices in (("arch", model_lib.ARCHITECTURES), ("optimizer", OPTIMIZERS), ("sync_bn", SYNC_BN),
                              ("decoding", DECODING_CHOICES), ("head", model_lib.HEADS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}. Only {', '.join(choices)} are supported.")
        if self.augment not in augment_lib.POLICIES:
            raise ValueError(f"Invalid augment {self.augment!r}. Only {', '.join(augment_lib.POLICIES)} are supported.")
        if self.gpu_decode not in presets.GPU_DECODE_CHOICES:
            raise ValueError(f"Invalid gpu_decode {self.gpu_decode!r}. "
                             f"Only {', '.join(presets.GPU_DECODE_CHOICES)} are supported.")
        for name in ("epochs", "batch_size", "max_count", "print_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "ema_epochs", "lr", "base_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("dropout and label_smoothing must be in [0, 1)")
        self.resize_size = self.resize_size or self.input_size
        if self.input_size < 64 or self.resize_size < self.input_size:
            # Below 64 px ResNet's last feature map is 1x1 and a batch of one breaks BatchNorm.
            raise ValueError(f"Need 64 <= input_size <= resize_size, got {self.input_size} and {self.resize_size}")

    @property
    def warmup(self) -> float:
        """Warmup epochs actually used: at most half the run, so ``--epochs 1`` works with the defaults."""
        return min(self.warmup_epochs, self.epochs / 2)

    def peak_lr(self, world_size: int) -> float:
        """``lr`` if set, else ``base_lr`` scaled linearly to the global batch (Goyal et al. 2017)."""
        return self.lr or self.base_lr * self.batch_size * world_size / 256

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown training options {unknown}. Known: {sorted(known)}")
        return cls(**kwargs)


# ---------------------------------------------------------------- model, optimiser, schedule

def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (as torchvision's --norm-weight-decay 0 and timm do).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(progress: float, warmup_epochs: float, epochs: int) -> float:
    """Learning-rate multiplier at ``progress`` epochs into training: linear warmup, then cosine to 0.

    A pure function of progress, so a resumed run gets the same schedule without scheduler state.
    """
    if progress < warmup_epochs:
        return (progress + 1e-3) / warmup_epochs
    t = (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def make_ema(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int | None) -> AveragedModel | None:
    """Weight EMA over about ``ema_epochs`` epochs of steps (BatchNorm buffers averaged too), or None."""
    if not cfg.ema_epochs:
        return None
    decay = 1.0 - 1.0 / max(cfg.ema_epochs * (steps_per_epoch or 1), 1.0)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def use_sync_bn(cfg: TrainConfig, world_size: int, device: torch.device) -> bool:
    """SyncBatchNorm when ranks hold small batches: BN statistics of < 32 images per GPU are noisy."""
    if cfg.sync_bn == "on" and device.type != "cuda":
        raise ValueError("--sync-bn on needs CUDA (torch's SyncBatchNorm runs on GPUs only); use auto or off")
    return cfg.sync_bn == "on" or (cfg.sync_bn == "auto" and world_size > 1 and device.type == "cuda"
                                   and cfg.batch_size < 32)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 (with a grad scaler) on older ones, fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- the loop

def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, epoch: int, cfg: TrainConfig,
                    steps_per_epoch: int | None, peak_lr: float, ema: AveragedModel | None = None,
                    profiler=None, device_transform=None) -> dict[str, float]:
    """One pass over this rank's share of the training data. Returns the epoch's metrics, over all ranks.

    Ranks may hold different numbers of samples. Every step the ranks agree (one tiny all-reduce)
    on how many samples the step has in all; a rank that has run out joins the step with an
    EMPTY batch: its forward touches no BatchNorm statistics (a repeated real batch would, and
    DDP ships rank 0's), its gradient is zero, and it applies the same all-reduced gradient as
    every other rank, so weights and optimizer state stay identical everywhere. Each step's
    gradient is the mean over the step's real samples whatever the batch sizes (the loss is a
    sum / global count, times the world size that DDP divides by). The loop ends when no rank
    has data left; ``steps_per_epoch`` (the longest rank's batches) only drives the schedule.
    """
    model.train()
    amp_dtype = amp_dtype_for(device)
    world = dist_utils.get_world_size()
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    batches, shape, step = iter(loader), (3, cfg.input_size, cfg.input_size), 0
    while True:
        batch = next(batches, None)
        n_local = 0 if batch is None else len(batch[1])
        n_step = dist_utils.reduce_sums({"n": n_local}, device)["n"]
        if n_step == 0:
            break
        step += 1
        progress = epoch + (min((step - 1) / steps_per_epoch, 0.999) if steps_per_epoch else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * lr_factor(progress, cfg.warmup, cfg.epochs)
        if batch is None:  # padding step: an empty batch of the model's input shape, on the device
            images = torch.zeros(0, *shape, device=device)
            targets = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            images, targets = batch
            # Workers ship uint8; augmentation, float conversion and normalisation happen here, batch-wise.
            images = device_transform(images, device) if device_transform else images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            shape = tuple(images.shape[1:])
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with _bn_counters_kept(model, n_local == 0), \
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_local = criterion(model(images), targets)  # summed over this rank's samples
        loss_value = loss_local.item() / max(n_local, 1)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"Loss is {loss_value} at epoch {epoch + 1}, step {step} (rank {dist_utils.get_rank()}); "
                f"stopping. Lower --lr / --base-lr (now {peak_lr:g}) or check the data.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss_local * (world / n_step)).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        loss_sum += loss_value * n_local
        seen += n_local
        if profiler is not None:
            profiler.step()
        if step % cfg.print_freq == 0:
            log.info("epoch %d step %d/%s loss %.4f lr %.3g", epoch + 1, step, steps_per_epoch or "?",
                     loss_value, optimizer.param_groups[0]["lr"])
    if step == 0:
        raise ValueError(f"No training samples in {cfg.data} (split train) with counts 0..{cfg.max_count}")
    sums = dist_utils.reduce_sums({"loss": loss_sum, "n": seen, "seconds": time.perf_counter() - start}, device)
    return {"train-loss": sums["loss"] / sums["n"], "train-samples": int(sums["n"]), "train-steps": step,
            "images-per-s": sums["n"] / (sums["seconds"] / world), "lr": optimizer.param_groups[0]["lr"]}


@contextlib.contextmanager
def _bn_counters_kept(model: nn.Module, padding: bool):
    """On a padding step, undo the one thing an empty batch changes in BatchNorm: its batch counter.
    (Running mean and variance are left alone by an empty batch; SyncBatchNorm skips empty ranks.)"""
    if not padding:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    before = [m.num_batches_tracked.clone() for m in norms]
    try:
        yield
    finally:
        for m, n in zip(norms, before):
            m.num_batches_tracked.copy_(n)


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             class_names: list[str]) -> dict[str, Any]:
    """Loss and counting metrics on this rank's share of a split, reduced over ranks, for every
    decoding: the top-level metrics are argmax's, ``decodings[method]`` each one's.

    Runs the bare model (not the DDP wrapper): ranks may hold different numbers
    of batches and the loop needs no collectives; only the sums are reduced.
    """
    model.eval()
    amp_dtype = amp_dtype_for(device)
    methods = model_lib.DECODINGS
    cm = torch.zeros(len(methods), num_classes * num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        # Plain cross-entropy (no label smoothing), so val-loss compares across settings.
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        probs = logits.softmax(dim=1)
        for i, method in enumerate(methods):
            cm[i] += torch.bincount(targets * num_classes + model_lib.decode(probs, method),
                                    minlength=num_classes ** 2)
    dist_utils.all_reduce_sum(cm)
    dist_utils.all_reduce_sum(loss_sum)
    per = {m: metrics_from_confusion(cm[i].view(num_classes, num_classes).long().cpu().numpy(), class_names)
           for i, m in enumerate(methods)}
    metrics = dict(per["argmax"])
    metrics["loss"] = loss_sum.item() / metrics["samples"]
    metrics["decodings"] = {m: {k: per[m][k] for k in ("accuracy", "rmse", "mae", "within1")} for m in methods}
    return metrics


def choose_decoding(row: dict[str, float], requested: str = "auto") -> str:
    """The decoding to ship. ``auto``: the lowest val RMSE among the decodings whose val accuracy is
    within one point of the best one's (RMSE matters as much as accuracy for counting, but not
    at any price in accuracy); ties go to argmax, then median."""
    if requested != "auto":
        return requested
    best_acc = max(row[f"val-{m}-accuracy"] for m in model_lib.DECODINGS)
    ok = [m for m in model_lib.DECODINGS if row[f"val-{m}-accuracy"] >= best_acc - 0.01]
    return min(ok, key=lambda m: (row[f"val-{m}-rmse"], model_lib.DECODINGS.index(m)))


def better(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """Is validation result ``a`` better than ``b``? val-accuracy (the tuning objective), then val-rmse."""
    return b is None or (a["val-accuracy"], -a["val-rmse"]) > (b["val-accuracy"], -b["val-rmse"])


def epoch_row(train_row: dict[str, float], candidates: dict[str, dict]) -> dict[str, Any]:
    """The epoch's metrics: val-* of the better of the trained weights and their EMA
    (``val-source`` says which), plus each candidate's val-accuracy and each decoding's metrics."""
    rows = {}
    for name, val in candidates.items():
        r = {f"val-{k}": val[k] for k in ("loss", "accuracy", "rmse", "mae", "within1", "macro_f1")}
        for method, d in val["decodings"].items():
            r.update({f"val-{method}-{k}": d[k] for k in ("accuracy", "rmse")})
        rows[name] = r
    source = "model"
    for name, r in rows.items():
        if better(r, rows[source]) and name != source:
            source = name
    row = dict(train_row, **rows[source], **{f"{n}-val-accuracy": r["val-accuracy"] for n, r in rows.items()})
    row["val-source"] = source
    return row


def metric_line(epoch: int, row: dict[str, float]) -> str:
    """The Katib StdOut line: ``epoch=3 train-loss=0.9100 val-loss=... val-accuracy=... val-rmse=...``.

    val-* are those of the weights this epoch would ship (trained or EMA), so Katib's best
    epoch (metricStrategies max) is the model training ships.
    """
    keys = ("train-loss", "val-loss", "val-accuracy", "val-rmse", "val-mae", "val-within1")
    return f"epoch={epoch} " + " ".join(f"{k}={row[k]:.4f}" for k in keys) + f" lr={row['lr']:.4g}"


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(uri: str, model: nn.Module, optimizer, scaler, epoch: int, cfg: TrainConfig,
                    history: list[dict], ema: AveragedModel | None, best: dict | None, world_size: int) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "best": best, "epoch": epoch,
                "config": dataclasses.asdict(cfg), "world_size": world_size, "history": history}, buf)
    storage.write_bytes(uri, buf.getvalue())  # atomic: a crash mid-write keeps the previous checkpoint


def load_checkpoint(uri: str, cfg: TrainConfig) -> dict:
    """The checkpoint at ``uri``; refuses one made with any other setting that shapes the weights."""
    with errors.about_file(uri, "checkpoint"):
        ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    mine = dataclasses.asdict(cfg)
    changed = [k for k in mine if k not in OPERATIONAL and ckpt["config"].get(k) != mine[k]]
    if changed:
        diff = ", ".join(f"{k}={ckpt['config'].get(k)!r} (now {mine[k]!r})" for k in changed)
        raise ValueError(f"Checkpoint {uri} was made with other settings: {diff}. "
                         "Use the same settings to resume, or another --checkpoint-dir.")
    return ckpt


class _LocalMirror:
    """A local folder for writers that need one (TensorBoard, the profiler), copied to ``uri`` on ``sync``."""

    def __init__(self, uri: str):
        self.uri = uri
        self.path = uri if not storage.is_s3(uri) else tempfile.mkdtemp(prefix="bincounter-")

    def sync(self) -> None:
        if storage.is_s3(self.uri):
            for rel, _ in storage.list_files(self.path):
                storage.upload_file(Path(self.path, rel), storage.join(self.uri, rel))


def seed_all(seed: int, epoch: int, rank: int) -> None:
    # Reseeded every epoch from (seed, epoch, rank), so a resumed epoch replays exactly.
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    random.seed(s)
    torch.manual_seed(s)


def train(**kwargs) -> dict[str, Any]:
    """Train and write the model folder; returns the final validation metrics (on every rank).

    Keyword arguments are the fields of ``TrainConfig``; unknown ones raise ``TypeError``.
    Joins the process group when a launcher set one up (see ``bincounter.distributed``).
    """
    cfg = TrainConfig.from_kwargs(kwargs)
    env = dist_utils.resolve_env()
    device = dist_utils.select_device(cfg.device, env)
    dist_utils.init_distributed(env, device)
    try:
        return _train(cfg, env, device)
    finally:
        dist_utils.cleanup()


def default_checkpoint_dir(output: str) -> str:
    """``runs/model`` -> ``runs/model-checkpoints``: beside the model folder, not in it, so that
    serving it (KServe's storage initializer copies the whole storageUri) never downloads the
    optimizer state, which is twice the size of the weights."""
    return str(output).rstrip("/") + "-checkpoints"


def _train(cfg: TrainConfig, env: dist_utils.DistEnv, device: torch.device) -> dict[str, Any]:
    main_process = dist_utils.is_main_process()
    ckpt_dir = cfg.checkpoint_dir or default_checkpoint_dir(cfg.output)
    checkpoint_uri, best_uri = storage.join(ckpt_dir, CHECKPOINT_FILE), storage.join(ckpt_dir, BEST_FILE)
    # Evaluation, serving and audit read the whole bin at the training size (no centre crop unless
    # --resize-size asks for one).
    model_cfg = model_lib.ModelConfig(arch=cfg.arch, max_count=cfg.max_count, k_or_more=cfg.k_or_more,
                                      input_size=cfg.input_size, resize_size=cfg.resize_size, dropout=cfg.dropout,
                                      head=cfg.head, train_args=dataclasses.asdict(cfg))
    peak_lr = cfg.peak_lr(env.world_size)
    log.info("launcher=%s rank=%d/%d local_rank=%d device=%s pid=%d restart=%d", env.launcher, env.rank,
             env.world_size, env.local_rank, device, os.getpid(), env.restart_count)
    if main_process:
        log.info("batch size %d per rank x %d ranks = global batch %d; peak lr %g%s; warmup %g epochs",
                 cfg.batch_size, env.world_size, cfg.batch_size * env.world_size, peak_lr,
                 "" if cfg.lr else f" (base-lr {cfg.base_lr:g} per 256)", cfg.warmup)

    # Data: this rank's share of each split, ranks balanced by the manifest's per-shard counts.
    manifest = shards.read_manifest(cfg.data)
    if main_process:  # before the first epoch, not when the first checkpoint is due
        storage.check_writable(checkpoint_uri.rsplit("/", 1)[0], what="--checkpoint-dir")
    gpu_decode = presets.use_gpu_decode(cfg.gpu_decode, device)  # then workers ship JPEG bytes, decoded on the GPU
    device_transform = presets.train_device_transform(model_cfg.mean, model_cfg.std, cfg.augment,
                                                      cfg.input_size if gpu_decode else None, cfg.seed,
                                                      env.rank).to(device)
    train_set = ShardDataset(shards.shard_uris(cfg.data, "train"),
                             None if gpu_decode else presets.train_transform(cfg.input_size),
                             cfg.max_count, cfg.k_or_more, env.rank, env.world_size, cfg.shuffle_buffer, cfg.seed,
                             shard_sizes=shard_sample_counts(manifest, "train", cfg.max_count, cfg.k_or_more))
    val_set = ShardDataset(shards.shard_uris(cfg.data, cfg.val_split),
                           presets.eval_transform(cfg.input_size, cfg.resize_size, model_cfg.mean, model_cfg.std),
                           cfg.max_count, cfg.k_or_more, env.rank, env.world_size,
                           shard_sizes=shard_sample_counts(manifest, cfg.val_split, cfg.max_count, cfg.k_or_more))
    train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, device)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, device)
    n_train = count_samples(manifest, "train", cfg.max_count, cfg.k_or_more)

    def steps_in(epoch: int) -> int | None:  # the longest rank's batches (old manifests: an estimate)
        steps = train_set.steps(epoch, cfg.batch_size, max(cfg.workers, 1))
        return steps or (math.ceil(n_train / env.world_size / cfg.batch_size) if n_train else None)

    # Model, optimiser and EMA, then the checkpoint if this run continues one.
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = model_lib.build_model(cfg.arch, model_cfg.num_classes, cfg.dropout, cfg.pretrained or None, cfg.head)
    if use_sync_bn(cfg, env.world_size, device):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("SyncBatchNorm: %d images per rank", cfg.batch_size)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype_for(device) == torch.float16)
    ema = make_ema(model, cfg, steps_in(0))
    start_epoch, history, best = 0, [], None
    # torchrun --max-restarts restarts the whole worker group: pick up where it stopped.
    # Rank 0 decides, so that all ranks start from the same epoch.
    resume = dist_utils.broadcast_object((cfg.resume or env.restart_count > 0) and storage.exists(checkpoint_uri))
    if resume:
        if not storage.exists(checkpoint_uri):
            raise FileNotFoundError(f"Rank {env.rank} cannot see {checkpoint_uri}, which rank 0 resumes from. "
                                    "Put --checkpoint-dir on storage every node sees (s3:// or a shared volume).")
        ckpt = load_checkpoint(checkpoint_uri, cfg)
        if ckpt.get("world_size", env.world_size) != env.world_size:
            log.warning("checkpoint was made with %d ranks, this run has %d: the global batch and lr change",
                        ckpt["world_size"], env.world_size)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt.get("best")
        log.info("resumed from %s after epoch %d", checkpoint_uri, start_epoch)
    elif cfg.resume:
        log.info("--resume: no checkpoint at %s yet, starting from scratch", checkpoint_uri)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")

    writer = tb_dir = None
    if main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module imports the tensorboard package, of the train extra
            from bincounter.errors import UserError

            raise UserError("training writes TensorBoard logs, and tensorboard is not installed: "
                            "pip install 'bincounter[train]'") from None

        tb_dir = _LocalMirror(cfg.tensorboard_dir or storage.join(cfg.output, "tensorboard"))
        writer = SummaryWriter(tb_dir.path, purge_step=start_epoch + 1)
    metrics_uri = cfg.metrics_file or storage.join(cfg.output, "metrics.json")

    for epoch in range(start_epoch, cfg.epochs):
        seed_all(cfg.seed, epoch, env.rank)
        train_set.set_epoch(epoch)
        device_transform.set_epoch(epoch)
        with _maybe_profile(cfg, epoch == start_epoch, env.rank) as profiler:
            row = train_one_epoch(ddp_model, train_loader, criterion, optimizer, scaler, device, epoch, cfg,
                                  steps_in(epoch), peak_lr, ema, profiler, device_transform)
        # BatchNorm statistics of rank 0 (the checkpointed ones) everywhere, for the model and its EMA.
        dist_utils.broadcast_buffers(model)
        candidates = {"model": validate(model, val_loader, device, model_cfg.num_classes, model_cfg.class_names)}
        if ema is not None:
            dist_utils.broadcast_buffers(ema)
            candidates["ema"] = validate(ema.module, val_loader, device, model_cfg.num_classes,
                                         model_cfg.class_names)
        row = epoch_row(row, candidates)
        row["epoch"] = epoch + 1
        history.append(row)
        if main_process:
            if better(row, best):  # the weights to ship: best epoch by the tuning objective, trained or EMA
                shipped = ema.module if row["val-source"] == "ema" else model
                storage.write_bytes(best_uri, _to_bytes(_state(shipped)))
                best = dict(row)
            save_checkpoint(checkpoint_uri, model, optimizer, scaler, epoch + 1, cfg, history, ema, best,
                            env.world_size)
            storage.write_bytes(metrics_uri, json.dumps(_metrics_doc(history, best), indent=2).encode())
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
            tb_dir.sync()
            print(metric_line(epoch + 1, row), flush=True)

    best = dist_utils.broadcast_object(best)
    if main_process:
        writer.close()
        tb_dir.sync()
        weights = torch.load(io.BytesIO(storage.read_bytes(best_uri)), map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
        calibration.fit_on_split(model_cfg, model, cfg.data, cfg.val_split, device, cfg.batch_size, cfg.workers)
        model_cfg.metrics = best
        model_cfg.decoding = choose_decoding(best, cfg.decoding)
        model_cfg.checkpoint = {"source": best["val-source"], "epoch": best["epoch"],
                                "val-accuracy": best["val-accuracy"], "val-rmse": best["val-rmse"]}
        model_lib.save_model_dir(model, model_cfg, cfg.output)
        log.info("model folder written to %s: epoch %d (%s weights), decoding %s", cfg.output, best["epoch"],
                 best["val-source"], model_cfg.decoding)
    dist_utils.barrier()  # no rank returns before the model folder exists
    return best


def _to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _metrics_doc(history: list[dict], best: dict | None) -> dict:
    """metrics.json: every epoch, ``final`` (what the model folder ships) and ``last`` (the last epoch)."""
    return {"epochs": history, "final": best, "last": history[-1] if history else None}


@contextlib.contextmanager
def _maybe_profile(cfg: TrainConfig, first_epoch: bool, rank: int):
    """With --profile, trace steps 2-4 of the first epoch (step 1 warms up) to <output>/profile."""
    if not (cfg.profile and first_epoch):
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    mirror = _LocalMirror(storage.join(cfg.output, "profile"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=3, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(mirror.path, worker_name=f"rank{rank}"),
                 record_shapes=True) as prof:
        yield prof
    mirror.sync()


# ---------------------------------------------------------------- command line

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name: str, help: str, **kw):
        field = name.lstrip("-").replace("-", "_")
        if "action" not in kw:
            kw.setdefault("type", type(d[field].default))
        p.add_argument(name, default=d[field].default, help=help, **kw)

    p.add_argument("--data", required=True, help="split folder or s3:// prefix written by `bincounter split`")
    p.add_argument("--output", required=True, help="model folder or s3:// prefix to write (rank 0 writes it)")
    add("--arch", "network", choices=model_lib.ARCHITECTURES)
    add("--pretrained", "ImageNet weights: 'imagenet' for torchvision's DEFAULT weights (downloaded), a local "
                        "path or s3:// URI of a state_dict of the same architecture, or '' to train from scratch")
    add("--max-count", "K: classes are counts 0..K")
    add("--k-or-more", "map counts above K to class K ('K or more'); --no-k-or-more drops those bins "
                       "(the published 0..5 benchmark)", action=argparse.BooleanOptionalAction)
    add("--epochs", "epochs to train")
    add("--batch-size", "images per step PER RANK (global batch = batch size x world size)")
    add("--base-lr", "peak learning rate per 256 images of global batch; the run uses "
                     "base-lr x global batch / 256 (linear scaling rule)")
    add("--lr", "peak learning rate for this run's global batch, overriding --base-lr (0: from --base-lr)")
    add("--optimizer", "optimizer", choices=OPTIMIZERS)
    add("--momentum", "SGD momentum (Nesterov)")
    add("--weight-decay", "decoupled weight decay on conv and linear weights")
    add("--dropout", "dropout before the counting head")
    add("--head", "counting head: softmax over the K+1 counts, or ordinal (cumulative logit: one score, "
                  "K ordered thresholds)", choices=model_lib.HEADS)
    add("--label-smoothing", "label smoothing of the training loss")
    add("--warmup-epochs", "epochs of linear warmup before the cosine decay (at most half of --epochs)")
    add("--ema-epochs", "weight EMA horizon in epochs; the EMA is validated each epoch and shipped when "
                        "better (0: no EMA)")
    add("--sync-bn", "SyncBatchNorm across ranks; auto: on GPUs when --batch-size < 32", choices=SYNC_BN)
    add("--decoding", "how class probabilities become a count (recorded in config.json for serving and "
                      "audit); auto picks on validation", choices=DECODING_CHOICES)
    add("--input-size", "model input in pixels: training, evaluation and serving resize the whole bin to it")
    add("--resize-size", "eval: resize whole images to this square, then centre-crop --input-size; 0 means "
                         "--input-size, no crop (the default: the whole bin in view). Training never crops")
    add("--workers", "DataLoader worker processes per rank")
    add("--augment", "photometric augmentation, batch-wise on the device: trivial (TrivialAugmentWide's "
                     "photometric ops), jitter (ColorJitter 0.2) or none", choices=augment_lib.POLICIES)
    add("--gpu-decode", "auto: decode JPEGs on the GPU (nvJPEG) when training on CUDA; off: in the workers",
        choices=presets.GPU_DECODE_CHOICES)
    add("--shuffle-buffer", "samples per worker in the shuffle buffer (0: no shuffling)")
    add("--seed", "random seed (data order, augmentation, initialisation)")
    add("--device", "where to train: auto picks cuda:LOCAL_RANK when a GPU is visible", choices=("auto", "cpu", "cuda"))
    add("--resume", "continue from the checkpoint in --checkpoint-dir if there is one (safe to always pass; "
                    "refused when a setting that shapes the weights changed); under torchrun restarts this "
                    "happens anyway", action="store_true")
    add("--checkpoint-dir", "folder or s3:// prefix for checkpoint.pt and best.pt (empty: <output>-checkpoints, "
                            "beside the model folder)")
    add("--metrics-file", "JSON file of per-epoch metrics (empty: <output>/metrics.json)")
    add("--tensorboard-dir", "TensorBoard log folder or s3:// prefix (empty: <output>/tensorboard)")
    add("--profile", "write a torch.profiler trace of a few steps to <output>/profile", action="store_true")
    add("--print-freq", "log progress every N steps")
    add("--val-split", "split of --data to validate on each epoch")
    return p


def train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The only place argparse meets ``train``: Namespace -> keyword arguments."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(message)s")
    train(**train_kwargs(args))
    return 0


if __name__ == "__main__":
    from bincounter.cli import prepare_parser

    sys.exit(main(prepare_parser(get_args_parser(), "train").parse_args()))
