"""``bincounter split``: a downloaded ABID folder -> train/val/test WebDataset shards.

Assignment is stratified by count (each class is shuffled with the seed and cut by the
``--val``/``--test`` fractions), deterministic for a seed and disjoint by id; or it comes
from the standard split files (``--val-ids random_val.txt`` or ``counting_val.json`` ...,
see :func:`assign_from_files`). Every image is decoded, resized to ``--short-side`` and
re-encoded as RGB JPEG; an unreadable one is skipped and reported, never written.
``--short-side`` defaults to what the model reads (``presets.short_side_for``), so no
shard stores pixels that training throws away. The re-encoding runs in ``--workers``
processes (default: every CPU this process may use, a container's CPU limit included), each fetching its chunk of images
with a few threads; results are written in assignment order, so the shards are
byte-identical for a seed whatever the number of processes. All
counts are kept (labels are the raw EXPECTED_QUANTITY); training decides what to do with
counts above its ``max_count``. The output follows :mod:`bincounter.data.shards`, plus
``class_distribution.json``, ``class_distribution.png`` and ``samples.png``.
``manifest.json`` is written last, so a reader never sees a manifest naming missing shards.

Why shards: at 536k images, training must read a few hundred large objects sequentially,
not half a million small ones, and decoding 320 px images is several times cheaper than
decoding the originals (see docs/benchmarks/data.md).

Usage::

    from bincounter.data.split import split
    manifest = split("data/abid", out="s3://bucket/splits/v1", val=0.1, test=0.1, seed=0)
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from bincounter import cpus, plots, storage
from bincounter.errors import UsageError
from bincounter.data import abid
from bincounter.data.shards import MANIFEST, SPLITS

FORMAT = "bincounter-shards/1"
CHUNK = 32  # images per task handed to a worker process
READ_THREADS = 8  # concurrent reads per worker process (S3 latency hides behind them)
AHEAD = 4  # chunks queued per worker process


def load_source(source: str, *, endpoint_url: str | None = None) -> tuple[str, abid.ScanResult]:
    """``(dataset_root, records)`` from a downloaded folder (scanned and validated) or its manifest.

    A folder is listed and every metadata file parsed (authoritative, pairs checked). A
    ``manifest.json`` written by ``bincounter download`` is trusted as is, which skips reading
    half a million metadata files at full scale; images are still decoded while sharding.
    """
    if source.endswith(".json"):
        doc = json.loads(storage.read_bytes(source, endpoint_url=endpoint_url))
        if "records" not in doc:
            raise ValueError(f"{source} is not a download manifest (no 'records'). Pass the download folder instead.")
        root = source.rsplit("/", 1)[0] if "/" in source else "."
        result = abid.ScanResult(
            records=[abid.BinRecord(id=str(r["id"]), count=int(r["count"])) for r in doc["records"]],
            skipped=[abid.Skipped(s["id"], s["reason"], s.get("detail", "")) for s in doc.get("skipped", [])])
        return root, result
    return source, abid.scan(source, endpoint_url=endpoint_url)


def _check_fractions(val: float, test: float) -> None:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise UsageError(f"--val and --test must be in [0, 1) with val + test < 1, got {val} and {test}")


def stratified(records: list[abid.BinRecord], fractions: dict[str, float], seed: int, rest: str = "train"
               ) -> dict[str, list[abid.BinRecord]]:
    """Cut each count class by ``fractions`` (e.g. ``{"val": .1, "test": .1}``); the rest goes to ``rest``."""
    by_class: dict[int, list[abid.BinRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.id):  # sorted first: the input order must not matter
        by_class[r.count].append(r)
    out: dict[str, list[abid.BinRecord]] = {rest: [], **{name: [] for name in fractions}}
    for count, recs in sorted(by_class.items()):
        random.Random(f"split:{seed}:{count}").shuffle(recs)
        start = 0
        for name, frac in fractions.items():
            take = min(round(len(recs) * frac), len(recs) - start)
            out[name] += recs[start:start + take]
            start += take
        out[rest] += recs[start:]
    return out


def assign_from_files(records: list[abid.BinRecord], *, train_ids: str | None, val_ids: str | None,
                      test_ids: str | None, test: float, seed: int, endpoint_url: str | None = None
                      ) -> tuple[dict[str, list[abid.BinRecord]], dict]:
    """Assign by the standard split files (any format :func:`abid.read_id_file` reads).

    val and test come from their files; train from its file, or, without one, every other
    record (how ``random_val.txt`` is meant). The standard splits have no test set: without
    ``test_ids``, test is a stratified ``test`` fraction carved from train. Returns the
    assignment and notes: ids listed but not in the source, and labels that disagree with
    the file (the metadata's EXPECTED_QUANTITY is kept as the label).
    """
    by_id = {r.id: r for r in records}
    notes = {"listed_missing": {}, "label_disagreements": 0}
    chosen: dict[str, list[abid.BinRecord]] = {s: [] for s in SPLITS}
    taken: dict[str, str] = {}
    for name, path in (("val", val_ids), ("test", test_ids), ("train", train_ids)):
        if not path:
            continue
        listed = abid.read_id_file(path, endpoint_url=endpoint_url)
        missing = 0
        for id_, count in listed.items():
            if id_ not in by_id:
                missing += 1
                continue
            if id_ in taken:  # files are read val, test, train: an id in val/test and train stays in val/test
                if name != "train":
                    raise ValueError(f"id {id_} is in both the {taken[id_]} and the {name} file; "
                                     "val and test must be disjoint")
                continue
            taken[id_] = name
            rec = by_id[id_]
            if count is not None and count != rec.count:
                notes["label_disagreements"] += 1
            chosen[name].append(rec)
        notes["listed_missing"][name] = missing
    if not train_ids:
        chosen["train"] = [r for r in records if r.id not in taken]
    if not test_ids and test > 0:
        carved = stratified(chosen["train"], {"test": test}, seed)
        chosen["train"], chosen["test"] = carved["train"], carved["test"]
    return chosen, notes


def resize_jpeg(data: bytes, id: str, short_side: int, quality: int = 90) -> bytes:
    """Decode, resize so the short side is ``short_side`` (never upscale), re-encode as RGB JPEG."""
    from PIL import Image

    from bincounter.imaging import open_image

    try:
        # Upright (EXIF orientation), RGB, DCT-downscaled while decoding: the same opening as serving's.
        im = open_image(data, formats=("JPEG",), draft_size=short_side)
        w, h = im.size
        scale = short_side / min(w, h)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            im = im.resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    except Exception as e:
        raise abid.RecordError(id, abid.UNREADABLE_JPEG, f"{type(e).__name__}: {e}") from None


def _read(root: str, id: str, endpoint_url: str | None) -> bytes | abid.Skipped:
    try:
        return storage.read_bytes(abid.image_uri(root, id), endpoint_url=endpoint_url)
    except (FileNotFoundError, OSError) as e:
        return abid.Skipped(id, abid.MISSING_OBJECT, str(e))
    except Exception as e:  # botocore's NoSuchKey and friends
        return abid.Skipped(id, abid.FETCH_FAILED, f"{type(e).__name__}: {e}")


def prepare_chunk(root: str, ids: list[str], short_side: int, endpoint_url: str | None
                  ) -> list[bytes | abid.Skipped]:
    """Read and re-encode a chunk of images (runs in a worker process): JPEG bytes or a Skipped, in order."""
    with ThreadPoolExecutor(min(READ_THREADS, len(ids))) as io_pool:
        raw = list(io_pool.map(lambda i: _read(root, i, endpoint_url), ids))
    out: list[bytes | abid.Skipped] = []
    for id_, data in zip(ids, raw):
        if isinstance(data, abid.Skipped):
            out.append(data)
            continue
        try:
            out.append(resize_jpeg(data, id_, short_side))
        except abid.RecordError as e:
            out.append(abid.Skipped(e.id, e.code, e.detail))
    return out


def _default_short_side() -> int:
    # imported here: presets pulls in torch, which the re-encoding worker processes never need
    from bincounter import presets

    return presets.short_side_for(presets.INPUT_SIZE)


def default_workers() -> int:
    """The CPUs this process may use: its cores, capped by a container's CPU quota (bincounter.cpus)."""
    return cpus.cpu_limit()


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes, forked where the OS can (no re-import, no ``__main__`` guard needed in callers).

    The fork happens before this function starts any thread, and each child drops the boto3
    clients it inherited (their pooled sockets belong to the parent) and makes its own.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=storage.s3_client.cache_clear)


def _prepared(pool: Executor | None, records: list[abid.BinRecord], root: str, short_side: int,
              endpoint_url: str | None, window: int = 1):
    """``(record, jpeg or Skipped)`` in ``records`` order, computed ``CHUNK`` images per task.

    With a pool, ``window`` chunks (``AHEAD`` per process) stay queued across shard boundaries, so no process
    idles while this one writes and uploads a shard; the bound keeps memory flat."""
    chunks = [records[i:i + CHUNK] for i in range(0, len(records), CHUNK)]
    if pool is None:
        for chunk in chunks:
            yield from zip(chunk, prepare_chunk(root, [r.id for r in chunk], short_side, endpoint_url))
        return
    queued: deque = deque()
    for chunk in chunks:
        queued.append((chunk, pool.submit(prepare_chunk, root, [r.id for r in chunk], short_side, endpoint_url)))
        if len(queued) >= window:
            done, fut = queued.popleft()
            yield from zip(done, fut.result())
    while queued:
        done, fut = queued.popleft()
        yield from zip(done, fut.result())


def _write_split(name: str, records: list[abid.BinRecord], *, root: str, out: str, short_side: int,
                 shard_size: int, pool: Executor | None, endpoint_url: str | None, skipped: list[abid.Skipped],
                 samples_for_grid: list, bar, window: int) -> dict:
    import webdataset as wds

    shards, written, per_shard = [], [], []
    prepared = _prepared(pool, records, root, short_side, endpoint_url, window)  # one stream for the whole split
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(records), shard_size):
            rel = f"{name}/shard-{len(shards):06d}.tar"
            local = Path(tmp, "shard.tar")
            n = 0
            with open(local, "wb") as f:
                writer = wds.TarWriter(f, mtime=0.0)  # fixed mtime: same input, same shard bytes
                for rec, res in itertools.islice(prepared, shard_size):  # records[start:start + shard_size]
                    bar.update(1)
                    if isinstance(res, abid.Skipped):
                        skipped.append(res)
                        continue
                    label = json.dumps({"id": rec.id, "count": rec.count}).encode()
                    writer.write({"__key__": rec.id, "jpg": res, "json": label})
                    written.append(rec.count)
                    n += 1
                    if name == "train" and sum(s[1] == rec.count for s in samples_for_grid) < plots.SAMPLES_PER_COUNT:
                        samples_for_grid.append((rec.id, rec.count, res))
                writer.close()
            if n:
                storage.upload_file(local, storage.join(out, rel), endpoint_url=endpoint_url)
                shards.append(rel)
                # Per-shard class counts let training balance ranks by samples kept, not by shard count.
                per_shard.append(abid.count_classes(written[-n:]))
    return {"shards": shards, "samples": len(written), "class_counts": abid.count_classes(written),
            "shard_class_counts": per_shard}


def _plots(out: str, splits: dict, grid: list, endpoint_url: str | None) -> None:
    counts = {name: splits[name]["class_counts"] for name in SPLITS}
    storage.write_bytes(storage.join(out, "class_distribution.png"), plots.class_distribution(counts),
                        endpoint_url=endpoint_url)
    storage.write_bytes(storage.join(out, "samples.png"), plots.samples_by_count(grid), endpoint_url=endpoint_url)


def split(source: str, *, out: str, val: float = 0.1, test: float = 0.1, seed: int = 0,
          short_side: int = 0, shard_size: int = 1000, train_ids: str | None = None,
          val_ids: str | None = None, test_ids: str | None = None, workers: int = 0,
          endpoint_url: str | None = None, progress: bool = False) -> dict:
    """Split ``source`` (download folder or its manifest.json) into shards under ``out``; return the manifest.

    ``short_side``: 0 follows the trainer's default input size (``presets.short_side_for``).
    ``workers``: processes that re-encode images (0: :func:`default_workers`; 1: this process only).
    ``progress`` shows a progress bar on stderr: images re-encoded of the total assigned.
    """
    from tqdm import tqdm

    _check_fractions(val, test)
    short_side = short_side or _default_short_side()
    if shard_size < 1 or short_side < 1 or workers < 0:
        raise ValueError(f"--shard-size and --short-side must be >= 1 and --workers >= 0, "
                         f"got {shard_size}, {short_side} and {workers}")
    workers = workers or default_workers()
    plots.pyplot()  # the plots come last: a missing matplotlib fails now, not after every shard is written
    t0 = time.perf_counter()
    if not source.endswith(".json"):
        storage.check_folder(source, what="source folder")
    root, scanned = load_source(source, endpoint_url=endpoint_url)
    timings = {"scan": time.perf_counter() - t0}
    if not scanned.records:
        raise ValueError(f"No usable ABID records in {source} (skipped: {scanned.skipped_by_reason() or 'none'}). "
                         "Expected bin-images/<id>.jpg + metadata/<id>.json, or a download manifest.json.")
    notes: dict = {}
    if train_ids or val_ids or test_ids:
        assignment, notes = assign_from_files(scanned.records, train_ids=train_ids, val_ids=val_ids,
                                              test_ids=test_ids, test=test, seed=seed, endpoint_url=endpoint_url)
        how = "files"
    else:
        assignment = stratified(scanned.records, {"val": val, "test": test}, seed)
        how = "stratified"
    if not assignment["val"]:  # training validates every epoch: an empty val set fails it after epoch 1
        raise ValueError(f"The val split would be empty ({len(scanned.records)} usable records in {source}, "
                         f"--val {val}): raise --val, add data, or pass --val-ids.")
    skipped = list(scanned.skipped)
    grid: list = []
    splits = {}
    many = sum(len(r) for r in assignment.values()) > CHUNK  # else starting processes costs more than it saves
    pool = _process_pool(workers) if workers > 1 and many else None
    bar = tqdm(total=sum(len(r) for r in assignment.values()), unit="img", desc="split", disable=not progress,
               dynamic_ncols=True)
    t_shards = time.perf_counter()
    try:
        for name in SPLITS:
            recs = assignment[name]
            random.Random(f"order:{seed}:{name}").shuffle(recs)  # mix classes within every shard
            splits[name] = _write_split(name, recs, root=root, out=out, short_side=short_side,
                                        shard_size=shard_size, pool=pool, endpoint_url=endpoint_url,
                                        skipped=skipped, samples_for_grid=grid, bar=bar,
                                        window=AHEAD * workers)
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    timings["shards"] = time.perf_counter() - t_shards
    skipped.sort(key=lambda s: s.id)
    by_reason = abid.ScanResult(skipped=skipped).skipped_by_reason()
    total: Counter = Counter()
    for s in splits.values():
        total.update({int(c): k for c, k in s["class_counts"].items()})
    distribution = {"splits": {n: s["class_counts"] for n, s in splits.items()},
                    "total": {str(c): total[c] for c in sorted(total)},
                    "samples": {n: s["samples"] for n, s in splits.items()},
                    "skipped": len(skipped), "skipped_by_reason": by_reason}
    storage.write_bytes(storage.join(out, "class_distribution.json"),
                        json.dumps(distribution, indent=2).encode(), endpoint_url=endpoint_url)
    t_plots = time.perf_counter()
    _plots(out, splits, grid, endpoint_url)
    timings["plots"] = time.perf_counter() - t_plots
    manifest = {"format": FORMAT, "source": str(source), "assignment": how, "seed": seed, "val": val,
                "test": test, "train_ids": train_ids, "val_ids": val_ids, "test_ids": test_ids,
                "short_side": short_side, "shard_size": shard_size, "workers": workers, "splits": splits,
                "skipped": [s.as_dict() for s in skipped], "skipped_by_reason": by_reason, **notes,
                "files": {"class_distribution": "class_distribution.json",
                          "class_distribution_png": "class_distribution.png", "samples_png": "samples.png"},
                "seconds": round(time.perf_counter() - t0, 3),
                # where the time went: listing and reading metadata, re-encoding and writing shards, the plots
                "seconds_by_phase": {k: round(v, 3) for k, v in timings.items()}}
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=2).encode(),
                        endpoint_url=endpoint_url)
    return manifest


def summary_text(manifest: dict) -> str:
    """A short human-readable table of a split manifest (what `bincounter split` prints)."""
    lines = [f"{'split':<6} {'samples':>8} {'shards':>6}  class counts"]
    for name in SPLITS:
        s = manifest["splits"][name]
        lines.append(f"{name:<6} {s['samples']:>8} {len(s['shards']):>6}  {s['class_counts']}")
    lines.append(f"skipped: {len(manifest['skipped'])} {manifest['skipped_by_reason']}")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""), add_help=add_help)
    p.add_argument("source", help="downloaded ABID folder or s3:// prefix, or its manifest.json")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix for the shards")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction per class (default: %(default)s)")
    p.add_argument("--test", type=float, default=0.1,
                   help="test fraction per class (of train with --val-ids) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="assignment and shard-order seed (default: %(default)s)")
    p.add_argument("--short-side", type=int, default=0,
                   help="resize images so the short side is this many px; match the model's --input-size "
                        "(or --resize-size when larger); 0: the trainer's default input size (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    p.add_argument("--train-ids", default=None, help="standard split file for train (e.g. counting_train.json)")
    p.add_argument("--val-ids", default=None, help="standard split file for val (random_val.txt, counting_val.json)")
    p.add_argument("--test-ids", default=None, help="split file for test (default: carve --test from train)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that re-encode images; 0: every CPU this process may use, capped by a container's CPU "
                        "limit (default: %(default)s)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (default: AWS config / AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    manifest = split(args.source, out=args.out, val=args.val, test=args.test, seed=args.seed,
                     short_side=args.short_side, shard_size=args.shard_size, train_ids=args.train_ids,
                     val_ids=args.val_ids, test_ids=args.test_ids, workers=args.workers,
                     endpoint_url=args.endpoint_url, progress=not args.no_progress)
    print(summary_text(manifest))
    print(f"manifest: {storage.join(args.out, MANIFEST)}")
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())
