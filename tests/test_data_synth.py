"""bincounter synth: deterministic, exact ABID layout and schema, counts 0..K."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from bincounter import cli
from bincounter.data import abid
from bincounter.data.synth import IMAGE_SIZE, synthesize


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_the_abid_layout_deterministically(tmp_path):
    assert cli.main(["synth", "--output", str(tmp_path / "a"), "--images", "24", "--max-count", "4", "--seed", "3"]) == 0
    synthesize(str(tmp_path / "b"), images=24, max_count=4, seed=3, workers=1)  # another order of work
    synthesize(str(tmp_path / "c"), images=24, max_count=4, seed=4)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b  # same seed, same bytes, whatever the number of workers
    assert a.keys() == c.keys() and a != c
    ids = [f"{i + 1:05d}" for i in range(24)]
    assert sorted(a) == sorted([f"bin-images/{i}.jpg" for i in ids] + [f"metadata/{i}.json" for i in ids])


def test_the_old_positional_dest_still_works_with_a_warning(tmp_path, capsys):
    assert cli.main(["synth", str(tmp_path / "old"), "--images", "3"]) == 0
    assert "positional DEST is deprecated and goes in the next release; use --output" in capsys.readouterr().err
    assert len(list((tmp_path / "old" / "metadata").iterdir())) == 3
    assert cli.main(["synth", str(tmp_path / "x"), "--output", str(tmp_path / "y"), "--images", "3"]) == 2
    assert cli.main(["synth", "--images", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: give the output once: --output" in err and "required: --output" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_records_are_valid_abid_with_consistent_labels(tmp_path):
    summary = synthesize(str(tmp_path), images=60, max_count=6, seed=1)
    result = abid.scan(str(tmp_path), verify_images=True)
    assert result.skipped == [] and len(result.records) == 60
    assert result.class_counts() == summary["class_counts"]
    assert set(map(int, summary["class_counts"])) == set(range(7))  # every count 0..K occurs in 60 draws
    repeated_sku = False
    for rec in result.records:
        assert sum(item.quantity for item in rec.items) == rec.count
        repeated_sku |= any(item.quantity > 1 for item in rec.items)
        doc = json.loads((tmp_path / "metadata" / f"{rec.id}.json").read_text())
        assert set(doc) == {"BIN_FCSKU_DATA", "EXPECTED_QUANTITY"}
        for key, item in doc["BIN_FCSKU_DATA"].items():
            assert item["asin"] == key and item["normalizedName"] == item["name"]
            assert set(item) == {"asin", "height", "length", "name", "normalizedName", "quantity", "weight", "width"}
        w, h = Image.open(io.BytesIO((tmp_path / "bin-images" / f"{rec.id}.jpg").read_bytes())).size
        assert 0.84 * IMAGE_SIZE[0] <= w <= 1.16 * IMAGE_SIZE[0] and 0.84 * IMAGE_SIZE[1] <= h <= 1.16 * IMAGE_SIZE[1]
    assert repeated_sku  # the same asin twice in a bin, as in real bins


def test_every_item_stays_visible_and_large_enough_to_count():
    """Learnability: after downscaling to 64 px, every item is still several pixels wide and
    partly visible (later, nearer items overlap earlier ones but never hide one entirely)."""
    import random

    import numpy as np

    from bincounter.data.synth import render_bin

    worst_visible, worst_width = 1.0, 1.0
    for i in range(150):
        rng = random.Random(f"visibility:{i}")
        count = i % 11  # up to 3 rows of depth
        img, items = render_bin(rng, count)
        assert len(items) == count
        owner = np.full((img.height, img.width), -1)
        for k, it in enumerate(items):  # drawing order: later items cover earlier ones
            x0, y0, x1, y1 = (max(0, v) for v in it["box"])
            owner[y0:y1, x0:x1] = k
        for k, it in enumerate(items):
            x0, y0, x1, y1 = it["box"]
            area = (x1 - x0) * (y1 - y0)
            worst_visible = min(worst_visible, (owner == k).sum() / area)
            worst_width = min(worst_width, (x1 - x0) / img.width)
    assert worst_visible >= 0.12, worst_visible  # typical items are far more visible (5th percentile ~40-50%)
    assert worst_width * 64 >= 3, worst_width  # >= 3 px wide at a 64 px input, even with 10 items
