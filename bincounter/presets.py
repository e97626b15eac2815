"""Image transforms for training and evaluation (and serving, which uses the eval transform).

Counting needs every item in view: the whole bin is resized (squashed) to a square
instead of centre-cropped, because a crop that cuts an item off changes the label.
Training adds a small random crop (``resize_size`` -> ``input_size``), flips and
colour jitter, none of which changes the count much.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

# The recipe's image sizes (docs/training.md): items are small and straps hide them, so the model
# reads 384 px (ImageNet's 224 loses them), from shards stored at short side 512 so that the
# resize to the input size only ever shrinks. The split's --short-side default is SHORT_SIDE.
INPUT_SIZE = 384
SHORT_SIDE = 512


def train_transform(input_size: int, mean, std, resize_size: int | None = None) -> T.Compose:
    resize_size = resize_size or input_size
    return T.Compose([
        T.ToImage(),
        T.Resize((resize_size, resize_size), antialias=True),
        T.RandomCrop(input_size),  # a few pixels of shift when resize_size > input_size
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def eval_transform(input_size: int, resize_size: int, mean, std) -> T.Compose:
    """Resize the whole image to ``resize_size`` x ``resize_size``, then centre-crop ``input_size``."""
    return T.Compose([
        T.ToImage(),
        T.Resize((resize_size, resize_size), antialias=True),
        T.CenterCrop(input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])
