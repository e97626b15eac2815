"""Per-image predictions of a model on one split: ``predictions.csv`` and ``mistakes.png``.

``bincounter evaluate --output DIR`` writes both beside ``metrics.json``. The images go
through ``bincounter.serving.inference.Counter``, the model server's own decode and
forward pass, so each row is what the endpoint would answer for that photo. Counts
above the model's K are dropped or mapped to K exactly as evaluation does.
"""

from __future__ import annotations

import csv
import io
from typing import Iterator

from bincounter import plots, storage

PREDICTIONS_CSV = "predictions.csv"
MISTAKES_PNG = "mistakes.png"


def _batches(data: str, split: str, max_count: int, k_or_more: bool, batch_size: int) -> Iterator[list]:
    from bincounter.data import shards

    batch = []
    for uri in shards.shard_uris(data, split):
        for sample in shards.iter_shard(uri):
            if sample.count > max_count and not k_or_more:
                continue
            batch.append((sample.id, min(sample.count, max_count), sample.jpeg))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def predict_split(model_dir: str, data: str, split: str = "test", *, batch_size: int = 64,
                  progress: bool = False) -> tuple[list[dict], list[tuple[str, int, int, bytes]]]:
    """``(rows, mistakes)``: one row per image (id, true and predicted count, confidence,
    probabilities) and the misclassified images as ``(id, true, predicted, jpeg)``."""
    from tqdm import tqdm

    from bincounter.data import shards
    from bincounter.model import load_model_dir
    from bincounter.serving.inference import Counter

    net, cfg = load_model_dir(model_dir)
    counter = Counter(net, cfg)
    total = shards.read_manifest(data)["splits"].get(split, {}).get("samples")
    rows, wrong = [], []
    with tqdm(total=total, unit="img", desc=f"predictions ({split})", disable=not progress) as bar:
        for batch in _batches(data, split, cfg.max_count, cfg.k_or_more, batch_size):
            for (id_, true, jpeg), p in zip(batch, counter.predict([b[2] for b in batch])):
                rows.append({"id": id_, "true_count": true, "predicted_count": p.count,
                             "confidence": round(p.confidence, 4), "correct": int(p.count == true),
                             **{f"p{c}": round(v, 4) for c, v in enumerate(p.probabilities)}})
                if p.count != true and len(wrong) < plots.MISTAKES_SHOWN:
                    wrong.append((id_, true, p.count, jpeg))
            bar.update(len(batch))
    return rows, wrong


def write_predictions(model_dir: str, data: str, output: str, split: str = "test", *, batch_size: int = 64,
                      progress: bool = False) -> dict:
    """Write ``predictions.csv`` and ``mistakes.png`` under ``output``; return their URIs and the counts."""
    rows, wrong = predict_split(model_dir, data, split, batch_size=batch_size, progress=progress)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    csv_uri, png_uri = storage.join(output, PREDICTIONS_CSV), storage.join(output, MISTAKES_PNG)
    storage.write_bytes(csv_uri, buf.getvalue().encode())
    storage.write_bytes(png_uri, plots.mistakes(wrong))
    return {"predictions": csv_uri, "mistakes": png_uri, "images": len(rows),
            "wrong": sum(1 for r in rows if not r["correct"])}
