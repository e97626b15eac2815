"""ABID format: the real sample parses; malformed records are skipped with their id and reason."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bincounter.data import abid
from bincounter.data.synth import make_record

SHARED_FILE_LIST_IDS = 10_441  # size of the course-project subset (see tests/data/abid-sample/README.md)


def _labels(sample_dir: Path) -> dict[str, int]:
    with open(sample_dir / "labels.csv") as f:
        return {row["id"]: int(row["EXPECTED_QUANTITY"]) for row in csv.DictReader(f)}


def _as_abid_layout(sample_dir: Path, root: Path) -> Path:
    """The sample is flat (<id>.jpg, <id>.json); lay it out as the bucket does."""
    for p in sample_dir.glob("*.jpg"):
        (root / abid.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / abid.IMAGES_DIR / p.name)
        if (sample_dir / f"{p.stem}.json").exists():
            (root / abid.METADATA_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_dir / f"{p.stem}.json", root / abid.METADATA_DIR / f"{p.stem}.json")
    return root


def test_real_sample_parses_both_id_series(sample_dir, tmp_path):
    root = _as_abid_layout(sample_dir, tmp_path / "abid")
    result = abid.scan(str(root), verify_images=True)
    assert result.skipped == []
    got = {r.id: r.count for r in result.records}
    assert got == _labels(sample_dir)  # labels.csv was written independently from the same files
    assert "00013" in got and "122" in got and "130" in got  # zero-padded and unpadded ids stay strings
    by_id = {r.id: r for r in result.records}
    assert by_id["122"].image_fname == "122.jpg" and by_id["00013"].image_fname is None
    # asin comes from the item, and quantities add up to EXPECTED_QUANTITY in the real files
    item = by_id["00009"].items[0]
    assert item.asin == "B015TC63LI" and item.quantity == 1 and item.weight == pytest.approx(0.75)
    for r in result.records:
        assert sum(i.quantity for i in r.items) == r.count


def test_null_dimensions_and_weights_parse_as_none():
    doc = {"BIN_FCSKU_DATA": {"KEY": {"asin": "B000REAL01", "name": "x", "quantity": 2, "height": None,
                                      "length": {"unit": "IN", "value": None}, "width": {"unit": "IN", "value": 3},
                                      "weight": None}},
           "EXPECTED_QUANTITY": 2}
    rec = abid.parse_metadata(json.dumps(doc), "01044")
    (item,) = rec.items
    assert (item.asin, item.height, item.length, item.width, item.weight) == ("B000REAL01", None, None, 3.0, None)
    assert rec.id == "01044" and rec.count == 2


def test_real_sample_has_null_fields_somewhere(sample_dir):
    # the sample was chosen to include nulls; parsing them must not fail or invent values
    nulls = 0
    for p in sample_dir.glob("*.json"):
        if p.name == "file_list.json":
            continue
        for item in abid.parse_metadata(p.read_bytes(), p.stem).items:
            nulls += sum(v is None for v in (item.height, item.length, item.width, item.weight))
    assert nulls > 0


@pytest.mark.parametrize("text, code", [
    ("{not json", abid.BAD_JSON),
    ('["a list"]', abid.BAD_JSON),
    ('{"BIN_FCSKU_DATA": {}}', abid.MISSING_EXPECTED_QUANTITY),
    ('{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": -1}', abid.NEGATIVE_COUNT),
    ('{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": "3"}', abid.BAD_COUNT),
    ('{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 2.5}', abid.BAD_COUNT),
])
def test_bad_metadata_is_rejected_with_reason(text, code):
    with pytest.raises(abid.RecordError) as e:
        abid.parse_metadata(text, "00042")
    assert e.value.code == code and e.value.id == "00042" and "00042" in str(e.value)


def write_bad_records(root: Path) -> dict[str, str]:
    """Good records plus one of each kind of bad record; returns {bad id: expected reason}."""
    (root / abid.IMAGES_DIR).mkdir(parents=True)
    (root / abid.METADATA_DIR).mkdir(parents=True)
    for i in range(6):
        id_, jpeg, meta, _ = make_record(7, i, 5)
        (root / abid.IMAGES_DIR / f"{id_}.jpg").write_bytes(jpeg)
        (root / abid.METADATA_DIR / f"{id_}.json").write_bytes(meta)
    _, jpeg, meta, _ = make_record(7, 99, 5)
    bad = {
        "90001": (jpeg[: len(jpeg) // 3], meta, abid.UNREADABLE_JPEG),  # truncated JPEG
        "90002": (b"not a jpeg at all", meta, abid.UNREADABLE_JPEG),
        "90003": (jpeg, b'{"BIN_FCSKU_DATA": {', abid.BAD_JSON),
        "90004": (jpeg, b'{"BIN_FCSKU_DATA": {}}', abid.MISSING_EXPECTED_QUANTITY),
        "90005": (jpeg, b'{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": -2}', abid.NEGATIVE_COUNT),
        "90006": (jpeg, None, abid.IMAGE_WITHOUT_METADATA),
        "90007": (None, meta, abid.METADATA_WITHOUT_IMAGE),
    }
    for id_, (img, md, _) in bad.items():
        if img is not None:
            (root / abid.IMAGES_DIR / f"{id_}.jpg").write_bytes(img)
        if md is not None:
            (root / abid.METADATA_DIR / f"{id_}.json").write_bytes(md)
    return {id_: reason for id_, (_, _, reason) in bad.items()}


def test_scan_skips_and_reports_every_bad_record(tmp_path):
    expected = write_bad_records(tmp_path)
    result = abid.scan(str(tmp_path), verify_images=True)
    assert {s.id: s.reason for s in result.skipped} == expected
    assert [r.id for r in result.records] == [f"{i + 1:05d}" for i in range(6)]
    assert result.skipped_by_reason()[abid.UNREADABLE_JPEG] == 2
    assert all(s.detail for s in result.skipped)  # every reason carries a human-readable detail


def test_read_id_file_formats(sample_dir, tmp_path):
    file_list = abid.read_id_file(str(sample_dir / "file_list.json"))
    raw = json.loads((sample_dir / "file_list.json").read_text())
    assert len(file_list) == SHARED_FILE_LIST_IDS == sum(len(v) for v in raw.values())
    assert file_list["100313"] == 1 and file_list["00710"] == 1  # ids verbatim, both widths
    assert set(file_list.values()) == {1, 2, 3, 4, 5}

    train = abid.read_id_file(str(sample_dir / "splits" / "counting_train.json"))
    assert list(train.items())[:3] == [("00005", 4), ("00009", 1), ("00010", 4)]  # index 4 -> id 00005
    val = abid.read_id_file(str(sample_dir / "splits" / "random_val.txt"))
    assert list(val) == ["00004", "00012", "00023", "00037", "00569"] and set(val.values()) == {None}

    (tmp_path / "bad.txt").write_text("12\nabc\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        abid.read_id_file(str(tmp_path / "bad.txt"))


def test_jpeg_header_check_reads_the_size_pil_reads(sample_dir):
    """download checks each image's header without PIL (a few microseconds, not ~90): on every real
    photo, and on JPEGs PIL writes in other ways (progressive, EXIF, a restart interval, grey), the
    size it reads is PIL's; a broken header is a ValueError, never another exception."""
    import io
    import random

    from hypothesis import given, settings
    from PIL import Image
    from hypothesis import strategies as st

    from bincounter.data.download import jpeg_size

    photos = sorted(sample_dir.rglob("*.jpg")) + sorted((sample_dir.parent / "abid-dev").rglob("*.jpg"))
    assert len(photos) > 300
    for path in photos:
        data = path.read_bytes()
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size, path.name
    rng = random.Random(0)
    made = []
    for mode, kw in (("RGB", {"progressive": True}), ("RGB", {"exif": b"Exif\x00\x00" + bytes(64)}),
                     ("L", {}), ("RGB", {"restart_marker_blocks": 1}), ("CMYK", {}), ("RGB", {"quality": 5})):
        size = (rng.randint(1, 700), rng.randint(1, 700))
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, "JPEG", **kw)
        made.append(buf.getvalue())
        assert jpeg_size(buf.getvalue()) == size, (mode, kw)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(made), st.integers(0, 400), st.integers(0, 255), st.booleans())
    def broken(data, at, value, cut):
        data = data[:at] if cut else data[:at] + bytes([value]) + data[at + 1:]
        try:
            w, h = jpeg_size(data)
        except ValueError:
            return
        assert w >= 1 and h >= 1

    broken()
    for bad, why in ((b"not a jpeg", "start-of-image"), (made[0][:2], "truncated"), (b"\xff\xd8\xff\xda\x00\x02", "frame")):
        with pytest.raises(ValueError, match=why):
            jpeg_size(bad)
