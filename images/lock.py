"""Write images/constraints.txt: the exact version of every package any image installs.

Every Dockerfile installs with ``--constraint images/constraints.txt``, so an image gets the
versions the project's tests ran with, whenever it is built. The lock is resolved with uv for the
images' platform (Linux x86_64, Python 3.11) from pyproject.toml with every image's extra, preferring
the versions installed in the project's .venv (the tested ones). Run it after changing dependencies:

    .venv/bin/python images/lock.py

tests/test_images.py fails when an image would install a package this file does not pin.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "images" / "constraints.txt"
# The extras the Dockerfiles install.
IMAGE_EXTRAS = ("train", "serve", "pipeline")
PLATFORM = "x86_64-manylinux_2_28"  # python:3.11-slim-bookworm has glibc 2.36


def installed_pins() -> str:
    """name==version of every distribution in this environment, except the project itself."""
    pins = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    pins.pop("bincounter", None)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    uv = Path(sys.executable).with_name("uv")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as tested:
        tested.write(installed_pins())
        tested.flush()
        cmd = [str(uv), "pip", "compile", "pyproject.toml", *[f"--extra={e}" for e in IMAGE_EXTRAS],
               "--constraint", tested.name, "--python-version", "3.11", "--python-platform", PLATFORM,
               "--no-annotate", "--quiet", "--custom-compile-command", ".venv/bin/python images/lock.py",
               "--output-file", str(OUT.relative_to(ROOT))]
        subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
