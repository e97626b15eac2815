"""The chain on real bins: tests/data/abid-dev (280 real ABID bins, see its README) from a local S3
endpoint (moto server) -> download -> split -> train a tiny model -> evaluate.

Far too small to measure the recipe (docs/training.md, "The real development set"): the test
checks that every step runs on real photos (portrait and landscape, 300-1000 px, counts far above
5 mapped to "5+") and that the numbers it reports are consistent; it prints accuracy and RMSE
beside the majority class's, which the docs record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bincounter import evaluate as ev
from bincounter import storage
from bincounter import train as tr
from bincounter.data import shards
from bincounter.data.download import download
from bincounter.data.split import split

DEV = Path(__file__).parent / "data" / "abid-dev"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def majority_baseline(class_counts: dict[str, int]) -> tuple[float, float]:
    """Accuracy and RMSE of always answering the most frequent class (counts as class indices)."""
    total = sum(class_counts.values())
    top = max(class_counts, key=class_counts.get)
    rmse = (sum(n * (int(c) - int(top)) ** 2 for c, n in class_counts.items()) / total) ** 0.5
    return class_counts[top] / total, rmse


def test_real_bins_download_split_train_evaluate(s3_bucket, tmp_path):
    for rel, _ in storage.list_files(str(DEV)):
        if rel.startswith(("bin-images/", "metadata/")):
            storage.upload_file(DEV / rel, f"s3://{s3_bucket}/{rel}")
    summary = download(dest=str(tmp_path / "abid"), source=f"s3://{s3_bucket}", workers=4, progress=False)
    assert summary["selected"] == 280 and summary["skipped"] == 19, summary  # metadata without an image: reported

    manifest = split(str(tmp_path / "abid"), out=str(tmp_path / "split"), val=0.2, test=0.2, seed=0,
                     short_side=80, shard_size=40)
    assert sum(s["samples"] for s in manifest["splits"].values()) == 280

    final = tr.train(data=str(tmp_path / "split"), output=str(tmp_path / "model"), arch="resnet18", pretrained="",
                     input_size=64, epochs=2, batch_size=32, lr=2e-3, workers=0, device="cpu", max_count=5,
                     k_or_more=True)
    assert final["train-samples"] == manifest["splits"]["train"]["samples"]  # bins above 5 kept as "5+"

    metrics = ev.evaluate(str(tmp_path / "model"), str(tmp_path / "split"), split="test",
                          output=str(tmp_path / "eval"), workers=0, device="cpu")
    test_counts = {str(min(int(c), 5)): 0 for c in manifest["splits"]["test"]["class_counts"]}
    for c, n in manifest["splits"]["test"]["class_counts"].items():
        test_counts[str(min(int(c), 5))] += n
    assert metrics["samples"] == sum(test_counts.values()) == manifest["splits"]["test"]["samples"]
    assert [row["support"] for row in metrics["per_class"]] == [test_counts.get(str(k), 0) for k in range(6)]
    assert metrics["class_names"][-1] == "5+" and metrics["decoding"] in metrics["decodings"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["decoding"] == metrics["decoding"] and config["checkpoint"]["epoch"] in (1, 2)
    assert shards.read_manifest(str(tmp_path / "split"))["short_side"] == 80
    acc, rmse = majority_baseline(test_counts)
    print(f"abid-dev test ({metrics['samples']} bins): accuracy {metrics['accuracy']:.3f} rmse {metrics['rmse']:.3f}"
          f" ({metrics['decoding']}); majority class accuracy {acc:.3f} rmse {rmse:.3f}; "
          + ", ".join(f"{m} acc {d['accuracy']:.3f} rmse {d['rmse']:.3f}" for m, d in metrics["decodings"].items()))
