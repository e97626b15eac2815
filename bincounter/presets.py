"""Image transforms for training and evaluation (and serving, which uses the eval transform)."""

from __future__ import annotations

from torchvision.transforms import v2 as T
import torch


def train_transform(input_size: int, mean, std) -> T.Compose:
    # Bins are photographed from above at varying zoom: random crops and flips
    # keep every item in view often enough; colour jitter covers lighting.
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(input_size, scale=(0.5, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def eval_transform(input_size: int, resize_size: int, mean, std) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.Resize(resize_size, antialias=True),
        T.CenterCrop(input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])
