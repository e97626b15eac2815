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
* **Atomic**: each object is validated (metadata parsed, JPEG fully decoded) and written
  under its final name only when complete; temp files of a killed run are removed on rerun.
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
import json
import random
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


def _clean_partials(dest: str) -> int:
    """Remove temp files a killed run left behind (``.NAME.*.part``, see storage.write_bytes)."""
    if storage.is_s3(dest):
        return 0  # S3 PutObject never leaves a partial object
    removed = 0
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
             dest_endpoint_url: str | None = None, progress: bool = True) -> dict:
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
                    abid.check_jpeg(img, id_)
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

    bar = tqdm(total=limit if limit is not None else total, unit="bin", disable=not progress,
               desc="download", dynamic_ncols=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        inflight = set()
        exhausted = False
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
                out = fut.result()
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
        "bytes_fetched": store.stats["bytes_fetched"], "retries": store.stats["retries"],
        "partials_removed": partials, "workers": workers, "seconds": round(seconds, 3),
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
                progress=not args.no_progress)


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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    summary = download(**download_kwargs(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(get_args_parser().parse_args()))
