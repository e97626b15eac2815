"""Estimate each image's uncompressed size without building it (docs/images.md shows the output).

For each Dockerfile: resolve its dependency install as a dry run (as tests/test_images.py does), then
add up the installed size of those packages as they are in the project's .venv (the files listed in
each distribution's RECORD, bytecode included, as UV_COMPILE_BYTECODE=1 writes it in the image).
The CPU images install torch's CPU build, which this machine cannot download: its size is taken as
the CUDA build's minus its CUDA libraries (torch/lib/*cuda*, *nvshmem*), and the nvidia-*, cuda-* and
triton packages only the CUDA build needs are left out. The base image and tini are added as constants.

    .venv/bin/python images/estimate_sizes.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bincounter import images  # noqa: E402

# python:3.11-slim-bookworm unpacked (Docker Hub lists ~45 MB compressed), plus tini and the user.
BASE_MB = 125
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_sizes() -> dict[str, tuple[int, int]]:
    """package -> (bytes installed, bytes of CUDA libraries among them)."""
    sizes = {}
    for dist in metadata.distributions():
        total = cuda = 0
        for f in dist.files or []:
            path = Path(dist.locate_file(f))
            if path.is_file():
                size = path.stat().st_size
                total += size
                if re.search(r"lib/[^/]*(cuda|nvshmem)[^/]*\.so", str(f)):
                    cuda += size
        sizes[norm(dist.metadata["Name"])] = (total, cuda)
    return sizes


def resolved(role: str, python: Path) -> dict[str, str]:
    text = Path(ROOT, images.IMAGES[role][1]).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "uv pip install" in line and CPU_TORCH_INDEX not in line:
            argv = shlex.split(line[line.index("uv pip install"):].split("&&")[0])
            out = subprocess.run([str(Path(sys.executable).with_name("uv")), *argv[1:], "--dry-run", "--python",
                                  str(python)], cwd=ROOT, capture_output=True, text=True, check=True)
            return {norm(n): v for n, v in re.findall(r"^ \+ ([\w.-]+)==(\S+)$", out.stderr + out.stdout, re.M)}
    raise SystemExit(f"{role}: no dependency install found")


def main() -> int:
    sizes = dist_sizes()
    print("| image | packages | Python packages (MB) | of which torch (MB) | estimated image (MB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([str(Path(sys.executable).with_name("uv")), "venv", "-q", "--python", sys.executable,
                        str(venv)], check=True)
        for role in images.IMAGES:
            cpu = CPU_TORCH_INDEX in Path(ROOT, images.IMAGES[role][1]).read_text()
            packages = [p for p in resolved(role, venv / "bin" / "python") if not (cpu and CUDA_ONLY.match(p))]
            total = torch = 0
            for p in packages + ["bincounter"]:
                size, cuda = sizes.get(p, (0, 0))
                size -= cuda if cpu else 0
                total += size
                torch += size if p in ("torch", "torchvision") else 0
            mb = 1 << 20
            print(f"| {role} | {len(packages)} | {total // mb} | {torch // mb} | {BASE_MB + total // mb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
