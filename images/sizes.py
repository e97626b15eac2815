"""Measure the images `make images BUILDER=buildah` built: size, layers, and what fills them (docs/images.md).

    .venv/bin/python images/sizes.py [ROLE=REFERENCE ...] [--markdown]

For each image: its unpacked size (the sum of its layers as buildah stores them), each layer's size
with the instruction that made it, and the share of torch, the CUDA libraries (the nvidia-*/cuda-*
wheels and triton), the bincounter package and the rest, measured on the image's files. It also lists
every CUDA shared library that appears more than once in the image (the trainer's goal: none).
Needs root and buildah.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bincounter import images  # noqa: E402

STORAGE_DRIVER = os.environ.get("BUILDAH_STORAGE_DRIVER", "overlay")
SITE = "opt/venv/lib/python3.11/site-packages"
# distribution folders (and their *.dist-info) per group, under site-packages
GROUPS = {
    "torch": re.compile(r"^(torch|torchvision|torchgen|functorch)([-_.].*)?$"),
    "CUDA libraries": re.compile(r"^(nvidia|nvidia_.*|cuda|cuda_.*|triton)([-_.].*)?$"),
    "bincounter": re.compile(r"^bincounter([-_.].*)?$"),
}
CUDA_LIB = re.compile(r"^lib(cudart|cublas|cublasLt|cudnn.*|nccl|cufft|curand|cusolver|cusparse.*|nvrtc.*|nvJitLink|"
                      r"nvToolsExt|cupti|cufile.*|nvshmem.*|nvidia-ml)\.so")


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", "--storage-driver", STORAGE_DRIVER, *args], check=True, capture_output=True,
                          text=True).stdout


def du(path: Path) -> int:
    """Bytes of the regular files under path (each hard-linked file once), as the layer stores them."""
    total, seen = 0, set()
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def layer_sizes(ref: str) -> list[tuple[int, str]]:
    """(uncompressed size, created_by) for each layer of the image, base first."""
    info = json.loads(buildah("inspect", "--type", "image", ref))
    diff_ids = info["OCIv1"]["rootfs"]["diff_ids"]
    history = [h for h in info["OCIv1"].get("history", []) if not h.get("empty_layer")]
    store = Path("/var/lib/containers/storage") / f"{STORAGE_DRIVER}-layers" / "layers.json"
    by_digest = {layer.get("diff-digest"): layer.get("diff-size", 0) for layer in json.loads(store.read_text())}
    out = []
    for i, digest in enumerate(diff_ids):
        created = history[i].get("created_by", "") if i < len(history) else ""
        if i == 0 and created in ("", "/bin/sh"):  # images/buildah.sh's base (buildah add of a rootfs)
            created = "the base image"
        out.append((by_digest.get(digest, 0), created))
    return out


def contents(ref: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Bytes per group (torch, CUDA libraries, bincounter, other Python packages, the rest), and the CUDA
    shared libraries found in more than one place."""
    ctr = buildah("from", "--pull=never", ref).strip().splitlines()[-1]
    try:
        root = Path(buildah("mount", ctr).strip())
        sizes: dict[str, int] = collections.Counter()
        site = root / SITE
        for entry in site.iterdir():
            group = next((g for g, rx in GROUPS.items() if rx.match(entry.name)), "other Python packages")
            sizes[group] += du(entry) if entry.is_dir() else entry.stat().st_size
        sizes["base and the rest"] = du(root) - sum(sizes.values())
        where: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
        for dirpath, _, files in os.walk(root):
            for f in files:
                path = os.path.join(dirpath, f)
                if CUDA_LIB.match(f) and not os.path.islink(path):
                    where[f.split(".so")[0]][os.path.relpath(dirpath, f"{root}/{SITE}")] += os.path.getsize(path)
        twice = {lib: {d: mb(n) + " MB" for d, n in dirs.items()} for lib, dirs in where.items() if len(dirs) > 1}
        return dict(sizes), twice
    finally:
        buildah("umount", ctr)
        buildah("rm", ctr)


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    refs = {role: images.image(role) for role in images.IMAGES}
    for arg in (a for a in argv if a != "--markdown"):
        role, _, ref = arg.partition("=")
        refs[role] = ref
    for role, ref in refs.items():
        layers = layer_sizes(ref)
        groups, twice = contents(ref)
        total = sum(size for size, _ in layers)
        print(f"\n### {role}: {ref}, {mb(total)} MB unpacked, {len(layers)} layers\n")
        if markdown:
            print("| layer | MB | made by |\n|---|---|---|")
        for i, (size, created) in enumerate(layers):
            created = re.sub(r"\s+", " ", created.replace("/bin/sh -c ", "")).strip()[:110].replace("|", "\\|")
            print(f"| {i} | {mb(size)} | `{created}` |" if markdown else f"  layer {i}: {mb(size):>7} MB  {created}")
        if markdown:
            print("\n| content | MB | share |\n|---|---|---|")
        files_total = sum(groups.values())
        for group, size in sorted(groups.items(), key=lambda kv: -kv[1]):
            share = f"{100 * size / files_total:.1f} %"
            print(f"| {group} | {mb(size)} | {share} |" if markdown else f"  {group:24} {mb(size):>7} MB  {share}")
        print(f"\nCUDA libraries in more than one folder (under site-packages): {twice or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
