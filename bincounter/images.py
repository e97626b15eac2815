"""Container image names, defined once.

The pipeline (``pipeline.py`` -> ``pipeline.yaml``), the manifests and the
launchers take image references from here; ``make images REGISTRY=... TAG=...``
builds exactly these. ``BINCOUNTER_REGISTRY`` and ``BINCOUNTER_TAG`` override the
defaults, so one TAG changes them all.
"""

from __future__ import annotations

import os

DEFAULT_REGISTRY = "ghcr.io/bincounter"
DEFAULT_TAG = "0.1.0"

# role -> (repository name, Dockerfile under images/)
IMAGES: dict[str, tuple[str, str]] = {
    "trainer": ("bincounter-trainer", "images/trainer/Dockerfile"),
    "pipeline": ("bincounter-pipeline", "images/pipeline/Dockerfile"),
    "server": ("bincounter-server", "images/server/Dockerfile"),
}


def registry() -> str:
    return os.environ.get("BINCOUNTER_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def tag() -> str:
    return os.environ.get("BINCOUNTER_TAG", DEFAULT_TAG)


def image(role: str, *, registry_: str | None = None, tag_: str | None = None) -> str:
    """Full reference of one project image, e.g. ``ghcr.io/bincounter/bincounter-trainer:0.1.0``."""
    if role not in IMAGES:
        raise KeyError(f"Unknown image role {role!r}. Only {', '.join(IMAGES)} are defined.")
    return f"{registry_ or registry()}/{IMAGES[role][0]}:{tag_ or tag()}"
