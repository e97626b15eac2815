"""Reuse work (issue 14): a rerun with the same selection reuses the download and the split,
another selection gets its own manifest, and ``split_uri`` starts from an existing split.

The download and split components' Python functions run directly (the same code kfp.local
and the cluster run), on a local working store and the shared synthetic bins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kfp import dsl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `components` beside pipeline.py

from components import download, split  # noqa: E402

from bincounter import runs  # noqa: E402


def _download(tmp_path: Path, work: str, source: str, name: str, **kw) -> dsl.Dataset:
    raw = dsl.Dataset(uri=str(tmp_path / name), name="raw", metadata={})
    download.python_func(raw=raw, work_uri=work, source=source, source_endpoint_url="", source_auth="unsigned",
                         **kw)
    return raw


def _split(tmp_path: Path, raw: dsl.Dataset, work: str, run_id: str, name: str, **kw) -> dsl.Dataset:
    shards = dsl.Dataset(uri=str(tmp_path / name), name="shards", metadata={})
    split.python_func(raw=raw, shards=shards, work_uri=work, run_id=run_id, short_side=64, shard_size=50, processes=1,
                      **kw)
    return shards


def test_reruns_reuse_the_download_and_the_split_and_selections_stay_apart(tmp_path, synthetic_abid, capsys):
    work = str(tmp_path / "work")
    first = _download(tmp_path, work, synthetic_abid, "raw1", limit=60)
    shards1 = _split(tmp_path, first, work, "run-1", "shards1")
    manifest_file = Path(first.metadata["manifest"])
    assert manifest_file.parent == Path(work, "abid") and manifest_file.name.startswith("manifest-")
    written = {p: p.stat().st_mtime_ns for p in Path(shards1.metadata["uri"]).rglob("*") if p.is_file()}
    capsys.readouterr()

    # Same selection, same settings: nothing downloaded, nothing re-sharded.
    again = _download(tmp_path, work, synthetic_abid, "raw2", limit=60)
    shards2 = _split(tmp_path, again, work, "run-2", "shards2")
    out = capsys.readouterr().out
    assert "reusing the download of this selection" in out and "reusing the split" in out
    assert again.metadata["manifest"] == first.metadata["manifest"]
    assert shards2.metadata["uri"] == shards1.metadata["uri"]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # untouched

    # Another selection has its own manifest: the first run's is not rewritten.
    before = manifest_file.read_bytes()
    other = _download(tmp_path, work, synthetic_abid, "raw3", limit=30)
    assert other.metadata["manifest"] != first.metadata["manifest"] and other.metadata["selected"] == 30
    assert manifest_file.read_bytes() == before
    shards3 = _split(tmp_path, other, work, "run-3", "shards3")
    assert shards3.metadata["uri"] != shards1.metadata["uri"] and sum(shards3.metadata["samples"].values()) == 30

    # Each run records which split it used; `bincounter runs` reads it.
    assert json.loads(Path(work, "runs", "run-2", "split.json").read_text()) == {"uri": shards1.metadata["uri"]}
    assert runs.show_run(work, "run-3")["split_uri"] == shards3.metadata["uri"]


def test_split_uri_starts_from_an_existing_split(tmp_path, synthetic_split, capsys):
    work = str(tmp_path / "work")
    raw = _download(tmp_path, work, "/nonexistent-source", "raw", split_uri=synthetic_split)
    assert not Path(work, "abid").exists()  # nothing downloaded: the source is not even looked at
    shards = _split(tmp_path, raw, work, "run-x", "shards")
    assert shards.metadata["uri"] == synthetic_split
    assert Path(shards.path, "manifest.json").is_file()
    assert "using the existing split" in capsys.readouterr().out


def test_the_old_download_workers_parameter_still_sets_the_concurrency(tmp_path, synthetic_abid, capsys):
    import yaml

    from bincounter.data import download as download_lib

    work = str(tmp_path / "work")
    raw = _download(tmp_path, work, synthetic_abid, "raw1", limit=10, concurrency=5)
    assert json.loads(Path(raw.path, download_lib.SUMMARY).read_text())["workers"] == 5
    assert "deprecated" not in capsys.readouterr().out

    raw = _download(tmp_path, work, synthetic_abid, "raw2", limit=12, concurrency=5, deprecated_workers=3)
    assert json.loads(Path(raw.path, download_lib.SUMMARY).read_text())["workers"] == 3
    assert "download_workers is deprecated and goes in the next release; use download_concurrency" \
        in capsys.readouterr().out

    # pipeline.yaml hands both pipeline parameters to the step, the old one unset (0) by default.
    spec = next(yaml.safe_load_all(Path(__file__).resolve().parents[1].joinpath("pipeline.yaml").read_text()))
    [inputs] = [c["dag"]["tasks"]["download"]["inputs"]["parameters"] for c in spec["components"].values()
                if "download" in c.get("dag", {}).get("tasks", {})]
    assert inputs["concurrency"]["componentInputParameter"] == "pipelinechannel--download_concurrency"
    assert inputs["deprecated_workers"]["componentInputParameter"] == "pipelinechannel--download_workers"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["download_workers"]["defaultValue"] == 0 and params["download_concurrency"]["defaultValue"] == 32
