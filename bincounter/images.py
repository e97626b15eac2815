"""Container image names, defined once.

The pipeline (``pipeline.py`` -> ``pipeline.yaml``), the manifests and the
launchers take image references from here; ``make images REGISTRY=... TAG=...``
builds exactly these (the Makefile asks this module for every name). ``BINCOUNTER_REGISTRY``
and ``BINCOUNTER_TAG`` override the defaults, so one TAG changes them all.

``python -m bincounter.images list`` prints role, reference and Dockerfile of each image;
``python -m bincounter.images ref ROLE [--registry R] [--tag T]`` prints one reference.
docs/images.md explains how to build, push and ship a new tag.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

DEFAULT_REGISTRY = "ghcr.io/bincounter"
# The image tag is the version of the package inside it (tests/test_images.py checks they agree).
DEFAULT_TAG = "0.1.0"

# role -> (repository name, Dockerfile under images/)
IMAGES: dict[str, tuple[str, str]] = {
    "trainer": ("bincounter-trainer", "images/trainer/Dockerfile"),
    "pipeline": ("bincounter-pipeline", "images/pipeline/Dockerfile"),
    "server": ("bincounter-server", "images/server/Dockerfile"),
}

# role -> the modules its containers run. tests/test_images.py imports each one with only the
# packages that image installs, so a missing dependency fails in CI rather than on the cluster.
# The pipeline image also runs every KFP component under components/ (the test finds them).
ENTRYPOINT_MODULES: dict[str, tuple[str, ...]] = {
    # PyTorchJob, TrainJob and Katib trials: `torchrun -m bincounter.train` or `bincounter train`.
    "trainer": ("bincounter.cli", "bincounter.train", "bincounter.evaluate"),
    # KFP runs each component's source with `python3 -m kfp.dsl.executor_main`.
    "pipeline": ("bincounter.cli", "kfp.dsl.executor_main"),
    # The InferenceService predictor: `bincounter serve --model /mnt/models ...`.
    "server": ("bincounter.cli", "bincounter.serving.server"),
}

# Docker's grammar for a tag; a registry is a host[:port] with an optional path.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REGISTRY_RE = re.compile(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*")


def registry() -> str:
    return os.environ.get("BINCOUNTER_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def tag() -> str:
    return os.environ.get("BINCOUNTER_TAG", DEFAULT_TAG)


def image(role: str, *, registry_: str | None = None, tag_: str | None = None) -> str:
    """Full reference of one project image, e.g. ``ghcr.io/bincounter/bincounter-trainer:0.1.0``."""
    if role not in IMAGES:
        raise KeyError(f"Unknown image role {role!r}. Only {', '.join(IMAGES)} are defined.")
    reg = (registry_ or registry()).rstrip("/")
    tg = tag_ or tag()
    if not _REGISTRY_RE.fullmatch(reg):
        raise ValueError(f"Invalid image registry {reg!r} (BINCOUNTER_REGISTRY or REGISTRY): "
                         "expected host[:port][/path] in lower case, e.g. ghcr.io/acme.")
    if not _TAG_RE.fullmatch(tg):
        raise ValueError(f"Invalid image tag {tg!r} (BINCOUNTER_TAG or TAG): up to 128 letters, digits, "
                         "'_', '.' or '-', not starting with '.' or '-'.")
    return f"{reg}/{IMAGES[role][0]}:{tg}"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print the project's image references.", add_help=add_help)
    parser.add_argument("what", choices=["list", "ref", "dockerfile", "roles"],
                        help="list: role, reference and Dockerfile per line; ref/dockerfile: of ROLE; roles: the roles")
    parser.add_argument("role", nargs="?", choices=list(IMAGES), help="image role, for ref and dockerfile")
    parser.add_argument("--registry", default=None,
                        help="registry (default: $BINCOUNTER_REGISTRY or %s)" % DEFAULT_REGISTRY)
    parser.add_argument("--tag", default=None, help="tag (default: $BINCOUNTER_TAG or %s)" % DEFAULT_TAG)
    parser.add_argument("--format", choices=["text", "make"], default="text",
                        help="list format: text (default) or make (role=reference=Dockerfile words, for the Makefile)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.what in ("ref", "dockerfile") and args.role is None:
        raise SystemExit(f"'{args.what}' needs a ROLE: one of {', '.join(IMAGES)}.")
    if args.what == "roles":
        print(" ".join(IMAGES))
    elif args.what == "dockerfile":
        print(IMAGES[args.role][1])
    elif args.what == "ref":
        print(image(args.role, registry_=args.registry, tag_=args.tag))
    else:
        sep = "=" if args.format == "make" else " "
        for role, (_, dockerfile) in IMAGES.items():
            print(role, image(role, registry_=args.registry, tag_=args.tag), dockerfile, sep=sep)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except ValueError as e:  # a bad REGISTRY or TAG: say which, without a traceback
        sys.exit(f"error: {e}")
