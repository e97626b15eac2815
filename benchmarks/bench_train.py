"""Training throughput: this project's loop against a plain PyTorch loop, and AMP against FP32 on a GPU.

Three measurements, each images/s over timed steps after warm-up steps:

1. ``plain``: the textbook loop (forward, cross-entropy, zero_grad, backward, step) on
   batches already in memory;
2. ``bincounter``: ``bincounter.train.train_one_epoch`` on the same batches and model
   (its extra work: per-step learning-rate schedule, the per-step sample-count all-reduce,
   the NaN check's ``loss.item()``); the ratio plain / bincounter is the loop's overhead;
3. ``bincounter+data``: the same loop fed by the real data path (``ShardDataset`` over
   WebDataset shards, JPEG decode and augmentation in DataLoader workers).

On a GPU, ``plain`` runs twice more: FP32 and bf16 autocast + channels_last.

    python benchmarks/bench_train.py --arch resnet50 --input-size 224 --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch
from torch import nn

from bincounter import model as model_lib
from bincounter import train as tr


def make_batches(n: int, batch_size: int, input_size: int, num_classes: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, input_size, input_size, generator=g),
             torch.randint(0, num_classes, (batch_size,), generator=g)) for _ in range(n)]


def plain_loop(model, batches, device, amp: bool = False, channels_last: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == 2:  # two warm-up steps
            _sync(device)
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def bincounter_loop(model, batches, device, cfg: tr.TrainConfig) -> float:
    opt = tr.make_optimizer(model, cfg, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=tr.amp_dtype_for(device) == torch.float16)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    tr.train_one_epoch(model, batches[:2], criterion, opt, scaler, device, 0, cfg, len(batches), cfg.lr)  # warm-up
    _sync(device)
    start = time.perf_counter()
    row = tr.train_one_epoch(model, batches[2:], criterion, opt, scaler, device, 0, cfg, len(batches), cfg.lr)
    _sync(device)
    return row["train-samples"] / (time.perf_counter() - start)


def data_loop(model, split_root: str, device, cfg: tr.TrainConfig, steps: int) -> float:
    """train_one_epoch over real shards through DataLoader workers (decode + augmentation included)."""
    from bincounter import presets
    from bincounter.data import loader, shards

    ds = loader.ShardDataset(shards.shard_uris(split_root, "train"),
                         presets.train_transform(cfg.input_size, model_lib.IMAGENET_MEAN, model_lib.IMAGENET_STD),
                         max_count=cfg.max_count, shuffle_buffer=cfg.shuffle_buffer)
    loader = loader.make_loader(ds, cfg.batch_size, cfg.workers, device)

    class Limited:  # the first `steps` batches of each pass
        def __iter__(self):
            for i, b in enumerate(loader):
                if i >= steps:
                    break
                yield b

    opt = tr.make_optimizer(model, cfg, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=tr.amp_dtype_for(device) == torch.float16)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    tr.train_one_epoch(model, Limited(), criterion, opt, scaler, device, 0, cfg, steps, cfg.lr)  # workers start, warm-up
    _sync(device)
    start = time.perf_counter()
    row = tr.train_one_epoch(model, Limited(), criterion, opt, scaler, device, 0, cfg, steps, cfg.lr)
    _sync(device)
    seconds = time.perf_counter() - start
    # Stop the persistent workers now, not in a later fork that inherits this loader.
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()
    return row["train-samples"] / seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_model(arch: str, device, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = model_lib.build_model(arch, 6).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=model_lib.ARCHITECTURES)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement (plus 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per variant; the median is reported")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data", default="", help="split folder for the bincounter+data measurement "
                                              "(default: synthesise 320 bins into a temp folder)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--output", default="", help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cfg = tr.TrainConfig(data="-", output="-", arch=args.arch, input_size=args.input_size,
                         batch_size=args.batch_size, lr=1e-4, workers=args.workers, print_freq=10 ** 9,
                         epochs=2, warmup_epochs=0)
    batches = make_batches(args.steps + 2, args.batch_size, args.input_size, 6)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731

    results = {"device": str(device), "arch": args.arch, "input_size": args.input_size,
               "batch_size": args.batch_size, "steps": args.steps, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    plain, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        plain.append(plain_loop(fresh_model(args.arch, device, device.type == "cuda"), batches, device,
                                amp=device.type == "cuda", channels_last=device.type == "cuda"))
        ours.append(bincounter_loop(fresh_model(args.arch, device, device.type == "cuda"), batches, device, cfg))
    results["plain_images_per_s"] = median(plain)
    results["bincounter_images_per_s"] = median(ours)
    results["overhead_ratio"] = median(plain) / median(ours)

    data = args.data
    if not data:
        from bincounter.data.split import split
        from bincounter.data.synth import synthesize

        tmp = tempfile.mkdtemp(prefix="bench-train-")
        synthesize(f"{tmp}/abid", images=320, max_count=5, seed=0)
        split(f"{tmp}/abid", out=f"{tmp}/split", val=0.05, test=0.05, seed=0, short_side=max(args.input_size, 96),
              shard_size=64)
        data = f"{tmp}/split"
    results["bincounter_with_data_images_per_s"] = median(
        [data_loop(fresh_model(args.arch, device, device.type == "cuda"), data, device, cfg, args.steps)
         for _ in range(args.repeats)])

    if device.type == "cuda":
        fp32 = median([plain_loop(fresh_model(args.arch, device), batches, device) for _ in range(args.repeats)])
        amp = median([plain_loop(fresh_model(args.arch, device, True), batches, device, amp=True, channels_last=True)
                      for _ in range(args.repeats)])
        results.update(gpu_fp32_images_per_s=fp32, gpu_amp_channels_last_images_per_s=amp, amp_speedup=amp / fp32)

    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
