"""bincounter split: stratified, deterministic, disjoint; shards follow the shards.py contract."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bincounter.data import abid, shards
from bincounter.data import split as split_lib
from bincounter.data.split import split, stratified

from conftest import SYNTH_IMAGES
from test_data_abid import _as_abid_layout, write_bad_records


def _read_split(root: str) -> dict[str, list[shards.Sample]]:
    return {name: [s for uri in shards.shard_uris(root, name) for s in shards.iter_shard(uri)]
            for name in shards.SPLITS}


def test_synthetic_split_round_trip(synthetic_abid, synthetic_split):
    manifest = shards.read_manifest(synthetic_split)
    got = _read_split(synthetic_split)
    truth = {r.id: r.count for r in abid.scan(synthetic_abid).records}
    assert len(truth) == SYNTH_IMAGES

    ids = {name: [s.id for s in samples] for name, samples in got.items()}
    assert sum(len(v) for v in ids.values()) == SYNTH_IMAGES  # nothing lost, nothing duplicated
    assert set().union(*map(set, ids.values())) == set(truth)
    for name, samples in got.items():
        assert all(s.count == truth[s.id] for s in samples)  # labels survive the trip
        meta = manifest["splits"][name]
        assert meta["samples"] == len(samples)
        assert meta["class_counts"] == abid.count_classes(s.count for s in samples)
        assert len(meta["shards"]) == -(-len(samples) // manifest["shard_size"])
    # the shards hold resized, decodable JPEGs with the requested short side
    for s in got["val"][:10]:
        assert min(Image.open(io.BytesIO(s.jpeg)).size) == manifest["short_side"] == 96
    # shards are mixed across classes, not sorted by count
    first = [s.count for s in got["train"][:30]]
    assert len(set(first)) >= 4

    dist = json.loads(Path(synthetic_split, "class_distribution.json").read_text())
    assert dist["total"] == abid.count_classes(truth.values())
    for png in ("class_distribution.png", "samples.png"):
        assert Image.open(Path(synthetic_split, png)).format == "PNG"


def test_stratified_by_count(synthetic_abid):
    records = abid.scan(synthetic_abid).records
    parts = stratified(records, {"val": 0.15, "test": 0.15}, seed=0)
    per_class = Counter(r.count for r in records)
    for name in ("val", "test"):
        got = Counter(r.count for r in parts[name])
        assert got == {c: round(n * 0.15) for c, n in per_class.items()}


def test_assignment_deterministic_disjoint_and_order_free(synthetic_abid):
    records = abid.scan(synthetic_abid).records
    a = stratified(records, {"val": 0.2, "test": 0.1}, seed=3)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    b = stratified(shuffled, {"val": 0.2, "test": 0.1}, seed=3)
    c = stratified(records, {"val": 0.2, "test": 0.1}, seed=4)
    as_ids = lambda p: {k: sorted(r.id for r in v) for k, v in p.items()}  # noqa: E731
    assert as_ids(a) == as_ids(b)
    assert as_ids(a) != as_ids(c)
    sets = [set(v) for v in as_ids(a).values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == len(records)


def test_split_is_deterministic_end_to_end(synthetic_abid, synthetic_split, tmp_path):
    again = split(synthetic_abid, out=str(tmp_path), val=0.15, test=0.15, seed=0, short_side=96, shard_size=30)
    first = shards.read_manifest(synthetic_split)
    for name in shards.SPLITS:
        assert again["splits"][name] == first["splits"][name]
        for rel in first["splits"][name]["shards"]:  # fixed tar mtime: byte-identical shards
            assert Path(synthetic_split, rel).read_bytes() == Path(tmp_path, rel).read_bytes()


def test_split_skips_bad_records_and_reports_them(tmp_path):
    expected = write_bad_records(tmp_path / "abid")
    manifest = split(str(tmp_path / "abid"), out=str(tmp_path / "out"), val=0.2, test=0.2, seed=0,
                     short_side=64, shard_size=4)
    assert {s["id"]: s["reason"] for s in manifest["skipped"]} == expected
    written = {s.id for samples in _read_split(str(tmp_path / "out")).values() for s in samples}
    assert written == {f"{i + 1:05d}" for i in range(6)}
    assert manifest["skipped_by_reason"][abid.UNREADABLE_JPEG] == 2
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped_by_reason"] == manifest["skipped_by_reason"]


def test_split_from_standard_split_files(sample_dir, tmp_path):
    root = _as_abid_layout(sample_dir, tmp_path / "abid")
    splits_dir = sample_dir / "splits"
    manifest = split(str(root), out=str(tmp_path / "out"), train_ids=str(splits_dir / "counting_train.json"),
                     val_ids=str(splits_dir / "random_val.txt"), test=0.0, short_side=64, shard_size=8)
    got = {name: {s.id for s in samples} for name, samples in _read_split(str(tmp_path / "out")).items()}
    assert got["val"] == {"00004", "00012", "00023", "00037", "00569"}
    train_listed = set(abid.read_id_file(str(splits_dir / "counting_train.json")))
    assert got["train"] == train_listed - got["val"] and got["test"] == set()
    assert manifest["assignment"] == "files"
    assert manifest["label_disagreements"] == 0  # the split file's counts equal EXPECTED_QUANTITY

    # without a test file, test is carved from train, stratified and seeded, and stays disjoint
    carved = split(str(root), out=str(tmp_path / "out2"), val_ids=str(splits_dir / "random_val.txt"),
                   test=0.3, short_side=64, shard_size=8)
    ids = {n: {s.id for s in v} for n, v in _read_split(str(tmp_path / "out2")).items()}
    assert ids["val"] == got["val"] and ids["test"] and not (ids["test"] & ids["train"])
    assert sum(carved["splits"][n]["samples"] for n in shards.SPLITS) == 31


def test_bad_fractions_rejected(tmp_path):
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        split(str(tmp_path), out=str(tmp_path / "o"), val=0.6, test=0.5)


def test_empty_source_is_a_clear_error(tmp_path):
    from bincounter.errors import UserError

    with pytest.raises(UserError, match="nothing-here does not exist"):
        split(str(tmp_path / "nothing-here"), out=str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No usable ABID records"):
        split(str(tmp_path / "empty"), out=str(tmp_path / "o"))


@pytest.mark.parametrize("ahead", [1, split_lib.AHEAD])
def test_parallel_split_writes_byte_identical_shards(synthetic_abid, tmp_path, monkeypatch, ahead):
    """Processes re-encode chunks concurrently, yet the shards are the same bytes as with one process.
    Chunks of 32 cross the shards of 40; with ``ahead=1`` only 2 chunks are queued at a time."""
    import hashlib

    monkeypatch.setattr(split_lib, "AHEAD", ahead)

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.tar"))}

    one = split(synthetic_abid, out=str(tmp_path / "one"), seed=3, short_side=48, shard_size=40, workers=1)
    two = split(synthetic_abid, out=str(tmp_path / "two"), seed=3, short_side=48, shard_size=40, workers=2)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["splits"] == two["splits"]
    got = digests(tmp_path / "two")
    assert got == digests(tmp_path / "one") and len(got) >= 3
