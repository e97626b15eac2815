"""Read and write local paths and ``s3://`` URIs through one small interface.

Every function takes either a local path or an ``s3://bucket/key`` URI. S3 access
honours the standard AWS configuration (credentials chain, region,
``AWS_ENDPOINT_URL``); ``endpoint_url`` overrides the endpoint for any
S3-compatible store, and ``unsigned=True`` reads public buckets anonymously.
Writes are atomic: a local file appears under its final name only when complete
(temp file + ``os.replace``), and an S3 ``PutObject`` is atomic by nature.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

S3_PREFIX = "s3://"
# A folder with one file per optional S3 setting (a pipeline step mounts the S3 Secret there):
# KFP backend 2.5.0 cannot map an optional Secret key to an env variable, so pipeline.py maps only
# the credentials and the endpoint and region come from these files when present.
S3_SETTINGS_DIR_ENV = "BINCOUNTER_S3_SETTINGS_DIR"
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"Not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}. Expected s3://BUCKET/KEY")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out += "/" + part.strip("/")
        return out
    return str(Path(base, *parts))


def s3_client(endpoint_url: str | None = None, unsigned: bool = False, max_attempts: int = 8):
    """A boto3 S3 client; retries throttling and 5xx with exponential backoff (boto's standard mode).

    ``endpoint_url=None`` falls back to ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``. Clients are
    cached (they are thread-safe and costly to create), keyed on the endpoint and the credential
    variables as they are *now*, so changing the environment later gets a matching client.
    """
    _load_s3_settings()
    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _client(endpoint_url or env_endpoint or None, unsigned, max_attempts,
                   os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))


def _load_s3_settings() -> None:
    """Set each S3_SETTINGS variable that is not set yet from its file in $BINCOUNTER_S3_SETTINGS_DIR
    (a missing file or folder is fine: AWS S3 itself needs neither setting)."""
    folder = os.environ.get(S3_SETTINGS_DIR_ENV)
    for name in S3_SETTINGS if folder else ():
        path = Path(folder, name)
        if name not in os.environ and path.is_file() and path.read_text().strip():
            os.environ[name] = path.read_text().strip()


@functools.lru_cache(maxsize=None)
def _client(endpoint_url: str | None, unsigned: bool, max_attempts: int, _key_id: str | None,
            _profile: str | None):
    import boto3
    import botocore
    import botocore.session
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                    max_pool_connections=64)
    if unsigned:
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url, config=config)


def parse_timestamp(value):
    """botocore's timestamp parser with a fast path for the ISO 8601 form S3 lists in.

    botocore hands every timestamp to dateutil, ~38 us of CPU each: a listing of the whole
    bucket carries a million ``LastModified`` values, so listing cost more CPU than copying.
    ``datetime.fromisoformat`` gives the same value (same timezone class) in ~4 us; any other
    form (RFC 822 headers, epoch numbers) goes to botocore's parser.
    """
    from botocore.utils import parse_timestamp as botocore_parse

    if isinstance(value, str) and value.endswith("Z") and "T" in value:
        from datetime import datetime

        from dateutil.tz import tzutc

        try:
            return datetime.fromisoformat(value[:-1]).replace(tzinfo=tzutc())
        except ValueError:
            pass
    return botocore_parse(value)


s3_client.cache_clear = _client.cache_clear  # type: ignore[attr-defined]  # tests and the demo call this


def exists(uri: str, *, endpoint_url: str | None = None, unsigned: bool = False) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint_url, unsigned).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def read_bytes(uri: str, *, endpoint_url: str | None = None, unsigned: bool = False) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client(endpoint_url, unsigned).get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def _umask() -> int:
    """The process umask, read without changing it (os.umask(x) sets it: racy with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _temp_file(path: Path, private: bool = False) -> tuple[int, str]:
    """A temp file beside ``path`` with the mode a plain ``open(path, "w")`` would give it.

    mkstemp creates 0600 files; written data is meant to be shared (other users, a model
    server running as another uid, a web server over the demo folder), so the file gets
    0666 minus the umask, as any ordinary file. ``private`` keeps 0600 (secrets).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    if not private:
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None, private: bool = False) -> None:
    """Write ``data`` atomically: readers see the old object or the whole new one, never part.

    Local files follow the umask like any ordinary file; ``private=True`` makes them 0600 (secrets).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path, private)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_read(uri: str, *, endpoint_url: str | None = None, unsigned: bool = False) -> BinaryIO:
    """A readable binary stream (S3 objects are streamed, not loaded whole)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client(endpoint_url, unsigned).get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")


def upload_file(local: str | os.PathLike, uri: str, *, endpoint_url: str | None = None) -> None:
    """Copy a local file to ``uri`` (S3 multipart for large files, atomic rename locally)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(endpoint_url).upload_file(str(local), bucket, key)
        return
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(dest)
    os.close(fd)
    try:
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(uri: str, local: str | os.PathLike, *, endpoint_url: str | None = None,
                  unsigned: bool = False) -> None:
    """Copy ``uri`` to a local file atomically (no partial file under the final name)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(local)
    os.close(fd)
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client(endpoint_url, unsigned).download_file(bucket, key, tmp)
        else:
            shutil.copyfile(uri, tmp)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_files(prefix: str, *, endpoint_url: str | None = None, unsigned: bool = False) -> Iterator[tuple[str, int]]:
    """Yield ``(relative_name, size)`` for every file under ``prefix``, recursively, sorted for S3.

    Temp files left by an interrupted local write (``.NAME.*.part``) are skipped.
    """
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        paginator = s3_client(endpoint_url, unsigned).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(key):], obj["Size"]
        return
    root = Path(prefix)
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".part")):
            yield path.relative_to(root).as_posix(), path.stat().st_size


def check_writable(uri: str, *, endpoint_url: str | None = None, what: str = "output") -> None:
    """Fail now, naming ``uri``, if it cannot be written: before hours of work, not after.

    A local folder is created and a probe file written and removed; for ``s3://`` the
    bucket must exist and be reachable (a PutObject probe would leave objects behind in
    buckets with versioning, so only HeadBucket is sent).
    """
    from bincounter.errors import UserError

    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, _ = split_s3(uri)
        try:
            s3_client(endpoint_url).head_bucket(Bucket=bucket)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise UserError(f"{what} {uri}: bucket {bucket} does not exist (create it first, or fix the URI)") \
                    from None
            if code in ("403", "AccessDenied"):
                raise UserError(f"{what} {uri}: access to bucket {bucket} denied (check the S3 credentials)") \
                    from None
            raise
        return
    path = Path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=".part")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {uri} is not writable: {e.strerror or e}") from None


def check_folder(uri: str, *, what: str = "input folder") -> None:
    """A local input folder must exist (S3 prefixes are checked by the first listing or read)."""
    from bincounter.errors import UserError

    if not is_s3(uri) and not Path(uri).is_dir():
        state = "is not a folder" if Path(uri).exists() else "does not exist"
        raise UserError(f"{what} {uri} {state}")


def read_json(uri: str, *, what: str = "JSON file", endpoint_url: str | None = None, unsigned: bool = False):
    """Parse a JSON file, naming it when it is missing or corrupt."""
    import json

    from bincounter.errors import about_file

    with about_file(uri, what):
        return json.loads(read_bytes(uri, endpoint_url=endpoint_url, unsigned=unsigned))


def list_dirs(prefix: str, *, endpoint_url: str | None = None) -> list[str]:
    """Names of the folders directly under ``prefix`` (S3: common prefixes, no deep listing)."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        names = []
        paginator = s3_client(endpoint_url).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)
    root = Path(prefix)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
