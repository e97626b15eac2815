"""Serving benchmark: the model server against the bare model on the same machine.

Two parts, printed as Markdown (docs/benchmarks/serving.md holds a run):

1. runtimes: the bare forward pass (no decoding) with eager PyTorch, TorchScript
   (trace + freeze) and, with ``--compile``, torch.compile; batch 1 and 8, interleaved
   so background load hits every runtime alike.
2. server: ``bincounter serve`` as a subprocess, one real ABID JPEG per request, at each
   ``--concurrency``: p50/p99 latency and throughput, next to the bare ``Counter.predict``
   (decode + transform + forward, no HTTP) for the same image. At concurrency 1 bare calls and
   server requests alternate; the overhead ratio is server p50 / bare p50 there, and bare
   throughput / server throughput above it.

    python benchmarks/bench_serving.py --torch-threads 1 --compile   # docs/benchmarks/serving.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import torch

from bincounter.model import ARCHITECTURES, ModelConfig, build_model, load_model_dir, save_model_dir
from bincounter.serving.inference import RUNTIMES, Counter

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def bench_runtimes(model_dir: str, input_size: int, repeats: int, with_compile: bool) -> list[str]:
    model, config = load_model_dir(model_dir)
    runners = {name: Counter(model, config, runtime=name).forward for name in RUNTIMES}
    if with_compile:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(model)
        runners["torch.compile"] = lambda x: torch.softmax(compiled(x), dim=1)
    lines = ["| runtime | batch | p50 ms | ms / image | first call s |", "|---|---|---|---|---|"]
    for batch_size in (1, 8):
        x = torch.randn(batch_size, 3, input_size, input_size)
        times: dict[str, list[float]] = {name: [] for name in runners}
        first: dict[str, float] = {}
        with torch.inference_mode():
            for name, run in runners.items():  # warm-up (torch.compile compiles here)
                t = time.perf_counter()
                run(x)
                first[name] = time.perf_counter() - t
                run(x)
            for _ in range(repeats):
                for name, run in runners.items():
                    t = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            p50 = statistics.median(ts) * 1000
            lines.append(f"| {name} | {batch_size} | {p50:.1f} | {p50 / batch_size:.1f} | {first[name]:.1f} |")
    return lines


def time_paired(counter: Counter, url: str, body: dict, image: bytes, requests: int) -> tuple[list, list, int]:
    """Concurrency 1: a bare call and a server request alternate, so both see the same load."""
    bare, served, errors = [], [], 0
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(requests):
            t = time.perf_counter()
            counter.predict([image])
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            errors += client.post("/v1/models/bincounter:predict", json=body).status_code != 200
            served.append(time.perf_counter() - t)
    return bare, served, errors


async def time_server(url: str, body: dict, concurrency: int, requests: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            nonlocal errors
            for _ in queue:
                t = time.perf_counter()
                r = await client.post("/v1/models/bincounter:predict", json=body)
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 200
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start, errors


def bench_interleaved(counter: Counter, url: str, image: bytes, concurrency: list[int], requests: int,
                      rounds: int) -> dict:
    """Rounds of: bare/server pairs at concurrency 1, then a block per higher concurrency.

    Load from other processes changes over minutes; spreading every mode over the whole run
    makes it hit all modes alike.
    """
    body = {"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]}
    counter.predict([image])  # warm-up, both sides
    httpx.post(f"{url}/v1/models/bincounter:predict", json=body, timeout=300)
    modes = ["bare"] + concurrency
    stats = {m: {"latencies": [], "elapsed": 0.0, "errors": 0} for m in modes}

    def add(mode, latencies, elapsed, errors=0):
        stats[mode]["latencies"] += latencies
        stats[mode]["elapsed"] += elapsed
        stats[mode]["errors"] += errors

    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        if 1 in concurrency:
            bare, served, errors = time_paired(counter, url, body, image, per_round)
            add("bare", bare, sum(bare))
            add(1, served, sum(served), errors)
        else:
            bare, _, _ = time_paired(counter, url, body, image, max(1, per_round // 4))
            add("bare", bare, sum(bare))
        for c in concurrency:
            if c > 1:
                add(c, *asyncio.run(time_server(url, body, c, max(per_round, c))))
    return stats


def start_server(model_dir: str, runtime: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bincounter.cli", "serve", "--model", model_dir, "--port", str(port),
           "--runtime", runtime, "--torch-threads", str(threads), "--enable_latency_logging", "false"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become ready; log: {log.read_text()[-2000:]}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, type=str, help="model folder; default: a random one of --arch")
    parser.add_argument("--arch", default="resnet50", choices=ARCHITECTURES, help="architecture of the random model")
    parser.add_argument("--input-size", default=224, type=int, help="input size of the random model")
    parser.add_argument("--image", default=str(REPO / "tests/data/abid-sample/00010.jpg"), type=str,
                        help="JPEG sent in every request (616x586 ABID photo)")
    parser.add_argument("--runtime", default="torchscript", choices=RUNTIMES, help="server runtime")
    parser.add_argument("--concurrency", default=[1, 8, 32], type=int, nargs="+", help="client concurrency levels")
    parser.add_argument("--requests", default=64, type=int, help="server requests per concurrency level")
    parser.add_argument("--rounds", default=4, type=int, help="interleaved rounds the requests are spread over")
    parser.add_argument("--repeats", default=10, type=int, help="timed repeats per runtime and batch size")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles for ~1 min)")
    parser.add_argument("--skip-runtimes", action="store_true", help="only the server part")
    parser.add_argument("--torch-threads", default=0, type=int,
                        help="torch threads, here and in the server; 0: torch's default (one per core). "
                             "1 gives stable figures on a machine shared with other work")
    return parser


def main(args: argparse.Namespace) -> int:
    image_path = Path(args.image)
    if not image_path.is_file():
        image_path = Path("/work/shared/abid-sample") / image_path.name
    image = image_path.read_bytes()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = os.path.join(tmp, "model")
            config = ModelConfig(arch=args.arch, input_size=args.input_size,
                                 resize_size=round(args.input_size * 256 / 224))
            save_model_dir(build_model(args.arch, config.num_classes), config, model_dir)
        model, config = load_model_dir(model_dir)
        print(f"# {config.arch} at {config.input_size} px, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
        if not args.skip_runtimes:
            print("\n".join(bench_runtimes(model_dir, config.input_size, args.repeats, args.compile)) + "\n")

        counter = Counter(model, config, runtime=args.runtime)
        proc, url = start_server(model_dir, args.runtime, args.torch_threads, Path(tmp) / "server.log")
        try:
            stats = bench_interleaved(counter, url, image, args.concurrency, args.requests, args.rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"server runtime {args.runtime}, one {image_path.name} ({len(image)} bytes) per request; "
          f"{args.rounds} interleaved rounds; load average after: {os.getloadavg()[0]:.1f}\n")
    print("| | concurrency | requests | p50 ms | p99 ms | req/s | errors | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    bare = stats.pop("bare")
    bare_p50, bare_rps = percentile(bare["latencies"], 50), len(bare["latencies"]) / bare["elapsed"]
    for name, c, st in [("bare Counter.predict", 1, bare)] + [("server V1", c, st) for c, st in stats.items()]:
        p50, p99 = percentile(st["latencies"], 50), percentile(st["latencies"], 99)
        rps = len(st["latencies"]) / st["elapsed"]
        overhead = p50 / bare_p50 if c == 1 else bare_rps / rps
        print(f"| {name} | {c} | {len(st['latencies'])} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | {rps:.2f} | "
              f"{st['errors']} | {overhead:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
