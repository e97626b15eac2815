"""The shard format that ``bincounter split`` writes and training reads.

A split folder (local or ``s3://`` prefix) looks like::

    manifest.json              # see SplitManifest keys below
    train/shard-000000.tar     # WebDataset tar shards
    val/shard-000000.tar
    test/shard-000000.tar

Each sample in a shard is two tar members with the same key, the ABID id as a
string (``00013`` and ``13`` are different bins):

    <id>.jpg   JPEG, short side resized to the split's ``short_side``
    <id>.json  {"id": "<id>", "count": <EXPECTED_QUANTITY>}

``manifest.json`` holds at least::

    {"splits": {"train": {"shards": ["train/shard-000000.tar", ...],
                           "samples": N, "class_counts": {"0": n0, ...},
                           "shard_class_counts": [{"0": ..., ...}, ...]},  # one per shard, same order
                "val": {...}, "test": {...}},
     "short_side": 320, "seed": 0, ...}
"""

from __future__ import annotations

import json
import tarfile
from typing import Iterator, NamedTuple

from bincounter import storage

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class Sample(NamedTuple):
    id: str
    jpeg: bytes
    count: int


def read_manifest(split_root: str) -> dict:
    uri = storage.join(split_root, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"No {MANIFEST} under {split_root}. Point at the folder written by `bincounter split`.")
    return json.loads(storage.read_bytes(uri))


def shard_uris(split_root: str, split: str) -> list[str]:
    """Full URIs of the shards of one split, in manifest order."""
    manifest = read_manifest(split_root)
    if split not in manifest["splits"]:
        raise KeyError(f"Split {split!r} not in {split_root}/{MANIFEST}; it has {sorted(manifest['splits'])}")
    return [storage.join(split_root, rel) for rel in manifest["splits"][split]["shards"]]


def iter_shard(uri: str) -> Iterator[Sample]:
    """Stream the samples of one shard, in order, without loading the whole tar."""
    with storage.open_read(uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        pending: dict[str, dict] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(member).read()
            entry = pending.setdefault(key, {})
            entry[ext] = data
            if "jpg" in entry and "json" in entry:
                label = json.loads(pending.pop(key)["json"])
                yield Sample(id=str(label["id"]), jpeg=entry["jpg"], count=int(label["count"]))
        if pending:
            raise ValueError(f"Shard {uri} has samples missing their jpg or json: {sorted(pending)[:5]}")
