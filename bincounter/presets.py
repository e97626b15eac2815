"""Image transforms for training and evaluation (and serving, which uses the eval transform).

Counting needs every item in view: the whole bin is resized (squashed) to a square
instead of centre-cropped, because a crop that cuts an item off changes the label.

Training is split in two halves (docs/data.md, "Where the CPU goes"):

* :func:`train_transform` runs in the DataLoader workers on one image: resize the whole
  bin to ``input_size`` x ``input_size`` and flip it left-right, nothing else; it returns
  uint8, so a worker ships a quarter of the bytes of float32 and spends no time per pixel.
* :func:`train_device_transform` runs on the training device on the whole batch:
  photometric augmentation with per-sample factors, a mild zoom-out/shift that keeps the
  whole bin in view, float conversion and normalisation (:mod:`bincounter.augment`).

With GPU JPEG decode (:func:`use_gpu_decode`) the workers ship the JPEG bytes untouched and
the device transform decodes, resizes and flips as well.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from bincounter import augment

GPU_DECODE_CHOICES = ("auto", "off")
# The model input in px that training, the pipeline and split's short side default to (the recipe,
# docs/training.md): items are small and straps hide them, and ImageNet's 224 px loses them.
INPUT_SIZE = 384


def short_side_for(input_size: int, resize_size: int = 0) -> int:
    """The short side ``bincounter split`` should store for a model reading ``input_size`` (and ``resize_size``).

    The trainer squashes the whole image to a square of that size, so the image's short side is
    what it reads at full resolution: storing more costs decode time in every epoch for
    pixels the resize throws away, storing less loses detail.
    """
    return max(input_size, resize_size or 0)


def train_transform(input_size: int) -> T.Compose:
    """Worker half of the training transform: uint8 CHW tensor in, uint8 (3, input_size, input_size) out.

    No vertical flip (bins are never upside down) and no crop (it could cut an item off).
    """
    return T.Compose([
        T.ToImage(),
        T.Resize((input_size, input_size), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToPureTensor(),
    ])


def train_device_transform(mean, std, policy: str = "trivial", decode_size: int | None = None, seed: int = 0,
                           rank: int = 0) -> augment.DeviceTransform:
    """Device half of the training transform (see :class:`bincounter.augment.DeviceTransform`)."""
    return augment.DeviceTransform(mean, std, train=True, policy=policy, decode_size=decode_size, seed=seed, rank=rank)


def use_gpu_decode(flag: str, device: torch.device) -> bool:
    """``auto``: decode JPEGs with nvJPEG on the training GPU when training runs on CUDA; ``off``: in the workers."""
    if flag not in GPU_DECODE_CHOICES:
        raise ValueError(f"Invalid gpu_decode {flag!r}. Only {', '.join(GPU_DECODE_CHOICES)} are supported.")
    return flag == "auto" and device.type == "cuda"


def eval_transform(input_size: int, resize_size: int, mean, std) -> T.Compose:
    """Resize the whole image to ``resize_size`` x ``resize_size``, then centre-crop ``input_size``."""
    return T.Compose([
        T.ToImage(),
        T.Resize((resize_size, resize_size), antialias=True),
        T.CenterCrop(input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])
