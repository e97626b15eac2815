"""`bincounter train`: fine-tune a ResNet to count the items in bin photos, on one process or many (DDP).

The one training entrypoint. Started directly for one process, by ``torchrun``
on a laptop, and by a PyTorchJob or TrainJob on a cluster; ``bincounter.distributed``
reads whichever env contract the launcher set. Examples::

    bincounter train --data runs/split --output runs/model --arch resnet18 --epochs 5
    torchrun --nproc-per-node 2 -m bincounter.train --data runs/split --output runs/model

Each epoch rank 0 prints one ``name=value`` line that Katib's StdOut collector parses::

    epoch=3 train-loss=0.9100 val-loss=1.0200 val-accuracy=0.5500 val-rmse=0.9300 ...

Data: each rank reads its share of the train shards and each DataLoader worker a
share of that (``distributed.partition``), so an epoch sees every training sample
exactly once. Ranks can end up with different numbers of batches (shards hold
different sample counts); ``train_one_epoch`` keeps them in step without dropping
or repeating a sample (see its docstring), so DDP never waits on a rank that is done.
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
from torch.utils.data import DataLoader

from bincounter import distributed as dist_utils
from bincounter import model as model_lib
from bincounter import calibration, presets, storage
from bincounter.data import shards
from bincounter.data.loader import ShardDataset, count_samples, make_loader
from bincounter.evaluate import metrics_from_confusion

log = logging.getLogger("bincounter.train")

CHECKPOINT_FILE = "checkpoint.pt"
OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass
class TrainConfig:
    """Every training setting, with its default (the CLI flags are built from these fields)."""

    data: str = ""  # split folder or s3:// prefix written by `bincounter split`
    output: str = ""  # model folder or s3:// prefix (written by rank 0 at the end)
    arch: str = "resnet50"
    pretrained: str = ""  # local path / s3:// URI of an ImageNet state_dict, or "imagenet" (download)
    max_count: int = 5  # classes 0..K, the standard ABID counting task
    k_or_more: bool = False  # map counts above K to class K instead of dropping them
    epochs: int = 10
    batch_size: int = 32  # PER RANK; the global batch is batch_size * world size
    lr: float = 1e-3  # for the global batch above; see docs/training.md for scaling
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # applied to conv/linear weights, not to norms and biases
    dropout: float = 0.0  # before the counting head
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to 0 at the last epoch
    input_size: int = 224
    resize_size: int = 0  # resize the whole image to this square, then crop input_size (0: = input_size)
    workers: int = 4  # DataLoader worker processes per rank
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
        if self.arch not in model_lib.ARCHITECTURES:
            raise ValueError(f"Invalid arch {self.arch!r}. Only {', '.join(model_lib.ARCHITECTURES)} are supported.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer {self.optimizer!r}. Only {', '.join(OPTIMIZERS)} are supported.")
        for name in ("epochs", "batch_size", "max_count", "print_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("dropout and label_smoothing must be in [0, 1)")
        self.resize_size = self.resize_size or self.input_size
        if self.input_size < 64 or self.resize_size < self.input_size:
            # Below 64 px ResNet's last feature map is 1x1 and a batch of one breaks BatchNorm.
            raise ValueError(f"Need 64 <= input_size <= resize_size, got {self.input_size} and {self.resize_size}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown training options {unknown}. Known: {sorted(known)}")
        return cls(**kwargs)


# ---------------------------------------------------------------- model, optimiser, schedule

def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases (as torchvision's --norm-weight-decay 0 and timm do).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(progress: float, warmup_epochs: float, epochs: int) -> float:
    """Learning-rate multiplier at ``progress`` epochs into training: linear warmup, then cosine to 0.

    A pure function of progress, so a resumed run gets the same schedule without scheduler state.
    """
    if progress < warmup_epochs:
        return (progress + 1e-3) / warmup_epochs
    t = (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 (with a grad scaler) on older ones, fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- the loop

def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, epoch: int, cfg: TrainConfig,
                    steps_per_epoch: int | None, profiler=None) -> dict[str, float]:
    """One pass over this rank's share of the training data. Returns the epoch's metrics, over all ranks.

    Ranks may hold different numbers of samples. Every step the ranks agree (one tiny all-reduce)
    on how many samples the step has in all; a rank that has run out steps along on its last batch
    with weight 0, so all ranks make the same optimizer steps, and each step's gradient is the mean
    over the step's real samples whatever the batch sizes (the loss is a sum / global count, times
    the world size that DDP divides by). The loop ends when no rank has data left.
    """
    model.train()
    amp_dtype = amp_dtype_for(device)
    world = dist_utils.get_world_size()
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    batches, last, step = iter(loader), None, 0
    while True:
        batch = next(batches, None)
        n_local = 0 if batch is None else len(batch[1])
        n_step = dist_utils.reduce_sums({"n": n_local}, device)["n"]
        if n_step == 0:
            break
        step += 1
        if batch is None and last is None:  # this rank got no sample at all this epoch
            last = (torch.zeros(2, 3, cfg.input_size, cfg.input_size), torch.zeros(2, dtype=torch.int64))
        images, targets = batch if batch is not None else last
        last = (images, targets)
        progress = epoch + (min((step - 1) / steps_per_epoch, 0.999) if steps_per_epoch else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(progress, cfg.warmup_epochs, cfg.epochs)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_local = criterion(model(images), targets)  # summed over this rank's samples
        loss_value = loss_local.item() / max(n_local, 1)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"Loss is {loss_value} at epoch {epoch + 1}, step {step} (rank {dist_utils.get_rank()}); "
                f"stopping. Lower --lr (now {cfg.lr}) or check the data.")
        weight = world / n_step if n_local else 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss_local * weight).backward()
        scaler.step(optimizer)
        scaler.update()
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
    return {"train-loss": sums["loss"] / sums["n"], "train-samples": int(sums["n"]),
            "images-per-s": sums["n"] / (sums["seconds"] / world), "lr": optimizer.param_groups[0]["lr"]}


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             class_names: list[str]) -> dict[str, Any]:
    """Loss and counting metrics on this rank's share of a split, reduced over ranks.

    Runs the bare model (not the DDP wrapper): ranks may hold different numbers
    of batches and the loop needs no collectives; only the sums are reduced.
    """
    model.eval()
    amp_dtype = amp_dtype_for(device)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        # Plain cross-entropy (no label smoothing), so val-loss compares across settings.
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        cm += torch.bincount(targets * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    dist_utils.all_reduce_sum(cm)
    dist_utils.all_reduce_sum(loss_sum)
    metrics = metrics_from_confusion(cm.view(num_classes, num_classes).long().cpu().numpy(), class_names)
    metrics["loss"] = loss_sum.item() / metrics["samples"]
    return metrics


def metric_line(epoch: int, row: dict[str, float]) -> str:
    """The Katib StdOut line: ``epoch=3 train-loss=0.9100 val-loss=... val-accuracy=... val-rmse=...``."""
    keys = ("train-loss", "val-loss", "val-accuracy", "val-rmse", "val-mae", "val-within1")
    return f"epoch={epoch} " + " ".join(f"{k}={row[k]:.4f}" for k in keys) + f" lr={row['lr']:.4g}"


def save_checkpoint(uri: str, model: nn.Module, optimizer, scaler, epoch: int, cfg: TrainConfig,
                    history: list[dict]) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "config": dataclasses.asdict(cfg), "history": history}, buf)
    storage.write_bytes(uri, buf.getvalue())  # atomic: a crash mid-write keeps the previous checkpoint


def load_checkpoint(uri: str, cfg: TrainConfig) -> dict:
    ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    for key in ("arch", "max_count", "k_or_more", "epochs"):
        if ckpt["config"][key] != getattr(cfg, key):
            raise ValueError(f"Checkpoint {uri} was made with {key}={ckpt['config'][key]!r}, this run has "
                             f"{getattr(cfg, key)!r}. Use the same setting, or another --checkpoint-dir.")
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
    checkpoint_uri = storage.join(cfg.checkpoint_dir or default_checkpoint_dir(cfg.output), CHECKPOINT_FILE)
    model_cfg = model_lib.ModelConfig(arch=cfg.arch, max_count=cfg.max_count, k_or_more=cfg.k_or_more,
                                      input_size=cfg.input_size, resize_size=cfg.resize_size, dropout=cfg.dropout,
                                      train_args=dataclasses.asdict(cfg))
    log.info("launcher=%s rank=%d/%d local_rank=%d device=%s pid=%d restart=%d", env.launcher, env.rank,
             env.world_size, env.local_rank, device, os.getpid(), env.restart_count)
    if main_process:
        log.info("batch size %d per rank x %d ranks = global batch %d; lr %g", cfg.batch_size, env.world_size,
                 cfg.batch_size * env.world_size, cfg.lr)

    # Data: this rank's share of each split.
    manifest = shards.read_manifest(cfg.data)
    train_set = ShardDataset(shards.shard_uris(cfg.data, "train"),
                             presets.train_transform(cfg.input_size, model_cfg.mean, model_cfg.std, cfg.resize_size),
                             cfg.max_count, cfg.k_or_more, env.rank, env.world_size, cfg.shuffle_buffer, cfg.seed)
    val_set = ShardDataset(shards.shard_uris(cfg.data, cfg.val_split),
                           presets.eval_transform(cfg.input_size, cfg.resize_size, model_cfg.mean, model_cfg.std),
                           cfg.max_count, cfg.k_or_more, env.rank, env.world_size)
    train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, device)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, device)
    n_train = count_samples(manifest, "train", cfg.max_count, cfg.k_or_more)
    steps_per_epoch = math.ceil(n_train / env.world_size / cfg.batch_size) if n_train else None

    # Model and optimiser, then the checkpoint if this run continues one.
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = model_lib.build_model(cfg.arch, model_cfg.num_classes, cfg.dropout, cfg.pretrained or None).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype_for(device) == torch.float16)
    start_epoch, history = 0, []
    # torchrun --max-restarts restarts the whole worker group: pick up where it stopped.
    # Rank 0 decides, so that all ranks start from the same epoch.
    resume = dist_utils.broadcast_object((cfg.resume or env.restart_count > 0) and storage.exists(checkpoint_uri))
    if resume:
        if not storage.exists(checkpoint_uri):
            raise FileNotFoundError(f"Rank {env.rank} cannot see {checkpoint_uri}, which rank 0 resumes from. "
                                    "Put --checkpoint-dir on storage every node sees (s3:// or a shared volume).")
        ckpt = load_checkpoint(checkpoint_uri, cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log.info("resumed from %s after epoch %d", checkpoint_uri, start_epoch)
    elif cfg.resume:
        log.info("--resume: no checkpoint at %s yet, starting from scratch", checkpoint_uri)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")

    writer = tb_dir = None
    if main_process:
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = _LocalMirror(cfg.tensorboard_dir or storage.join(cfg.output, "tensorboard"))
        writer = SummaryWriter(tb_dir.path, purge_step=start_epoch + 1)
    metrics_uri = cfg.metrics_file or storage.join(cfg.output, "metrics.json")

    for epoch in range(start_epoch, cfg.epochs):
        seed_all(cfg.seed, epoch, env.rank)
        train_set.set_epoch(epoch)
        with _maybe_profile(cfg, epoch == start_epoch, env.rank) as profiler:
            row = train_one_epoch(ddp_model, train_loader, criterion, optimizer, scaler, device, epoch, cfg,
                                  steps_per_epoch, profiler)
        dist_utils.broadcast_buffers(model)  # BatchNorm statistics of rank 0 (the checkpointed ones) everywhere
        val = validate(model, val_loader, device, model_cfg.num_classes, model_cfg.class_names)
        row.update({f"val-{k}": val[k] for k in ("loss", "accuracy", "rmse", "mae", "within1", "macro_f1")})
        row["epoch"] = epoch + 1
        history.append(row)
        if main_process:
            save_checkpoint(checkpoint_uri, model, optimizer, scaler, epoch + 1, cfg, history)
            storage.write_bytes(metrics_uri, json.dumps({"epochs": history, "final": row}, indent=2).encode())
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
            tb_dir.sync()
            print(metric_line(epoch + 1, row), flush=True)

    final = dict(history[-1]) if history else {}
    calibration.fit_into(model_cfg, model, val_loader, device, cfg.val_split)  # every rank: it gathers logits
    if main_process:
        writer.close()
        tb_dir.sync()
        model_cfg.metrics = final
        model_lib.save_model_dir(model, model_cfg, cfg.output)
        log.info("model folder written to %s", cfg.output)
    dist_utils.barrier()  # no rank returns before the model folder exists
    return final


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
        if kw.get("action") != "store_true":
            kw.setdefault("type", type(d[field].default))
        p.add_argument(name, default=d[field].default, help=help, **kw)

    p.add_argument("--data", required=True, help="split folder or s3:// prefix written by `bincounter split`")
    p.add_argument("--output", required=True, help="model folder or s3:// prefix to write (rank 0 writes it)")
    add("--arch", "network", choices=model_lib.ARCHITECTURES)
    add("--pretrained", "ImageNet weights: a local path or s3:// URI of a torchvision state_dict, "
                        "or 'imagenet' to download them; empty trains from scratch")
    add("--max-count", "K: classes are counts 0..K")
    add("--k-or-more", "map counts above K to class K ('K or more') instead of dropping them", action="store_true")
    add("--epochs", "epochs to train")
    add("--batch-size", "images per step PER RANK (global batch = batch size x world size)")
    add("--lr", "peak learning rate (after warmup)")
    add("--optimizer", "optimizer", choices=OPTIMIZERS)
    add("--momentum", "SGD momentum (Nesterov)")
    add("--weight-decay", "weight decay on conv and linear weights")
    add("--dropout", "dropout before the counting head")
    add("--label-smoothing", "label smoothing of the training loss")
    add("--warmup-epochs", "epochs of linear warmup before the cosine decay")
    add("--input-size", "training and eval crop size in pixels")
    add("--resize-size", "resize whole images to this square, then crop --input-size (random crop in "
                         "training, centre crop in eval); 0 means --input-size, no crop")
    add("--workers", "DataLoader worker processes per rank")
    add("--shuffle-buffer", "samples per worker in the shuffle buffer (0: no shuffling)")
    add("--seed", "random seed (data order, augmentation, initialisation)")
    add("--device", "where to train: auto picks cuda:LOCAL_RANK when a GPU is visible", choices=("auto", "cpu", "cuda"))
    add("--resume", "continue from the checkpoint in --checkpoint-dir if there is one (safe to always pass); "
                    "under torchrun restarts this happens anyway", action="store_true")
    add("--checkpoint-dir", "folder or s3:// prefix for checkpoint.pt (empty: <output>-checkpoints, beside the model folder)")
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
    sys.exit(main(get_args_parser().parse_args()))
