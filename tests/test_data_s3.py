"""Against a real S3 endpoint (moto server mode): synth -> S3 -> download -> split -> shards, resume, selection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bincounter import cli, storage
from bincounter.data import abid, shards
from bincounter.data.download import download, resolve_unsigned
from bincounter.data.split import split
from bincounter.data.synth import make_record, synthesize

from test_data_abid import _as_abid_layout, write_bad_records

REPO = Path(__file__).resolve().parents[1]


def _upload_tree(local: Path, uri: str) -> None:
    for rel, _ in storage.list_files(str(local)):
        storage.upload_file(local / rel, storage.join(uri, rel))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_synth_upload_download_split_read_back(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/abid"
    made = synthesize(src, images=48, max_count=4, seed=5, workers=4)
    dest = tmp_path / "downloaded"
    assert cli.main(["download", "--source", src, "--dest", str(dest), "--workers", "8", "--no-progress"]) == 0
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["selected"] == 48 and summary["class_counts"] == made["class_counts"]
    assert summary["objects_fetched"] == 96 and summary["skipped"] == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    for rec in manifest["records"]:  # id, count, bytes match what is on disk and in S3
        assert rec["bytes"] == (dest / "bin-images" / f"{rec['id']}.jpg").stat().st_size
        assert storage.read_bytes(abid.image_uri(src, rec["id"])) == (dest / "bin-images" / f"{rec['id']}.jpg").read_bytes()

    out = f"s3://{s3_bucket}/split"  # shards go to S3 and are streamed back from it
    split(str(dest / "manifest.json"), out=out, val=0.25, test=0.25, seed=1, short_side=64, shard_size=10)
    truth = {r["id"]: r["count"] for r in manifest["records"]}
    seen: dict[str, int] = {}
    counts: dict[str, dict] = {}
    for name in shards.SPLITS:
        samples = [s for uri in shards.shard_uris(out, name) for s in shards.iter_shard(uri)]
        assert not (seen.keys() & {s.id for s in samples})
        seen.update({s.id: s.count for s in samples})
        counts[name] = abid.count_classes(s.count for s in samples)
        assert shards.read_manifest(out)["splits"][name]["class_counts"] == counts[name]
    assert seen == truth
    dist = json.loads(storage.read_bytes(f"{out}/class_distribution.json"))
    assert dist["total"] == made["class_counts"] and dist["splits"] == counts


def test_interrupted_download_resumes_without_refetching(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/abid"
    n = 120
    synthesize(src, images=n, max_count=5, seed=2, workers=8)
    dest = tmp_path / "dl"
    cmd = [sys.executable, "-m", "bincounter.cli", "download", "--source", src, "--dest", str(dest),
           "--workers", "1", "--no-progress", "--engine", "python"]  # one bin at a time: killable midway
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((dest / "bin-images").glob("*.jpg"))) >= 20 if (dest / "bin-images").is_dir() else False:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (dest / "manifest.json").exists()  # it really was cut off midway
    # a torn write from a crash, as storage.write_bytes names it, must not survive the rerun
    (dest / "bin-images" / ".00003.jpg.x1y2.part").write_bytes(b"\xff\xd8 torn")

    before = {k: v for k, v in _files(dest).items() if not k.rsplit("/", 1)[-1].startswith(".")}
    assert 0 < len(before) < 2 * n
    for rel, data in before.items():  # whatever has its final name is complete
        assert data == storage.read_bytes(f"{src}/{rel}"), rel

    summary = download(dest=str(dest), source=src, workers=4, progress=False)  # auto: s5cmd for what is missing
    assert summary["engine"] == "s5cmd"
    assert summary["selected"] == n and summary["skipped"] == 0
    assert summary["objects_unchanged"] == len(before)  # 304s: nothing complete was fetched again
    assert summary["objects_fetched"] == 2 * n - len(before)
    assert summary["partials_removed"] >= 1
    after = _files(dest)
    assert not [k for k in after if k.endswith(".part")]
    for rel in (f"bin-images/{i + 1:05d}.jpg" for i in range(n)):
        assert after[rel] == storage.read_bytes(f"{src}/{rel}")

    again = download(dest=str(dest), source=src, workers=4, progress=False)
    assert again["objects_fetched"] == 0 and again["objects_unchanged"] == 2 * n

    # a changed source object is fetched again (ETag differs), nothing else
    _, jpeg, _, _ = make_record(99, 0, 5)
    storage.write_bytes(f"{src}/bin-images/00007.jpg", jpeg)
    changed = download(dest=str(dest), source=src, workers=4, progress=False)
    assert changed["objects_fetched"] == 1 and (dest / "bin-images" / "00007.jpg").read_bytes() == jpeg


def test_download_skips_and_reports_bad_records(s3_bucket, tmp_path):
    expected = write_bad_records(tmp_path / "src")
    _upload_tree(tmp_path / "src", f"s3://{s3_bucket}")
    summary = download(dest=str(tmp_path / "dl"), source=f"s3://{s3_bucket}", workers=4, progress=False)
    reasons = {s["id"]: s["reason"] for s in json.loads((tmp_path / "dl" / "manifest.json").read_text())["skipped"]}
    # candidates come from the metadata listing, so an image without metadata is never selected
    expected.pop("90006")
    assert reasons == expected
    assert summary["selected"] == 6 and summary["skipped_by_reason"][abid.UNREADABLE_JPEG] == 2
    # nothing of a bad record reaches the destination, so nothing can be mislabelled later
    for sub in ("bin-images", "metadata"):
        assert {p.stem for p in (tmp_path / "dl" / sub).iterdir()} == {f"{i + 1:05d}" for i in range(6)}


def test_split_file_selection_over_s3_with_real_images(s3_bucket, sample_dir, tmp_path):
    _upload_tree(_as_abid_layout(sample_dir, tmp_path / "abid"), f"s3://{s3_bucket}")
    listed = abid.read_id_file(str(sample_dir / "splits" / "counting_train.json"))
    summary = download(dest=str(tmp_path / "dl"), source=f"s3://{s3_bucket}", workers=4, progress=False,
                       split_files=[str(sample_dir / "splits" / "counting_train.json")], max_count=3)
    records = json.loads((tmp_path / "dl" / "manifest.json").read_text())["records"]
    assert {r["id"]: r["count"] for r in records} == {i: c for i, c in listed.items() if c <= 3}
    # counts known from the split file filter before any request: only kept bins cost requests
    assert summary["filtered_out"] == sum(c > 3 for c in listed.values())
    assert summary["objects_fetched"] == 2 * summary["selected"]


def test_file_list_selects_exactly_its_ids(sample_dir, tmp_path):
    file_list = abid.read_id_file(str(sample_dir / "file_list.json"))
    chosen = {}
    for cls in (1, 2, 3, 4, 5):
        chosen.update({i: cls for i in [i for i, c in file_list.items() if c == cls][:3]})
    src = tmp_path / "bucket"
    for k, (id_, cls) in enumerate(list(chosen.items()) + [("00002", 2), ("2", 2), ("535234", 1)]):
        _, jpeg, _, _ = make_record(11, k, 5)
        storage.write_bytes(abid.image_uri(str(src), id_), jpeg)
        storage.write_bytes(abid.metadata_uri(str(src), id_),
                            json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": cls}).encode())
    summary = download(dest=str(tmp_path / "dl"), source=str(src), file_list=str(sample_dir / "file_list.json"),
                       workers=4, progress=False)
    records = json.loads((tmp_path / "dl" / "manifest.json").read_text())["records"]
    assert {r["id"]: r["count"] for r in records} == chosen  # decoys 00002, 2 and 535234 are not in the list
    assert summary["skipped"] == len(file_list) - len(chosen)
    assert summary["skipped_by_reason"] == {abid.MISSING_OBJECT: len(file_list) - len(chosen)}


def test_limit_and_max_count_read_metadata_first(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}"
    made = synthesize(src, images=40, max_count=6, seed=8, workers=4)
    summary = download(dest=str(tmp_path / "dl"), source=src, max_count=2, limit=7, workers=3, progress=False)
    assert summary["selected"] == 7 and set(map(int, summary["class_counts"])) <= {0, 1, 2}
    # images are fetched only for kept bins: at most one in-flight overshoot per worker
    images = list((tmp_path / "dl" / "bin-images").glob("*.jpg"))
    assert len(images) == 7
    assert summary["objects_fetched"] - 7 <= 40  # metadata reads, never all 80 objects
    assert sum(made["class_counts"].get(str(c), 0) for c in (0, 1, 2)) >= 7


def test_auth_auto_and_anonymous_reads(s3_bucket, tmp_path, monkeypatch):
    assert resolve_unsigned("auto") is False  # the fixture configured credentials
    assert resolve_unsigned("unsigned") is True and resolve_unsigned("signed") is False
    with pytest.raises(ValueError, match="Only auto, unsigned, signed"):
        resolve_unsigned("anonymous")
    for prefix in ("private", "public"):
        synthesize(f"s3://{s3_bucket}/{prefix}", images=3, max_count=2, seed=0)
    for rel, _ in storage.list_files(f"s3://{s3_bucket}/public"):  # like aft-vbi-pds
        storage.s3_client().put_object_acl(Bucket=s3_bucket, Key=f"public/{rel}", ACL="public-read")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert resolve_unsigned("auto") is True
    # anonymous reads of a private bucket are refused: reported per bin, never a crash
    private = download(dest=str(tmp_path / "dl"), source=f"s3://{s3_bucket}/private", progress=False)
    assert private["auth"] == "unsigned" and private["selected"] == 0
    assert private["skipped_by_reason"] == {abid.FETCH_FAILED: 3}
    summary = download(dest=str(tmp_path / "dl"), source=f"s3://{s3_bucket}/public", progress=False)
    assert summary["auth"] == "unsigned" and summary["selected"] == 3 and summary["objects_fetched"] == 6


class _FlakyProxy:
    """An HTTP proxy in front of moto that fails each object GET twice before serving it:
    first a 503 SlowDown (throttling), then a body cut off midway (a broken stream)."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        hits: dict[str, int] = {}
        lock = threading.Lock()
        self.failures = {"throttled": 0, "truncated": 0}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stalls

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                flaky = self.command == "GET" and "?" not in self.path and self.path.count("/") >= 3
                with lock:
                    n = hits[self.path] = hits.get(self.path, 0) + 1
                if flaky and n == 1:
                    err = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    outer.failures["throttled"] += 1
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body or None, dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if flaky and n == 2 and resp.status == 200:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])  # then hang up: the client sees a short body
                    self.close_connection = True
                    outer.failures["truncated"] += 1
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_download_retries_throttling_and_broken_streams(s3_endpoint, s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}"
    made = synthesize(src, images=4, max_count=3, seed=4)
    with _FlakyProxy(s3_endpoint) as proxy:
        summary = download(dest=str(tmp_path / "dl"), source=src, endpoint_url=proxy.url, workers=4, progress=False,
                           engine="python")  # s5cmd retries on its own; its HEAD + ranged GET miss this proxy's faults
    assert proxy.failures == {"throttled": 8, "truncated": 8}  # every object failed twice
    assert summary["selected"] == 4 and summary["skipped"] == 0 and summary["class_counts"] == made["class_counts"]
    assert summary["retries"] == 8  # broken streams are retried by download; 503s by botocore
    for rel, _ in storage.list_files(src):
        assert (tmp_path / "dl" / rel).read_bytes() == storage.read_bytes(f"{src}/{rel}")


def test_download_to_s3_destination_resumes(s3_bucket):
    src, dest = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/copy"
    made = synthesize(src, images=8, max_count=3, seed=6)
    first = download(dest=dest, source=src, workers=4, progress=False)
    assert first["selected"] == 8 and first["objects_fetched"] == 16
    again = download(dest=dest, source=src, workers=4, progress=False)
    assert again["objects_fetched"] == 0 and again["objects_unchanged"] == 16
    records = json.loads(storage.read_bytes(f"{dest}/manifest.json"))["records"]
    assert abid.count_classes(r["count"] for r in records) == made["class_counts"]
    for r in records:  # sizes come from HEAD on reruns: they must still be the image sizes
        assert r["bytes"] == len(storage.read_bytes(abid.image_uri(dest, r["id"])))


@pytest.mark.parametrize("max_count", [4, None], ids=["batches-of-keys", "whole-prefix-wildcard"])
def test_s5cmd_and_python_engines_write_the_same_download(s3_bucket, tmp_path, max_count):
    """Same selection, validation, files and manifest records whichever engine moves the bytes.

    With --max-count, s5cmd copies batches of named keys; without a selection, into an empty
    folder, it copies the whole prefix by wildcard."""
    src = f"s3://{s3_bucket}"
    synthesize(src, images=30, max_count=6, seed=9)
    write_bad_records(tmp_path / "bad")
    _upload_tree(tmp_path / "bad", src)
    runs = {engine: download(dest=str(tmp_path / engine), source=src, workers=4, max_count=max_count,
                             progress=False, engine=engine) for engine in ("python", "s5cmd")}
    assert runs["s5cmd"]["engine"] == "s5cmd" and runs["python"]["engine"] == "python"
    # s5cmd really moved the good bins (metadata + image); only the bad ones fell back to Python
    assert runs["s5cmd"]["objects_via_s5cmd"] >= 2 * runs["s5cmd"]["selected"] - 4
    assert runs["python"]["objects_via_s5cmd"] == 0
    manifests = {e: json.loads((tmp_path / e / "manifest.json").read_text()) for e in runs}
    assert manifests["s5cmd"]["records"] == manifests["python"]["records"]
    assert manifests["s5cmd"]["skipped"] == manifests["python"]["skipped"]
    for key in ("selected", "class_counts", "skipped_by_reason", "filtered_out", "bytes"):
        assert runs["s5cmd"][key] == runs["python"][key], key
    # a bin whose image s5cmd cannot get goes through the Python engine, metadata included
    assert runs["python"]["objects_fetched"] <= runs["s5cmd"]["objects_fetched"] <= runs["python"]["objects_fetched"] + 3
    data = {e: {k: v for k, v in _files(tmp_path / e).items() if "/" in k} for e in runs}  # not the summaries
    assert data["s5cmd"] == data["python"] and len(data["python"]) > 40
    assert not (tmp_path / "s5cmd" / ".staging").exists()
    with pytest.raises(ValueError, match="--engine s5cmd needs an s3:// --source"):
        download(dest=str(tmp_path / "copy"), source=str(tmp_path / "python"), engine="s5cmd", progress=False)


def test_whole_prefix_copy_that_fails_falls_back_to_our_own_listing(s3_bucket, tmp_path):
    """s5cmd's listing stands for the bins only when it reports every copy done. Here anonymous
    reads are refused for one bin's metadata and another's image (s5cmd exits 1): our own listing
    decides, and both bins are reported exactly as the Python engine reports them."""
    src = f"s3://{s3_bucket}/public"
    synthesize(src, images=12, max_count=3, seed=2)
    denied = {f"{abid.METADATA_DIR}/00003.json", f"{abid.IMAGES_DIR}/00007.jpg"}
    for rel, _ in storage.list_files(src):  # like aft-vbi-pds, but for the two denied objects
        if rel not in denied:
            storage.s3_client().put_object_acl(Bucket=s3_bucket, Key=f"public/{rel}", ACL="public-read")
    runs = {engine: download(dest=str(tmp_path / engine), source=src, workers=4, auth="unsigned",
                             progress=False, engine=engine) for engine in ("python", "s5cmd")}
    assert runs["s5cmd"]["objects_via_s5cmd"] >= 20  # the whole prefix by wildcard: 10 good bins
    manifests = {e: json.loads((tmp_path / e / "manifest.json").read_text()) for e in runs}
    assert [s["id"] for s in manifests["s5cmd"]["skipped"]] == ["00003", "00007"]
    assert {s["reason"] for s in manifests["s5cmd"]["skipped"]} == {abid.FETCH_FAILED}
    assert manifests["s5cmd"]["skipped"] == manifests["python"]["skipped"]
    assert manifests["s5cmd"]["records"] == manifests["python"]["records"] and len(manifests["python"]["records"]) == 10
    assert _files(tmp_path / "s5cmd" / abid.IMAGES_DIR) == _files(tmp_path / "python" / abid.IMAGES_DIR)
    assert _files(tmp_path / "s5cmd" / abid.METADATA_DIR) == _files(tmp_path / "python" / abid.METADATA_DIR)


@pytest.fixture(scope="module")
def other_endpoint():
    """A second S3 endpoint in its own process (its own buckets), as the pipeline's working store
    is to AWS: the dest of a download whose source is on ``s3_endpoint``."""
    from conftest import _free_port

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                storage.s3_client(url).list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        server.kill()
        server.wait()


def test_s5cmd_relays_to_an_s3_destination_on_another_endpoint(s3_bucket, other_endpoint, tmp_path, monkeypatch):
    """The pipeline's shape: AWS -> the working store, two endpoints. s5cmd downloads each batch
    into a local folder, the bins are checked there, and a second s5cmd uploads them, images
    before metadata; the result equals the Python engine's, and a rerun resumes by ETag."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the relay folder goes
    (tmp_path / "tmp").mkdir()
    src = f"s3://{s3_bucket}"
    synthesize(src, images=30, max_count=6, seed=9)
    write_bad_records(tmp_path / "bad")
    _upload_tree(tmp_path / "bad", src)
    storage.s3_client(other_endpoint).create_bucket(Bucket="work")
    runs = {engine: download(dest=f"s3://work/{engine}", source=src, workers=4, max_count=4, progress=False,
                             engine=engine, dest_endpoint_url=other_endpoint) for engine in ("python", "auto")}
    assert runs["auto"]["engine"] == "s5cmd" and runs["python"]["engine"] == "python"
    # both ends went through s5cmd for the good bins: the dest endpoint reached the uploader
    assert runs["auto"]["objects_uploaded_via_s5cmd"] == 2 * runs["auto"]["selected"]
    assert runs["python"]["objects_uploaded_via_s5cmd"] == 0

    def dest(engine: str) -> dict[str, bytes]:
        prefix = f"s3://work/{engine}"
        return {rel: storage.read_bytes(f"{prefix}/{rel}", endpoint_url=other_endpoint)
                for rel, _ in storage.list_files(prefix, endpoint_url=other_endpoint) if "/" in rel}

    manifests = {e: json.loads(storage.read_bytes(f"s3://work/{e}/manifest.json", endpoint_url=other_endpoint))
                 for e in runs}
    assert manifests["auto"]["records"] == manifests["python"]["records"]
    assert manifests["auto"]["skipped"] == manifests["python"]["skipped"]
    data = {e: dest(e) for e in runs}
    assert data["auto"] == data["python"] and len(data["python"]) > 40
    assert not storage.exists(f"{src}/copy") and list((tmp_path / "tmp").iterdir()) == []  # relay folder removed
    again = download(dest="s3://work/auto", source=src, workers=4, max_count=4, progress=False,
                     dest_endpoint_url=other_endpoint)
    assert again["objects_uploaded_via_s5cmd"] == 0 and again["selected"] == runs["auto"]["selected"]
    assert again["objects_unchanged"] == 2 * again["selected"]


def test_whole_prefix_relay_uploads_in_batches_while_s5cmd_copies(s3_bucket, other_endpoint, tmp_path, monkeypatch):
    """No selection and an empty S3 dest: s5cmd copies the prefix by wildcard into the relay
    folder, and the checked bins go up every RELAY_BATCH bins (3 here) while it copies. Bad
    records are reported as the Python engine reports them, and the bytes at the dest are equal."""
    import tempfile

    from bincounter.data import download as dl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(dl, "RELAY_BATCH", 3)
    sources, uploads = [], []
    stream = dl._S5cmd.stream

    def spy(self, pairs, scratch):
        (uploads if storage.is_s3(pairs[0][1]) else sources).append([src for src, _ in pairs])
        return stream(self, pairs, scratch)

    monkeypatch.setattr(dl._S5cmd, "stream", spy)
    src = f"s3://{s3_bucket}/whole"
    synthesize(src, images=14, max_count=4, seed=4)
    write_bad_records(tmp_path / "bad")
    _upload_tree(tmp_path / "bad", src)
    storage.s3_client(other_endpoint).create_bucket(Bucket="whole")
    runs = {engine: download(dest=f"s3://whole/{engine}", source=src, workers=4, progress=False,
                             engine=engine, dest_endpoint_url=other_endpoint) for engine in ("python", "s5cmd")}
    assert sources == [[f"{src}/{abid.METADATA_DIR}/*", f"{src}/{abid.IMAGES_DIR}/*"]]  # one wildcard copy
    good = runs["s5cmd"]["objects_uploaded_via_s5cmd"] // 2
    assert good >= 14 and len(uploads) == 2 * -(-good // 3)  # images, then metadata, per batch of 3
    manifests = {e: json.loads(storage.read_bytes(f"s3://whole/{e}/manifest.json", endpoint_url=other_endpoint))
                 for e in runs}
    assert manifests["s5cmd"]["records"] == manifests["python"]["records"]
    assert manifests["s5cmd"]["skipped"] == manifests["python"]["skipped"] and manifests["python"]["skipped"]
    data = {e: {rel: storage.read_bytes(f"s3://whole/{e}/{rel}", endpoint_url=other_endpoint)
                for rel, _ in storage.list_files(f"s3://whole/{e}", endpoint_url=other_endpoint) if "/" in rel}
            for e in runs}
    assert data["s5cmd"] == data["python"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_relay_folders_of_killed_downloads_are_removed(tmp_path, monkeypatch):
    """A SIGKILLed relay leaves its folder in the temp dir; the next relay removes it, and only
    the folders whose process is gone."""
    import tempfile

    from bincounter.data import download as dl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, other = (tmp_path / f"{dl.RELAY_PREFIX}{dead.pid}-x1", tmp_path / f"{dl.RELAY_PREFIX}{os.getpid()}-x2",
                          tmp_path / "unrelated-1")
    for d in (stale, live, other):
        (d / abid.IMAGES_DIR).mkdir(parents=True)
        (d / abid.IMAGES_DIR / "00001.jpg").write_bytes(b"x")
    dl._clean_relays()
    assert not stale.exists() and live.exists() and other.exists()


def test_s5cmd_report_lines_survive_batched_reads():
    """s5cmd's report is read in batches (one wakeup per batch, not per copy): lines split across
    writes, several lines per read, and a last line without a newline all come out whole."""
    from bincounter.data.download import _lines

    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "for part in (b'{\"a\":1}\\n{\"b\"', b':2}\\n', b'{\"c\":3}\\n{\"d\":4}\\n{\"e\"', b':5}'):\n"
        "    os.write(1, part); time.sleep(0.05)\n")], stdout=subprocess.PIPE)
    try:
        got = [json.loads(line) for line in _lines(writer.stdout, pause=0.03)]
    finally:
        writer.wait(10)
    assert got == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}, {"e": 5}]
