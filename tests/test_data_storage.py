"""bincounter.storage: one interface for local paths and s3:// URIs, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bincounter import storage


def test_join_and_split():
    assert storage.join("s3://b/p/", "x", "/y.json") == "s3://b/p/x/y.json"
    assert storage.join("/tmp/a", "b") == str(Path("/tmp/a/b"))
    assert storage.split_s3("s3://bkt/a/b") == ("bkt", "a/b")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")
    with pytest.raises(ValueError, match="Not an s3"):
        storage.split_s3("/local/path")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"old")

    def boom(fd):  # the disk fails halfway through the new write
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"new contents")
    assert target.read_bytes() == b"old"  # the old file, whole; no temp file left behind
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_list_files_skips_partials(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "1.jpg"), b"x")
    (tmp_path / "a" / ".2.jpg.abc.part").write_bytes(b"torn")
    assert list(storage.list_files(str(tmp_path))) == [("a/1.jpg", 1)]
    assert list(storage.list_files(str(tmp_path / "missing"))) == []


def test_s3_round_trip(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/p/obj.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    with storage.open_read(uri) as f:
        assert f.read() == b"hello"
    (tmp_path / "up.bin").write_bytes(b"uploaded")
    storage.upload_file(tmp_path / "up.bin", f"s3://{s3_bucket}/p/q/up.bin")
    assert list(storage.list_files(f"s3://{s3_bucket}/p")) == [("obj.bin", 5), ("q/up.bin", 8)]
    storage.download_file(f"s3://{s3_bucket}/p/q/up.bin", tmp_path / "down" / "x.bin")
    assert (tmp_path / "down" / "x.bin").read_bytes() == b"uploaded"
    assert [p.name for p in (tmp_path / "down").iterdir()] == ["x.bin"]


def test_client_follows_the_environment(s3_endpoint, monkeypatch):
    a = storage.s3_client()
    assert a is storage.s3_client()  # cached
    assert a.meta.endpoint_url == s3_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    b = storage.s3_client()
    assert b is not a and b.meta.endpoint_url == "http://127.0.0.1:9"
    assert storage.s3_client(s3_endpoint).meta.endpoint_url == s3_endpoint  # explicit beats the env


def test_a_pipeline_step_finds_the_endpoint_in_the_mounted_secret(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    # A step pod as pipeline.py configures it, on KFP backend 2.5.0 too: the credentials as env,
    # the S3 Secret mounted as files. This Secret has the endpoint but no region key: no file.
    secret = tmp_path / "s3-secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("testing")
    (secret / "AWS_ENDPOINT_URL").write_text(s3_endpoint + "\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(storage.S3_SETTINGS_DIR_ENV, str(secret))
    storage.s3_client.cache_clear()
    try:
        storage.write_bytes(f"s3://{s3_bucket}/k", b"through the endpoint from the file")
        assert storage.read_bytes(f"s3://{s3_bucket}/k") == b"through the endpoint from the file"
        assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
        # An explicit setting wins over the file (a step's s3_endpoint_url parameter sets the env).
        (secret / "AWS_DEFAULT_REGION").write_text("eu-west-1")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        storage.s3_client()
        assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    finally:
        storage.s3_client.cache_clear()


@pytest.mark.parametrize("value", ["2016-06-15T17:18:37.000Z", "2016-06-15T17:18:37Z", "2026-12-02T18:31:18.123456Z",
                                   "Wed, 02 Dec 2026 18:31:18 GMT", 1700000000, "1700000000",
                                   "2016-06-15T17:18:37+02:00", "2016-06-15T17:18:37.5Z"])
def test_timestamps_parse_as_botocore_parses_them(value):
    from botocore.utils import parse_timestamp

    assert storage.parse_timestamp(value) == parse_timestamp(value)
    assert storage.parse_timestamp(value).utcoffset() == parse_timestamp(value).utcoffset()


def test_listing_times_equal_botocore_default_clients(s3_bucket, monkeypatch):
    """The clients parse S3's timestamps with the fast path (dateutil cost more CPU than the
    copy in a whole-bucket listing), to the same values a plain boto3 client gets."""
    import boto3

    for i in range(3):
        storage.write_bytes(f"s3://{s3_bucket}/k{i}", b"x")
    parsed = []
    fast = storage.parse_timestamp
    monkeypatch.setattr(storage, "parse_timestamp", lambda v: parsed.append(v) or fast(v))
    storage.s3_client.cache_clear()  # a client made now binds the parser
    ours = storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    plain = boto3.session.Session().client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert len(parsed) == 3 and all(v.endswith("Z") for v in parsed)  # S3 lists ISO 8601 times
    assert [o["LastModified"] for o in ours] == [o["LastModified"] for o in plain]
    storage.s3_client.cache_clear()
