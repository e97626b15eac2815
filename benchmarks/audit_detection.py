"""Measure how well the audit finds wrong expected quantities; figures for docs/audit.md.

For each dataset: split it, train a small model (``--k-or-more``, so every bin can be judged; the
temperature is fitted on val at the end of training), then audit the TEST split with
``--inject-discrepancies F`` for several seeds (each seed alters a different F of the bins by
+-1..3) and report precision/recall/F1 at the model's threshold and at the threshold chosen on
val for ``--target-precision``, AUROC and precision at the top 1% / 5%, mean and spread over seeds.

- ``synthetic``: ``bincounter synth`` bins (counts 0..5).
- ``abid-dev``: the 280 real bins of /work/shared/abid-dev (a measurement script may read
  /work/shared; tests may not). Far too few to train a good counter: the figure says how the
  audit behaves with a weak model on real photos, not what a production model achieves.

    .venv/bin/python benchmarks/audit_detection.py --out /tmp/audit-detection   # prints Markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABID_DEV = Path("/work/shared/abid-dev")
CLI = [sys.executable, "-m", "bincounter.cli"]
KEYS = ("precision", "recall", "f1", "auroc", "precision_at_1pct", "precision_at_5pct")


class Failed(RuntimeError):
    pass


def run(*args: str) -> str:
    out = subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise Failed(f"{' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def prepare(name: str, source: str, work: Path, input_size: int, epochs: int) -> tuple[str, str]:
    split, model = work / name / "split", work / name / "model"
    if not (split / "manifest.json").exists():
        run("split", source, "--output", str(split), "--val", "0.15", "--test", "0.2", "--seed", "0",
            "--short-side", str(max(96, input_size)), "--shard-size", "100")
    if not (model / "config.json").exists():
        run("train", "--data", str(split), "--output", str(model), "--arch", "resnet18", "--pretrained", "",
            "--k-or-more", "--max-count", "5", "--epochs", str(epochs), "--batch-size", "16",
            "--input-size", str(input_size), "--workers", "0", "--warmup-epochs", "0.5")
    return str(split), str(model)


def audit(split: str, model: str, out: Path, fraction: float, seed: int, target: float | None) -> dict | None:
    """The audit's summary, or None when no threshold reaches ``target`` on val (tiny val splits)."""
    args = ["audit", "--model", model, "--source", split, "--split", "test", "--output", str(out),
            "--inject-discrepancies", str(fraction), "--seed", str(seed), "--no-progress"]
    if target:
        args += ["--target-precision", str(target), "--validation", split]
    try:
        run(*args)
    except Failed as e:
        if "No threshold reaches precision" in str(e):
            return None
        raise
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/audit-detection")
    p.add_argument("--datasets", nargs="+", default=["synthetic", "abid-dev"])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target-precision", type=float, default=0.5)
    p.add_argument("--synthetic-images", type=int, default=600)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--input-size", type=int, default=64)
    args = p.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.datasets:
        if name == "synthetic":
            source = work / "synthetic" / "abid"
            if not (source / "metadata").exists():
                run("synth", "--output", str(source), "--images", str(args.synthetic_images), "--max-count", "5", "--seed", "0")
            split, model = prepare(name, str(source), work, input_size=args.input_size, epochs=args.epochs)
        else:
            split, model = prepare(name, str(ABID_DEV), work, input_size=args.input_size, epochs=args.epochs)
        config = json.loads((Path(model) / "config.json").read_text())
        cal = config.get("calibration") or {}
        for target in (None, args.target_precision):
            tried = [audit(split, model, work / name / f"audit-{'tp' if target else 'th'}-{s}", args.fraction, s,
                           target) for s in range(args.seeds)]
            rows = [r for r in tried if r is not None]
            if not rows:
                lines.append(f"| {name} | | | precision >= {target} reached on val for no seed | | | | | | |")
                continue
            det = [r["detection"] for r in rows]
            label = (f"chosen on val for precision >= {target} ({len(rows)} of {len(tried)} seeds reached it)"
                     if target else f"model threshold {rows[0]['threshold']:g}")
            cells = []
            for k in ("precision", "recall", "f1", "auroc", "precision_at_1pct", "precision_at_5pct"):
                vals = [d[k] for d in det if d[k] is not None]
                cells.append(f"{statistics.mean(vals):.3f} +- {statistics.pstdev(vals):.3f}" if vals else "n/a")
            lines.append(f"| {name} | {rows[0]['bins']} | {statistics.mean(d['discrepant'] for d in det):.1f} | "
                         f"{label} (mean {statistics.mean(r['threshold'] for r in rows):.3f}) | " + " | ".join(cells)
                         + " |")
        metrics = json.loads((Path(model) / "metrics.json").read_text()) if (Path(model) / "metrics.json").exists() else {}
        best = metrics.get("best") or metrics.get("final") or {}
        print(f"{name}: val-accuracy={best.get('val-accuracy')} temperature={config.get('temperature')} "
              f"ece {cal.get('ece_before')} -> {cal.get('ece_after')} (val, {cal.get('samples')} bins)", flush=True)
    header = ["| data | test bins | discrepant (mean) | threshold | precision | recall | F1 | AUROC | "
              "precision top 1% | precision top 5% |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
