"""Softmax head vs ordinal head, on synthetic bins and on the real development set (tests/data/abid-dev).

For each data set: one split, then the same training run (same seed, data order, schedule)
with ``--head softmax`` and ``--head ordinal``, each evaluated on the test split with all
three decodings. Tiny settings (ResNet-18 from scratch, 64 px) so it runs on a CPU in minutes;
it compares the heads at that scale only. Writes a Markdown table (``--output``) and prints it.

    python benchmarks/compare_heads.py --epochs 8 --output /tmp/heads.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bincounter import evaluate as ev
from bincounter import train as tr
from bincounter.data.download import download
from bincounter.data.split import split
from bincounter.data.synth import synthesize

DEV = Path(__file__).resolve().parents[1] / "tests" / "data" / "abid-dev"


def datasets(tmp: str, synthetic_images: int) -> dict[str, str]:
    synthesize(f"{tmp}/synth", images=synthetic_images, max_count=5, seed=0)
    split(f"{tmp}/synth", out=f"{tmp}/synth-split", val=0.15, test=0.15, seed=0, short_side=80, shard_size=40)
    download(dest=f"{tmp}/dev", source=str(DEV), workers=4, progress=False)
    split(f"{tmp}/dev", out=f"{tmp}/dev-split", val=0.2, test=0.2, seed=0, short_side=80, shard_size=40)
    return {f"synthetic ({synthetic_images} bins)": f"{tmp}/synth-split", "abid-dev (280 real bins)": f"{tmp}/dev-split"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--synthetic-images", type=int, default=240)
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="compare-heads-")
    lines = ["| data | head | decoding | test accuracy | test RMSE |", "|---|---|---|---|---|"]
    for name, data in datasets(tmp, args.synthetic_images).items():
        for head in ("softmax", "ordinal"):
            out = f"{tmp}/{head}-{abs(hash(name))}"
            tr.train(data=data, output=out, arch="resnet18", pretrained="", input_size=64, epochs=args.epochs,
                     batch_size=32, lr=2e-3, workers=0, device="cpu", head=head, seed=0)
            m = ev.evaluate(out, data, split="test", workers=0, device="cpu")
            for method, d in m["decodings"].items():
                mark = " (chosen on val)" if method == m["decoding"] else ""
                lines.append(f"| {name} | {head} | {method}{mark} | {d['accuracy']:.3f} | {d['rmse']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
