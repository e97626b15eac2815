"""Scoring bins against their expected quantity, chunk by chunk, resumably; and merging the chunks.

The selection is cut into numbered chunks once, deterministically: a split's shards are one
chunk each; an ABID folder or bucket (``bin-images/`` + ``metadata/``) is listed, its ids sorted
and cut every ``chunk_size`` ids. ``score`` writes one file per finished chunk,
``OUTPUT/chunks/chunk-NNNNNN.json`` (atomically, so a killed run leaves no partial chunk), and
skips chunks that already have theirs, so a rerun continues where a kill stopped it. With
``parts=N, part=i`` a process scores only chunks ``c`` with ``c % N == i``: pod ``i`` of the
Kubernetes Indexed Job. ``merge`` then streams the chunk files into ``audit.csv``,
``audit.jsonl``, ``summary.json`` and the report. Memory stays bounded: images are fetched a few
at a time per worker, a chunk keeps only its rows and a handful of thumbnails, and the merge keeps
one float per bin.

Per bin: ``p_expected`` = the calibrated probability that the bin holds exactly its expected
quantity. With a ``k_or_more`` model, every count >= K is the class "K or more". Without it, a
bin expected to hold more than K cannot be judged and is skipped (reason ``beyond_model_range``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from bincounter import storage
from bincounter.data import abid

CHUNKS_DIR = "chunks"
RUN_FILE = "audit-run.json"
CSV_FILE, JSONL_FILE, SUMMARY_FILE, SKIPPED_FILE = "audit.csv", "audit.jsonl", "summary.json", "skipped.json"
CSV_COLUMNS = ("id", "expected_quantity", "predicted_count", "p_expected", "flagged")
DEFAULT_CHUNK_SIZE = 512
THUMBNAILS_PER_CHUNK = 12  # the most suspicious bins of each chunk keep a thumbnail, for the report
THUMBNAIL_SIZE = 160
BEYOND_MODEL_RANGE = "beyond_model_range"
DELTAS = (-3, -2, -1, 1, 2, 3)


class AuditError(ValueError):
    """Bad audit settings or an output folder that holds another audit."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    index: int
    ids: tuple[str, ...] = ()  # ABID layout: the ids of this chunk (sorted)
    shard: str = ""  # split source: the shard URI
    skipped: tuple[abid.Skipped, ...] = ()  # pairing problems found by the listing


# ---------------------------------------------------------------- the selection

def plan_chunks(source: str, split: str = "", chunk_size: int = DEFAULT_CHUNK_SIZE, limit: int | None = None,
                endpoint_url: str | None = None) -> list[Chunk]:
    """Cut the selection into chunks. ``split`` set: ``source`` is a split folder, one chunk per shard."""
    if chunk_size < 1:
        raise AuditError(f"--chunk-size must be >= 1, got {chunk_size}")
    if split:
        from bincounter.data import shards

        return [Chunk(i, shard=uri) for i, uri in enumerate(shards.shard_uris(source, split))]
    kw = dict(endpoint_url=endpoint_url)
    images = abid._ids_in((n for n, _ in storage.list_files(storage.join(source, abid.IMAGES_DIR), **kw)), ".jpg")
    metas = abid._ids_in((n for n, _ in storage.list_files(storage.join(source, abid.METADATA_DIR), **kw)), ".json")
    if not images and not metas:
        raise AuditError(f"--source {source} has no {abid.IMAGES_DIR}/*.jpg or {abid.METADATA_DIR}/*.json: "
                         "point at an ABID folder or bucket prefix, or at a split folder with --split")
    ids = sorted(images | metas)
    if limit is not None:
        ids = ids[:limit]
    chunks = []
    for c, start in enumerate(range(0, len(ids), chunk_size)):
        part = ids[start:start + chunk_size]
        good = tuple(i for i in part if i in images and i in metas)
        bad = tuple(abid.Skipped(i, abid.IMAGE_WITHOUT_METADATA, f"{abid.IMAGES_DIR}/{i}.jpg has no "
                                 f"{abid.METADATA_DIR}/{i}.json") if i in images else
                    abid.Skipped(i, abid.METADATA_WITHOUT_IMAGE, f"{abid.METADATA_DIR}/{i}.json has no "
                                 f"{abid.IMAGES_DIR}/{i}.jpg") for i in part if not (i in images and i in metas))
        chunks.append(Chunk(c, ids=good, skipped=bad))
    return chunks


def inject(id_: str, expected: int, fraction: float, seed: int, max_count: int, k_or_more: bool) -> int | None:
    """The altered expected quantity of this bin, or ``None`` when it is left alone.

    Decided per bin from ``(seed, id)`` alone, so every chunk, part and rerun agrees. The change is a
    random +-1..3 that never goes below 0 (nor above K for a model without "K or more", whose bins
    above K are not judged).
    """
    if fraction <= 0:
        return None
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{id_}".encode()).digest()[:8], "big"))
    if rng.random() >= fraction:
        return None
    choices = [d for d in DELTAS if expected + d >= 0 and (k_or_more or expected + d <= max_count)]
    return expected + rng.choice(choices) if choices else None


# ---------------------------------------------------------------- scoring

@dataclasses.dataclass
class Settings:
    """What a run's chunk files depend on; stored in ``audit-run.json`` and checked on every rerun."""

    model: str
    source: str
    split: str = ""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    limit: int | None = None
    inject_discrepancies: float = 0.0
    seed: int = 0


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, inflight: int) -> Iterator:
    """``pool.map`` that keeps at most ``inflight`` items pending (bounded memory), results in order."""
    pending: list = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= inflight:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


class Scorer:
    """The model and its eval transform, applied to batches of decoded bins."""

    def __init__(self, model_dir: str, device: str = "auto", batch_size: int = 32):
        import torch

        from bincounter import distributed, model as model_lib, presets

        self.device = distributed.select_device(device, distributed.DistEnv())
        self.net, self.config = model_lib.load_model_dir(model_dir, device=self.device)
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.transform = presets.eval_transform(self.config.input_size, self.config.resize_size, self.config.mean,
                                                self.config.std)
        self.batch_size = batch_size

    def expected_class(self, expected: int) -> int | None:
        """The class index of an expected quantity (``None``: the model has no class for it)."""
        from bincounter.audit.online import expected_class

        return expected_class(expected, self.config.max_count, self.config.k_or_more)

    def probabilities(self, batch):
        import torch

        from bincounter import calibration

        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            return calibration.probabilities(self.net(batch), self.config.temperature).float().cpu()


def _decoded(scorer: Scorer, id_: str, expected: int, jpeg: bytes):
    from bincounter.serving.inference import ImageError, decode_image

    try:
        # Draft decoding to twice the resize, as serving does: the antialiased resize still sees enough pixels.
        return scorer.transform(decode_image(jpeg, draft_size=2 * scorer.config.resize_size))
    except ImageError as e:
        raise abid.RecordError(id_, abid.UNREADABLE_JPEG, str(e)) from None


def _abid_items(chunk: Chunk, source: str, endpoint_url: str | None, unsigned: bool) -> Iterator[Callable]:
    """One job per bin: fetch metadata and image, parse -> ``(id, expected, jpeg)``."""
    kw = dict(endpoint_url=endpoint_url, unsigned=unsigned)

    def job(id_):
        def run():
            try:
                rec = abid.parse_metadata(storage.read_bytes(abid.metadata_uri(source, id_), **kw), id_)
                return id_, rec.count, storage.read_bytes(abid.image_uri(source, id_), **kw)
            except abid.RecordError:
                raise
            except Exception as e:  # retries exhausted, access denied, vanished object: report, keep going
                raise abid.RecordError(id_, abid.FETCH_FAILED, f"{type(e).__name__}: {e}") from None
        return run
    for id_ in chunk.ids:
        yield job(id_)


def _shard_items(chunk: Chunk) -> Iterator[Callable]:
    from bincounter.data import shards

    for sample in shards.iter_shard(chunk.shard):  # streamed: the tar is read as it goes
        yield (lambda s=sample: (s.id, s.count, s.jpeg))


def score_chunk(scorer: Scorer, chunk: Chunk, settings: Settings, *, workers: int = 4,
                endpoint_url: str | None = None, unsigned: bool = False, budget: int | None = None,
                on_bin: Callable[[], None] = lambda: None) -> dict:
    """Score one chunk; returns what its chunk file holds: rows, skipped, thumbnails."""
    import torch

    cfg = scorer.config
    items = _shard_items(chunk) if chunk.shard else _abid_items(chunk, settings.source, endpoint_url, unsigned)
    if budget is not None:
        items = (it for n, it in zip(range(budget), items))
    skipped: list[abid.Skipped] = list(chunk.skipped)
    rows: list[dict] = []
    suspicious: list[tuple[float, int, str, bytes]] = []  # max-heap on -p: the lowest p_expected kept
    batch: list[tuple[dict, object, bytes]] = []

    def prepare(job):
        try:
            id_, expected, jpeg = job()
            row = {"id": id_, "expected_quantity": expected}
            altered = inject(id_, expected, settings.inject_discrepancies, settings.seed, cfg.max_count,
                             cfg.k_or_more)
            if settings.inject_discrepancies > 0:
                row.update(injected=altered is not None, original_expected_quantity=expected)
                if altered is not None:
                    row["expected_quantity"] = altered
            if scorer.expected_class(row["expected_quantity"]) is None:
                raise abid.RecordError(id_, BEYOND_MODEL_RANGE, f"EXPECTED_QUANTITY={row['expected_quantity']} is "
                                       f"above the model's K={cfg.max_count} and it was not trained with --k-or-more")
            return row, _decoded(scorer, id_, expected, jpeg), jpeg
        except abid.RecordError as e:
            return abid.Skipped(e.id, e.code, e.detail)

    def flush():
        probs = scorer.probabilities(torch.stack([t for _, t, _ in batch]))
        for (row, _, jpeg), p in zip(batch, probs):
            k = scorer.expected_class(row["expected_quantity"])
            row["predicted_count"] = decode_count(p, cfg)
            row["p_expected"] = round(float(p[k]), 6)
            row["probabilities"] = [round(float(x), 6) for x in p]
            rows.append(row)
            entry = (-row["p_expected"], len(rows), row["id"], jpeg)
            if len(suspicious) < THUMBNAILS_PER_CHUNK:
                heapq.heappush(suspicious, entry)
            elif entry > suspicious[0]:
                heapq.heapreplace(suspicious, entry)
        batch.clear()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for out in _bounded_map(pool, prepare, items, inflight=2 * max(1, workers) + scorer.batch_size):
            on_bin()
            if isinstance(out, abid.Skipped):
                skipped.append(out)
                continue
            batch.append(out)
            if len(batch) >= scorer.batch_size:
                flush()
        if batch:
            flush()
    thumbs = {id_: thumbnail(jpeg) for _, _, id_, jpeg in suspicious}
    return {"chunk": chunk.index, "rows": rows, "skipped": [s.as_dict() for s in skipped], "thumbnails": thumbs}


def decode_count(probs, config) -> int:
    """The predicted count from one bin's class probabilities, with the decoding the model ships
    with (``config.json``'s ``decoding``: argmax, median or expected; ``bincounter.model.decode``)."""
    from bincounter.model import decode

    return int(decode(probs[None], config.decoding)[0])


def thumbnail(jpeg: bytes) -> str:
    """A small JPEG of the bin, base64 (the report embeds it)."""
    import base64

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


def chunk_uri(output: str, index: int) -> str:
    return storage.join(output, CHUNKS_DIR, f"chunk-{index:06d}.json")


def _check_run_file(output: str, settings: Settings) -> None:
    """The first run records its settings; a rerun with other settings would mix two audits."""
    uri = storage.join(output, RUN_FILE)
    mine = dataclasses.asdict(settings)
    if storage.exists(uri):
        theirs = json.loads(storage.read_bytes(uri))
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        if diff:
            raise AuditError(f"--output {output} holds an audit made with other settings "
                             f"({', '.join(f'{k}: {theirs.get(k)!r} there, {mine[k]!r} now' for k in diff)}); "
                             "use another --output, or the same settings to resume it")
        return
    storage.write_bytes(uri, json.dumps(mine, indent=2).encode())


def score(settings: Settings, output: str, *, part: int = 0, parts: int = 1, workers: int = 4, batch_size: int = 32,
          device: str = "auto", endpoint_url: str | None = None, auth: str = "auto", progress: bool = True) -> dict:
    """Score this part's chunks that have no chunk file yet. Returns counts of what it did."""
    from tqdm import tqdm

    from bincounter.data.download import resolve_unsigned

    if parts < 1 or not 0 <= part < parts:
        raise AuditError(f"--part must be in 0..{parts - 1} (--parts {parts}), got {part}")
    if not 0 <= settings.inject_discrepancies < 1:
        raise AuditError(f"--inject-discrepancies must be in [0, 1), got {settings.inject_discrepancies}")
    if settings.split and settings.limit is not None and parts > 1:
        raise AuditError("--limit with --split needs --parts 1: a shard's sample count is known only once it is read")
    unsigned = resolve_unsigned(auth) if storage.is_s3(settings.source) else False
    _check_run_file(output, settings)
    chunks = plan_chunks(settings.source, settings.split, settings.chunk_size, settings.limit, endpoint_url)
    mine = [c for c in chunks if c.index % parts == part]
    todo = [c for c in mine if not storage.exists(chunk_uri(output, c.index))]
    stats = Counter(chunks=len(chunks), part_chunks=len(mine), resumed_chunks=len(mine) - len(todo))
    budget = settings.limit if settings.split else None
    if budget is not None:  # the chunks already done used up part of the limit
        for c in mine:
            if c not in todo:
                budget -= len(json.loads(storage.read_bytes(chunk_uri(output, c.index)))["rows"])
    scorer = Scorer(settings.model, device, batch_size) if todo else None
    total = sum(len(c.ids) for c in todo) if not settings.split else None
    lock = threading.Lock()
    bar = tqdm(total=total, unit="bin", desc=f"audit part {part}/{parts}" if parts > 1 else "audit",
               disable=not progress, dynamic_ncols=True)

    def tick():
        with lock:
            bar.update(1)

    t0 = time.perf_counter()
    for chunk in todo:
        if budget is not None and budget <= 0:
            result = {"chunk": chunk.index, "rows": [], "skipped": [], "thumbnails": {}}
        else:
            result = score_chunk(scorer, chunk, settings, workers=workers, endpoint_url=endpoint_url,
                                 unsigned=unsigned, budget=budget, on_bin=tick)
        if budget is not None:
            budget -= len(result["rows"]) + len(result["skipped"])
        storage.write_bytes(chunk_uri(output, chunk.index), json.dumps(result).encode())  # atomic: done or absent
        stats["scored_chunks"] += 1
        stats["bins"] += len(result["rows"])
        stats["skipped"] += len(result["skipped"])
    bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return dict(stats)


# ---------------------------------------------------------------- merging

def iter_chunk_files(output: str, expected_chunks: int | None = None) -> Iterator[dict]:
    """The chunk files in order, one in memory at a time; raises if any of the planned ones is missing."""
    names = sorted(n for n, _ in storage.list_files(storage.join(output, CHUNKS_DIR))
                   if n.startswith("chunk-") and n.endswith(".json"))
    if expected_chunks is not None:
        have = {int(n[len("chunk-"):-len(".json")]) for n in names}
        missing = sorted(set(range(expected_chunks)) - have)
        if missing:
            raise AuditError(f"{len(missing)} of {expected_chunks} chunks are not scored yet in {output} "
                             f"(first: {missing[:5]}); run the scoring parts first")
    for n in names:
        yield json.loads(storage.read_bytes(storage.join(output, CHUNKS_DIR, n)))


class _LocalOut:
    """Local files that are written in one go and land under ``output`` only when complete."""

    def __init__(self, output: str):
        self.output = output
        self.dir = tempfile.mkdtemp(prefix="bincounter-audit-")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def publish(self, name: str) -> None:
        storage.upload_file(self.path(name), storage.join(self.output, name))  # atomic (rename / PutObject)


def merge(output: str, threshold: float, *, expected_chunks: int | None = None, settings: Settings | None = None,
          calibration: dict | None = None, threshold_choice: dict | None = None,
          top: int = 24) -> dict:
    """Stream the chunk files into ``audit.csv``, ``audit.jsonl``, ``skipped.json``, ``summary.json`` and the
    report (``audit.md``, ``audit.html``, figures). Returns the summary."""
    import csv

    from bincounter.audit import metrics as metrics_lib
    from bincounter.audit import report

    local = _LocalOut(output)
    p_all: list[float] = []
    truth: list[bool] = []
    flagged_by_expected: Counter = Counter()
    suspicious: list[tuple[float, str, dict]] = []
    thumbs: dict[str, str] = {}
    skipped: list[dict] = []
    chunks = 0
    with open(local.path(CSV_FILE), "w", newline="") as fcsv, open(local.path(JSONL_FILE), "w") as fjson:
        writer = csv.writer(fcsv)
        writer.writerow(CSV_COLUMNS)
        for chunk in iter_chunk_files(output, expected_chunks):
            chunks += 1
            skipped.extend(chunk["skipped"])
            thumbs.update(chunk["thumbnails"])
            for row in chunk["rows"]:
                row["flagged"] = row["p_expected"] < threshold
                writer.writerow([row["id"], row["expected_quantity"], row["predicted_count"],
                                 f"{row['p_expected']:.6f}", str(row["flagged"]).lower()])
                fjson.write(json.dumps(row) + "\n")
                p_all.append(row["p_expected"])
                if "injected" in row:
                    truth.append(row["injected"])
                if row["flagged"]:
                    flagged_by_expected[row["expected_quantity"]] += 1
                if row["id"] in chunk["thumbnails"]:
                    small = {k: v for k, v in row.items() if k != "probabilities"}
                    heapq.heappush(suspicious, (-row["p_expected"], row["id"], small))
                    if len(suspicious) > top:
                        heapq.heappop(suspicious)
    p = np.asarray(p_all, dtype=np.float64)
    skipped.sort(key=lambda s: s["id"])
    summary = {
        "bins": len(p_all), "flagged": int((p < threshold).sum()), "threshold": threshold,
        "flagged_share": float((p < threshold).mean()) if len(p) else 0.0,
        "flagged_by_expected_quantity": {str(k): v for k, v in sorted(flagged_by_expected.items())},
        "skipped": len(skipped), "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "chunks": chunks, "settings": dataclasses.asdict(settings) if settings else None,
        "threshold_choice": threshold_choice,
        "p_expected_histogram": np.histogram(p, bins=20, range=(0.0, 1.0))[0].tolist() if len(p) else [0] * 20,
    }
    if truth and len(truth) == len(p_all):
        summary["detection"] = metrics_lib.detection_summary(p, truth, threshold)
    most = [row for _, _, row in sorted(suspicious, key=lambda e: (-e[0], e[1]))]
    report.write(local, summary, most, thumbs, calibration=calibration,
                 pr_curve=metrics_lib.pr_curve(p, truth) if "detection" in summary else None)
    with open(local.path(SKIPPED_FILE), "w") as f:
        json.dump(skipped, f, indent=1)
    with open(local.path(SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    try:
        for name in sorted(str(p.relative_to(local.dir)) for p in Path(local.dir).rglob("*") if p.is_file()):
            if name != SUMMARY_FILE:
                local.publish(name)
        local.publish(SUMMARY_FILE)  # last: a summary means the rest is there
    finally:
        shutil.rmtree(local.dir, ignore_errors=True)
    return summary
