"""bincounter.storage: one interface for local paths and s3:// URIs, atomic writes."""

from __future__ import annotations

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
