"""The ``bincounter`` command: one subcommand per stage.

Each subcommand lives in its own module, which exposes ``get_args_parser(add_help)``
and ``main(args)`` (the torchvision-recipe shape). Modules are imported only when
their subcommand runs, so ``bincounter download`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Add a stage here and nowhere else.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("bincounter.data.synth", "write synthetic bin images in the ABID layout"),
    "download": ("bincounter.data.download", "download ABID images and metadata from S3"),
    "split": ("bincounter.data.split", "split a download into train/val/test WebDataset shards"),
    "train": ("bincounter.train", "train the counting model (run under torchrun for DDP)"),
    "evaluate": ("bincounter.evaluate", "evaluate a trained model on test shards"),
    "audit": ("bincounter.audit.cli", "flag bins whose photo disagrees with the expected quantity"),
    "serve": ("bincounter.serving.server", "serve a model folder with the KServe model server"),
    "predict": ("bincounter.serving.client", "query a served model with images"),
    "tune": ("bincounter.engines.local", "tune hyperparameters locally with optuna"),
    "k8s": ("bincounter.k8s.cli", "run training, tuning or deployment on a Kubernetes cluster"),
    "submit": ("bincounter.submit", "upload the pipeline to Kubeflow Pipelines and start a run"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="bincounter", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv[:1] or ["--help"])  # prints help, or the valid choices, and exits
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    parser = module.get_args_parser(add_help=True)
    parser.prog = f"bincounter {argv[0]}"
    result = module.main(parser.parse_args(argv[1:]))
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
