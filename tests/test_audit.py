"""`bincounter audit` end to end on real ABID photos (tests/data/abid-sample) and synthetic bins:
the table's numbers against a forward pass done here, bad records, the report, resuming after a
SIGKILL, parts + merge (the Indexed Job's shape), an S3 source and output (moto server), and the
calibration that training, evaluation and the audit share.

The model folders are randomly initialised ResNet-18s at 32 px: the audit's arithmetic does not
depend on how well the model counts, and they cost nothing to build.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bincounter import calibration, storage
from bincounter import evaluate as ev
from bincounter import model as model_lib
from bincounter import presets
from bincounter.audit import cli as audit_cli
from bincounter.audit import core
from bincounter.serving.inference import decode_image

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = 1.7
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(path: Path, k_or_more: bool, temperature: float = TEMPERATURE, max_count: int = 5,
               decoding: str = "argmax") -> str:
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig(arch="resnet18", max_count=max_count, k_or_more=k_or_more, input_size=32,
                                resize_size=36, temperature=temperature, audit_threshold=0.15, decoding=decoding)
    rng = np.random.default_rng(0)  # a calibration record as training writes it (its reliability tables)
    cfg.calibration = calibration.calibrate(rng.normal(size=(50, 6)), rng.integers(0, 6, 50))
    cfg.calibration["temperature"] = temperature
    model_lib.save_model_dir(model_lib.build_model("resnet18", cfg.num_classes), cfg, str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # "median": predicted_count must follow the model's decoding, not a plain argmax.
    return make_model(tmp_path_factory.mktemp("audit-model"), k_or_more=True, decoding="median")


@pytest.fixture(scope="module")
def real_abid(sample_dir, tmp_path_factory) -> Path:
    """The 31 real ABID bins in the bucket layout, plus one bad record of each kind."""
    root = tmp_path_factory.mktemp("real-abid")
    (root / "bin-images").mkdir()
    (root / "metadata").mkdir()
    for jpg in sorted(sample_dir.glob("*.jpg")):
        shutil.copy(jpg, root / "bin-images" / jpg.name)
        shutil.copy(jpg.with_suffix(".json"), root / "metadata" / f"{jpg.stem}.json")
    good = (sample_dir / "00004.jpg").read_bytes()
    (root / "bin-images" / "90001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "metadata" / "90001.json").write_text('{"EXPECTED_QUANTITY": 2}')
    (root / "bin-images" / "90002.jpg").write_bytes(good)
    (root / "metadata" / "90002.json").write_text("{not json")
    (root / "metadata" / "90003.json").write_text('{"EXPECTED_QUANTITY": 1}')  # no image
    (root / "bin-images" / "90004.jpg").write_bytes(good)  # no metadata
    (root / "bin-images" / "90005.jpg").write_bytes(good)
    (root / "metadata" / "90005.json").write_text('{"EXPECTED_QUANTITY": -1}')
    return root


def run_audit(**kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("workers", 2)
    kw.setdefault("batch_size", 8)
    kw.setdefault("device", "cpu")
    return audit_cli.audit(**kw)


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(str(path)).decode())))


@pytest.fixture(scope="module")
def real_audit(model_dir, real_abid, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("audit-out")
    return out, run_audit(model=model_dir, source=str(real_abid), output=str(out), chunk_size=8)


def by_hand(model_dir: str, root: Path, ids: list[str]) -> dict[str, np.ndarray]:
    net, cfg = model_lib.load_model_dir(model_dir)
    tf = presets.eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std)
    out = {}
    with torch.inference_mode():
        for i in ids:
            # Decoded as serving decodes (its guarded decoder, JPEG draft to twice the resize).
            x = tf(decode_image((root / "bin-images" / f"{i}.jpg").read_bytes(), draft_size=2 * cfg.resize_size))[None]
            out[i] = torch.softmax(net(x) / cfg.temperature, dim=1)[0].numpy()
    return out


def test_table_matches_a_forward_pass_done_by_hand(real_audit, model_dir, real_abid):
    out, summary = real_audit
    rows = read_csv(out / "audit.csv")
    assert list(rows[0]) == list(core.CSV_COLUMNS)
    assert len(rows) == summary["bins"] == 31
    probs = by_hand(model_dir, real_abid, [r["id"] for r in rows])
    jsonl = {j["id"]: j for j in map(json.loads, (out / "audit.jsonl").read_text().splitlines())}
    for r in rows:
        meta = json.loads((real_abid / "metadata" / f"{r['id']}.json").read_text())
        assert int(r["expected_quantity"]) == meta["EXPECTED_QUANTITY"]
        p = probs[r["id"]]
        k = min(meta["EXPECTED_QUANTITY"], 5)  # "5 or more" is one class for this k_or_more model
        assert float(r["p_expected"]) == pytest.approx(p[k], abs=1e-4)
        assert int(r["predicted_count"]) == int(model_lib.decode(torch.tensor(p)[None], "median")[0])
        assert r["flagged"] == ("true" if float(r["p_expected"]) < 0.15 else "false")  # the model's threshold
        assert jsonl[r["id"]]["probabilities"] == pytest.approx(p.tolist(), abs=1e-4)
    assert summary["flagged"] == sum(r["flagged"] == "true" for r in rows)
    assert summary["threshold"] == 0.15


def test_bad_records_are_skipped_with_their_reason(real_audit):
    out, summary = real_audit
    skipped = {s["id"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert skipped == {"90001": "unreadable_jpeg", "90002": "bad_json", "90003": "metadata_without_image",
                       "90004": "image_without_metadata", "90005": "negative_count"}
    assert summary["skipped_by_reason"] == {"bad_json": 1, "image_without_metadata": 1, "metadata_without_image": 1,
                                            "negative_count": 1, "unreadable_jpeg": 1}


def test_report_has_counts_thumbnails_distribution_and_reliability(real_audit):
    out, summary = real_audit
    md = (out / "audit.md").read_text()
    assert f"**{summary['flagged']} of 31 bins flagged**" in md
    thumbs = sorted((out / "thumbnails").glob("*.jpg"))
    assert thumbs and all(f"thumbnails/{t.name}" in md for t in thumbs)
    assert Image.open(thumbs[0]).size[0] <= core.THUMBNAIL_SIZE
    # The most suspicious bin of the whole table is the first one shown.
    lowest = min(read_csv(out / "audit.csv"), key=lambda r: float(r["p_expected"]))
    assert md.index(f"| {lowest['id']} |") < min(md.index(f"| {t.stem} |") for t in thumbs if t.stem != lowest["id"])
    for png in ("p_expected.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md
    assert "precision_recall.png" not in md  # no truth known without injected discrepancies
    page = (out / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(thumbs) and "data:image/png;base64," in page
    assert "thumbnails/" not in page.replace('alt="', "")  # self-contained: nothing points at a file
    assert sum(summary["p_expected_histogram"]) == 31


def test_model_without_k_or_more_skips_bins_above_k(real_abid, tmp_path):
    model = make_model(tmp_path / "model", k_or_more=False)
    summary = run_audit(model=model, source=str(real_abid), output=str(tmp_path / "out"), chunk_size=64)
    counts = [json.loads(p.read_text())["EXPECTED_QUANTITY"] for p in (real_abid / "metadata").glob("*.json")
              if not p.stem.startswith("9")]  # the real bins (the 9xxxx ones are the bad records)
    above = sum(c > 5 for c in counts)
    assert above > 0
    assert summary["skipped_by_reason"][core.BEYOND_MODEL_RANGE] == above
    assert summary["bins"] == 31 - above


def test_injected_discrepancies_give_detection_figures(model_dir, synthetic_split, tmp_path):
    out = tmp_path / "out"
    summary = run_audit(model=model_dir, source=synthetic_split, split="test", output=str(out),
                        inject_discrepancies=0.3, seed=3, threshold=0.2)
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    injected = [r for r in rows if r["injected"]]
    assert injected and all(r["expected_quantity"] != r["original_expected_quantity"] for r in injected)
    det = summary["detection"]
    p = np.array([r["p_expected"] for r in rows])
    truth = np.array([r["injected"] for r in rows])
    tp = int(((p < 0.2) & truth).sum())
    assert det["true_positives"] == tp and det["discrepant"] == len(injected)
    assert det["recall"] == pytest.approx(tp / len(injected))
    assert 0 <= det["auroc"] <= 1
    assert (out / "precision_recall.png").exists()
    assert "audit-precision=" in audit_cli.summary_line(summary)


def test_target_precision_threshold_is_chosen_on_validation(model_dir, synthetic_split, tmp_path):
    from bincounter.audit import metrics

    out = tmp_path / "out"
    summary = run_audit(model=model_dir, source=synthetic_split, split="test", output=str(out),
                        target_precision=0.2, validation=synthetic_split, inject_discrepancies=0.3, seed=1)
    choice = summary["threshold_choice"]
    val = [json.loads(c.read_text()) for c in sorted((out / "validation" / "chunks").glob("*.json"))]
    rows = [r for c in val for r in c["rows"]]
    best = metrics.threshold_for_precision([r["p_expected"] for r in rows], [r["injected"] for r in rows], 0.2)
    assert summary["threshold"] == choice["threshold"] == best["threshold"]
    assert choice["precision"] >= 0.2
    with pytest.raises(core.AuditError, match="needs --validation"):
        run_audit(model=model_dir, source=synthetic_split, split="test", output=str(tmp_path / "x"),
                  target_precision=0.5)


def test_parts_then_merge_equal_one_run(model_dir, real_abid, real_audit, tmp_path):
    out = tmp_path / "parts"
    for part in range(3):
        stats = run_audit(model=model_dir, source=str(real_abid), output=str(out), chunk_size=8, parts=3, part=part,
                          score_only=True)
        assert stats["part_chunks"] == len(range(part, 5, 3))  # 36 ids in chunks of 8: 5 chunks
    summary = run_audit(model=model_dir, source=str(real_abid), output=str(out), chunk_size=8, merge_only=True)
    assert (out / "audit.csv").read_text() == (real_audit[0] / "audit.csv").read_text()
    assert summary["skipped"] == 5


def test_merge_refuses_when_a_part_is_missing(model_dir, real_abid, tmp_path):
    out = tmp_path / "out"
    run_audit(model=model_dir, source=str(real_abid), output=str(out), chunk_size=8, parts=2, part=0,
              score_only=True)
    with pytest.raises(core.AuditError, match="2 of 5 chunks are not scored"):
        run_audit(model=model_dir, source=str(real_abid), output=str(out), chunk_size=8, merge_only=True)
    assert not (out / "audit.csv").exists()


def test_rerun_with_other_settings_is_refused(model_dir, real_abid, real_audit):
    with pytest.raises(core.AuditError, match="chunk_size: 8 there, 4 now"):
        run_audit(model=model_dir, source=str(real_abid), output=str(real_audit[0]), chunk_size=4)


def test_killed_run_resumes_without_partial_files(model_dir, synthetic_abid, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bincounter.cli", "audit", "--model", model_dir, "--source", synthetic_abid,
           "--output", str(out), "--chunk-size", "4", "--limit", "60", "--concurrency", "1", "--batch-size", "2",
           "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread: the tests share 2 cores
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "chunks" / "chunk-000002.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the audit ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.json")}
    assert 3 <= len(done) < 15  # killed mid-run: 60 bins are 15 chunks
    assert not (out / "audit.csv").exists() and not (out / "summary.json").exists()
    for name in done:
        json.loads((out / "chunks" / name).read_text())  # every chunk file that exists is complete

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "audit-bins=60" in rerun.stdout
    assert all((out / "chunks" / n).stat().st_mtime_ns == t for n, t in done.items())  # not scored again
    rows = read_csv(out / "audit.csv")
    assert [r["id"] for r in rows] == sorted(p.stem for p in Path(synthetic_abid, "bin-images").glob("*.jpg"))[:60]


def test_s3_source_and_output(model_dir, real_abid, real_audit, s3_bucket):
    ids = sorted(p.stem for p in (real_abid / "bin-images").glob("0*.jpg"))[:6]
    for i in ids:
        for sub, ext in (("bin-images", "jpg"), ("metadata", "json")):
            storage.write_bytes(f"s3://{s3_bucket}/abid/{sub}/{i}.{ext}", (real_abid / sub / f"{i}.{ext}").read_bytes())
    out = f"s3://{s3_bucket}/audit"
    summary = run_audit(model=model_dir, source=f"s3://{s3_bucket}/abid", output=out, chunk_size=4)
    assert summary["bins"] == 6
    local = {r["id"]: r for r in read_csv(real_audit[0] / "audit.csv")}
    assert read_csv(out + "/audit.csv") == [local[i] for i in ids]
    assert storage.exists(out + "/audit.html") and storage.exists(out + "/chunks/chunk-000001.json")


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    args = audit_cli.get_args_parser().parse_args(["--model", model_dir, "--source", str(tmp_path),
                                                   "--output", str(tmp_path / "out"), "--no-progress"])
    assert audit_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no bin-images" in err


# ---------------------------------------------------------------- calibration in training and evaluation

def test_evaluate_reports_ece_before_and_after_the_temperature(synthetic_split, tmp_path):
    model = make_model(tmp_path / "model", k_or_more=True, temperature=3.0)
    metrics = ev.evaluate(model, synthetic_split, "test", output=str(tmp_path / "eval"), batch_size=16, workers=0,
                          device="cpu")
    net, cfg = model_lib.load_model_dir(model)
    tf = presets.eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std)
    from bincounter.data import shards

    logits, labels = [], []
    with torch.inference_mode():
        for uri in shards.shard_uris(synthetic_split, "test"):
            for s in shards.iter_shard(uri):
                logits.append(net(tf(Image.open(io.BytesIO(s.jpeg)).convert("RGB"))[None])[0].numpy())
                labels.append(min(s.count, 5))
    logits = np.stack(logits)
    assert metrics["ece_uncalibrated"] == pytest.approx(calibration.ece(calibration.softmax(logits), labels), abs=1e-5)
    assert metrics["ece"] == pytest.approx(calibration.ece(calibration.softmax(logits, 3.0), labels), abs=1e-5)
    assert (tmp_path / "eval" / ev.RELIABILITY_PNG).read_bytes()[:4] == b"\x89PNG"


def test_fit_on_split_fits_on_the_whole_split_and_fills_the_config(synthetic_split):
    from bincounter.data import shards

    torch.manual_seed(0)
    net = model_lib.build_model("resnet18", 6)
    cfg = model_lib.ModelConfig(arch="resnet18", input_size=32, resize_size=36, k_or_more=True)
    result = calibration.fit_on_split(cfg, net, synthetic_split, "val", torch.device("cpu"), batch_size=16, workers=0)
    assert cfg.temperature == result["temperature"]
    assert cfg.calibration["samples"] == shards.read_manifest(synthetic_split)["splits"]["val"]["samples"]
    assert result["nll_after"] <= result["nll_before"]
    again = model_lib.ModelConfig.from_dict(json.loads(cfg.to_json()))  # round-trips through config.json
    assert again.temperature == cfg.temperature
    with pytest.raises(ValueError, match="Invalid temperature"):
        model_lib.ModelConfig.from_dict({**json.loads(cfg.to_json()), "temperature": 0})
