"""Serving benchmark: the model server against the bare model on the same machine.

Two parts, printed as Markdown (docs/benchmarks/serving.md holds a run):

1. runtimes: the bare forward pass (no decoding) with eager PyTorch, TorchScript
   (trace + freeze), ONNX Runtime and, with ``--compile``, torch.compile; batch 1 and 8, interleaved
   so background load hits every runtime alike.
2. servers: ``bincounter serve`` as subprocesses, one per ``--servers`` configuration (runtime,
   and cross-request batching), all up at once; one real ABID JPEG per request, at each
   ``--concurrency``, in interleaved blocks: p50/p99 latency and throughput, with ratios against
   the first configuration (the baseline: TorchScript unbatched, the server before ONNX Runtime).

    python benchmarks/bench_serving.py --torch-threads 1   # docs/benchmarks/serving.md
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


def bench_interleaved(urls: dict[str, str], image: bytes, concurrency: list[int], requests: int,
                      rounds: int) -> dict:
    """Rounds of: for each concurrency, a block on every server in turn.

    Load from other processes changes over minutes; spreading every server and level over the
    whole run makes it hit all of them alike.
    """
    body = {"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]}
    for url in urls.values():  # warm-up
        for _ in range(3):
            httpx.post(f"{url}/v1/models/bincounter:predict", json=body, timeout=300)
    stats = {(name, c): {"latencies": [], "elapsed": 0.0, "errors": 0} for name in urls for c in concurrency}
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        for c in concurrency:
            for name, url in urls.items():
                latencies, elapsed, errors = asyncio.run(time_server(url, body, c, max(per_round, c)))
                st = stats[(name, c)]
                st["latencies"] += latencies
                st["elapsed"] += elapsed
                st["errors"] += errors
    return stats


def server_flags(config: str) -> list[str]:
    """``RUNTIME`` or ``RUNTIME+batchN`` (cross-request batching up to N images, 5 ms wait)."""
    runtime, _, batching = config.partition("+batch")
    if runtime not in RUNTIMES or (batching and not batching.isdigit()):
        raise ValueError(f"Invalid server {config!r}: RUNTIME or RUNTIME+batchN, RUNTIME one of {', '.join(RUNTIMES)}")
    return ["--runtime", runtime] + (["--batching-max-size", batching, "--batching-max-wait-ms", "5"]
                                     if batching else [])


def start_server(model_dir: str, config: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bincounter.cli", "serve", "--model", model_dir, "--port", str(port),
           *server_flags(config), "--torch-threads", str(threads), "--enable_latency_logging", "false"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server {config} did not become ready; log: {log.read_text()[-2000:]}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, type=str, help="model folder; default: a random one of --arch")
    parser.add_argument("--arch", default="resnet50", choices=ARCHITECTURES, help="architecture of the random model")
    parser.add_argument("--input-size", default=224, type=int, help="input size of the random model")
    parser.add_argument("--image", default=str(REPO / "tests/data/abid-sample/00010.jpg"), type=str,
                        help="JPEG sent in every request (616x586 ABID photo)")
    parser.add_argument("--servers", default=["torchscript", "onnx", "onnx+batch8"], nargs="+",
                        help="server configurations, RUNTIME or RUNTIME+batchN; the first is the baseline")
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

        procs, urls = [], {}
        try:
            for name in args.servers:  # one at a time: each server's start (ONNX export) has the CPUs to itself
                proc, urls[name] = start_server(model_dir, name, args.torch_threads, Path(tmp) / f"{name}.log")
                procs.append(proc)
            stats = bench_interleaved(urls, image, args.concurrency, args.requests, args.rounds)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"one {image_path.name} ({len(image)} bytes) per V1 request; {args.rounds} interleaved rounds; "
          f"load average after: {os.getloadavg()[0]:.1f}; ratios against `{args.servers[0]}` at the same "
          f"concurrency\n")
    print("| server | concurrency | requests | p50 ms | p99 ms | req/s | errors | p50 ratio | req/s ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        base = stats[(args.servers[0], c)]
        base_p50, base_rps = percentile(base["latencies"], 50), len(base["latencies"]) / base["elapsed"]
        for name in args.servers:
            st = stats[(name, c)]
            p50, p99 = percentile(st["latencies"], 50), percentile(st["latencies"], 99)
            rps = len(st["latencies"]) / st["elapsed"]
            print(f"| {name} | {c} | {len(st['latencies'])} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | {rps:.2f} | "
                  f"{st['errors']} | {p50 / base_p50:.2f} | {rps / base_rps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
