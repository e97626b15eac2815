"""Shared test fixtures: a real S3 endpoint (moto server mode), a small synthetic split, the real ABID sample.

* ``s3_endpoint`` (session): a moto S3 server on 127.0.0.1:<free port>. Sets AWS_ENDPOINT_URL,
  AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing and AWS_DEFAULT_REGION=us-east-1 for the
  session (subprocesses inherit them) and yields the endpoint URL.
* ``s3_bucket`` (function): a fresh, empty bucket on that endpoint; yields its name.
* ``synthetic_abid`` (session): 240 synthetic bins (counts 0..5, seed 0) in ABID layout, a local folder.
* ``synthetic_split`` (session): that folder split into shards (val 0.15, test 0.15, seed 0,
  short side 96 px, 30 samples per shard: train 6 shards, val and test 2 each); a local folder
  path (str) to pass to ``bincounter.data.shards`` / training.
* ``sample_dir``: ``tests/data/abid-sample``, the real 31-pair ABID sample (see its README).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"
SYNTH_IMAGES, SYNTH_MAX_COUNT, SYNTH_SEED = 240, 5, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    from bincounter import storage

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", url)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.s3_client.cache_clear()  # clients made before this point point elsewhere
    try:
        yield url
    finally:
        storage.s3_client.cache_clear()
        mp.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    from bincounter import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def synthetic_abid(tmp_path_factory) -> str:
    from bincounter.data.synth import synthesize

    dest = tmp_path_factory.mktemp("synthetic-abid")
    synthesize(str(dest), images=SYNTH_IMAGES, max_count=SYNTH_MAX_COUNT, seed=SYNTH_SEED)
    return str(dest)


@pytest.fixture(scope="session")
def synthetic_split(synthetic_abid, tmp_path_factory) -> str:
    from bincounter.data.split import split

    out = tmp_path_factory.mktemp("synthetic-split")
    split(synthetic_abid, out=str(out), val=0.15, test=0.15, seed=SYNTH_SEED, short_side=96, shard_size=30)
    return str(out)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return DATA_DIR / "abid-sample"


@pytest.fixture
def one_torch_thread():
    """Run in-process torch on one thread: tests share 2 cores, and OpenMP threads
    spinning against each other (and against subprocesses) cost more than they give."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
