"""GPU benchmark of the recipe: train img/s per GPU, data-loader img/s per CPU core, DDP scaling.

Measured in one run, each as images/s over timed steps after warm-up, repeats interleaved
(variant A, B, C, A, B, C, ...) so that drifting clocks or a noisy neighbour hit all alike;
median and min of the repeats are reported, with ratios against the named baseline (fp32):

1. train img/s per GPU, the recipe's network at the recipe's size (ResNet-50, 384 px, batch 64
   per GPU, AdamW): ``fp32`` (baseline), ``bf16`` (autocast), ``bf16+cl`` (channels_last),
   ``bf16+cl+compile`` (``torch.compile``);
2. data-loader img/s per CPU core: ``ShardDataset`` over synthetic shards stored at the recipe's
   short side (512), JPEG decode and the training transform in 1, 2, 4 ... DataLoader workers,
   divided by the workers (one core each), so you can size the CPUs a GPU needs;
3. DDP scaling 1 -> N GPUs of this node (N = all visible, when more than one): the training
   step (bf16+cl) under DistributedDataParallel (nccl), img/s in all and efficiency.

Writes ``docs/benchmarks/gpu.md`` (``--output``) and prints JSON. Budget: about 5-8 minutes on
one GPU (most of it ``torch.compile``). ``--smoke`` runs every code path tiny on the CPU
(ResNet-18, 64 px, a few steps, no compile) to check the script, not to measure::

    python benchmarks/bench_gpu.py                      # on a GPU machine
    python benchmarks/bench_gpu.py --smoke --output /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bincounter import model as model_lib
from bincounter import presets

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "gpu.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(arch: str, batch: int, size: int, device: torch.device, bf16: bool, channels_last: bool,
              compile_: bool):
    """A closure running one training step (forward, loss, backward, AdamW) on a fixed batch."""
    torch.manual_seed(0)
    net = model_lib.build_model(arch, 6).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = torch.bfloat16 if bf16 else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=bf16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_steps(step, steps: int, batch: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t)


def bench_train(args, device: torch.device) -> dict:
    variants = {"fp32": (False, False, False), "bf16": (True, False, False), "bf16+cl": (True, True, False)}
    if args.compile:
        variants["bf16+cl+compile"] = (True, True, True)
    steps = {}
    for name, (bf16, cl, comp) in variants.items():
        steps[name] = make_step(args.arch, args.batch_size, args.input_size, device, bf16, cl, comp)
        for _ in range(args.warmup):  # compiles, autotunes, fills the caching allocator
            steps[name]()
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in steps.items():
            runs[name].append(time_steps(step, args.steps, args.batch_size, device))
    base = statistics.median(runs["fp32"])
    return {name: {"median": statistics.median(r), "min": min(r), "vs_fp32": statistics.median(r) / base}
            for name, r in runs.items()}


def bench_loader(args) -> dict:
    from bincounter.data.loader import ShardDataset
    from bincounter.data.split import split
    from bincounter.data.synth import synthesize

    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    synthesize(f"{tmp}/abid", images=args.loader_images, max_count=5, seed=0)
    split(f"{tmp}/abid", out=f"{tmp}/split", val=0.0, test=0.0, seed=0, short_side=args.short_side,
          shard_size=max(1, args.loader_images // 16))
    from bincounter.data import shards

    uris = shards.shard_uris(f"{tmp}/split", "train")
    transform = presets.train_transform(args.input_size, model_lib.IMAGENET_MEAN, model_lib.IMAGENET_STD)
    out = {}
    for workers in args.loader_workers:
        ds = ShardDataset(uris, transform, max_count=5, k_or_more=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers)
        rates = []
        for _ in range(args.repeats):
            t, n = time.perf_counter(), 0
            for images, _ in loader:
                n += len(images)
            rates.append(n / (time.perf_counter() - t))
        out[str(workers)] = {"img_per_s": statistics.median(rates), "per_core": statistics.median(rates) / max(workers, 1)}
    return out


def _ddp_worker(rank: int, world: int, port: int, args, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = model_lib.build_model(args.arch, 6).to(device).to(memory_format=torch.channels_last)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[rank] if cuda else None)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 6, (args.batch_size,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for _ in range(args.warmup):
            step()
        rates = []
        for _ in range(args.repeats):
            dist.barrier()
            rates.append(time_steps(step, args.steps, args.batch_size, device) * world)
        if rank == 0:
            results[world] = statistics.median(rates)
    finally:
        dist.destroy_process_group()


def bench_ddp(args) -> dict:
    import torch.multiprocessing as mp

    n = torch.cuda.device_count() if torch.cuda.is_available() else (2 if args.smoke else 0)
    if n < 2:
        return {}
    out = {}
    with mp.Manager() as manager:
        results = manager.dict()
        for world in sorted({1, *[w for w in (2, 4, 8) if w <= n], n}):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_ddp_worker, args=(world, port, args, results), nprocs=world, join=True)
        base = results[1]
        out = {str(w): {"img_per_s": r, "efficiency": r / (w * base)} for w, r in sorted(results.items())}
    return out


def render(results: dict) -> str:
    r = results
    lines = ["# GPU benchmark (benchmarks/bench_gpu.py)", "",
             f"Device: {r['device']}; torch {r['torch']}; {r['arch']} at {r['input_size']} px, batch {r['batch_size']}"
             f" per GPU; {r['steps']} timed steps x {r['repeats']} interleaved repeats after {r['warmup']} warm-up"
             f" steps; {r['cpu_cores']} CPU cores.{' SMOKE RUN: tiny sizes on the CPU, not a measurement.' if r['smoke'] else ''}",
             "", "## Train img/s per GPU (baseline: fp32)", "",
             "| variant | median img/s | min img/s | x fp32 |", "|---|---|---|---|"]
    for name, v in r["train"].items():
        lines.append(f"| {name} | {v['median']:.1f} | {v['min']:.1f} | {v['vs_fp32']:.2f} |")
    lines += ["", f"## Data loader img/s per CPU core (ShardDataset, short side {r['short_side']}, training transform)",
              "", "| workers | img/s | img/s per core |", "|---|---|---|"]
    for w, v in r["loader"].items():
        lines.append(f"| {w} | {v['img_per_s']:.1f} | {v['per_core']:.1f} |")
    lines += ["", "## DDP scaling on one node (bf16 + channels_last, nccl)", ""]
    if r["ddp"]:
        lines += ["| GPUs | img/s in all | efficiency |", "|---|---|---|"]
        for w, v in r["ddp"].items():
            lines.append(f"| {w} | {v['img_per_s']:.1f} | {v['efficiency']:.2f} |")
    else:
        lines.append("One GPU visible: no scaling measured.")
    lines += ["", "Command: `python benchmarks/bench_gpu.py " + " ".join(r["argv"]) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=model_lib.ARCHITECTURES)
    p.add_argument("--input-size", type=int, default=presets.INPUT_SIZE)
    p.add_argument("--short-side", type=int, default=presets.SHORT_SIDE)
    p.add_argument("--batch-size", type=int, default=64, help="images per GPU per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (compile, autotune)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loader-images", type=int, default=512)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (checks the script only)")
    p.add_argument("--output", default=str(DOC), help="Markdown file to write")
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    if args.smoke:
        args.arch, args.input_size, args.short_side, args.batch_size = "resnet18", 64, 80, 4
        args.steps, args.warmup, args.repeats, args.loader_images, args.loader_workers = 2, 1, 1, 32, [0, 1]
        args.compile = False
    elif not torch.cuda.is_available():
        p.error("no CUDA GPU visible; run with --smoke to check the script on a CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "arch": args.arch, "input_size": args.input_size,
               "short_side": args.short_side, "batch_size": args.batch_size, "steps": args.steps,
               "warmup": args.warmup, "repeats": args.repeats, "cpu_cores": os.cpu_count(), "smoke": args.smoke,
               "argv": raw}
    results["train"] = bench_train(args, device)
    results["loader"] = bench_loader(args)
    results["ddp"] = bench_ddp(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(render(results))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
