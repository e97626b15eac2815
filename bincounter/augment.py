"""Batch-wise augmentation and normalisation on the training device (the GPU; the same code on CPU).

DataLoader workers only decode, resize and flip, and ship uint8 (``presets.train_transform``):
on one core that is several times cheaper than jittering and normalising every image in the
worker (docs/benchmarks/data.md). Everything per-pixel and photometric runs here, on a whole
batch at once, with every random factor drawn **per sample** (a batch never shares one jitter).

Policies (``--augment``):

* ``trivial`` (default): TrivialAugmentWide (Müller & Hutter 2021, torchvision's magnitudes,
  31 bins) limited to its photometric ops: each image gets one of identity, brightness,
  colour, contrast, sharpness, posterize, solarize, autocontrast, equalize with a random
  magnitude. The geometric ops (shear, rotate, translate by 32 px) are left out: they can push
  an item out of view, and that changes the count.
* ``jitter``: the ColorJitter(0.2, 0.2, 0.2) of the earlier recipe, per sample, in a random
  order per sample, as torchvision applies it to one image.
* ``none``: no photometric augmentation.

Then (any policy, training only) a mild **zoom-out and shift with padding**: the image is shrunk
by a factor in ``[min_scale, 1]`` and placed anywhere it fits entirely inside the frame, the
border filled with the dataset mean. No crop and no shift ever cuts a part of the bin off,
so no augmentation can remove an item (issue 12). No vertical flip: bins are never upside down.

Each batched op equals torchvision's ``transforms.v2.functional`` op applied image by image to
the same float image (tests/test_data_augment.py checks this, and compares the jitter statistics
with the old per-image transform).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

POLICIES = ("trivial", "jitter", "none")
PHOTOMETRIC_OPS = ("identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
                   "autocontrast", "equalize")
NUM_BINS = 31  # TrivialAugmentWide's num_magnitude_bins
MIN_SCALE = 0.85  # zoom out by at most 15% (a few items' width of border at 384 px)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _col(factor)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def brightness(x, factor):
    return (x * _col(factor)).clamp_(0, 1)


def saturation(x, factor):
    return _blend(x, _gray(x), factor)


def contrast(x, factor):
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def sharpness(x, factor):
    """torchvision's sharpness: blend with a 3x3 smoothed image inside a 1-pixel border kept as is."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=x.dtype, device=x.device).expand(3, 1, 3, 3)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(_blend(inner, nnf.conv2d(x, kernel, groups=3), factor))
    return out


def posterize(x, bits):
    levels = _col(2.0 ** bits.to(x.dtype))
    return torch.minimum((x * levels).floor_(), levels - 1) / levels


def solarize(x, threshold):
    return torch.where(x >= _col(threshold), 1 - x, x)


def _magnitudes(device) -> dict[str, torch.Tensor]:
    """TrivialAugmentWide's magnitude bins for the photometric ops (torchvision's _AUGMENTATION_SPACE)."""
    return {"linear": torch.linspace(0.0, 0.99, NUM_BINS, device=device),
            "posterize": (8 - (torch.arange(NUM_BINS, device=device) / ((NUM_BINS - 1) / 6))).round(),
            "solarize": torch.linspace(1.0, 0.0, NUM_BINS, device=device)}


def trivial_augment(x: torch.Tensor, ops: torch.Tensor | None = None, bins: torch.Tensor | None = None,
                    signs: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One photometric TrivialAugmentWide op per image of a float batch in [0, 1].

    ``ops`` (index into PHOTOMETRIC_OPS), ``bins`` (magnitude bin) and ``signs`` (+-1) are drawn
    per sample unless given (the tests pass them to compare with torchvision image by image).
    """
    n, dev = x.shape[0], x.device
    g = generator
    ops = torch.randint(len(PHOTOMETRIC_OPS), (n,), device=dev, generator=g) if ops is None else ops.to(dev)
    bins = torch.randint(NUM_BINS, (n,), device=dev, generator=g) if bins is None else bins.to(dev)
    if signs is None:
        signs = torch.where(torch.rand(n, device=dev, generator=g) <= 0.5, -1.0, 1.0)
    mags = _magnitudes(dev)
    factor = 1.0 + mags["linear"][bins] * signs.to(dev)
    out = x.clone()
    for k, name in enumerate(PHOTOMETRIC_OPS):
        idx = (ops == k).nonzero().flatten()
        if name == "identity" or idx.numel() == 0:
            continue
        sub = x[idx]
        if name == "brightness":
            sub = brightness(sub, factor[idx])
        elif name == "color":
            sub = saturation(sub, factor[idx])
        elif name == "contrast":
            sub = contrast(sub, factor[idx])
        elif name == "sharpness":
            sub = sharpness(sub, factor[idx])
        elif name == "posterize":
            sub = posterize(sub, mags["posterize"][bins[idx]])
        elif name == "solarize":
            sub = solarize(sub, mags["solarize"][bins[idx]])
        elif name == "autocontrast":
            sub = F.autocontrast(sub)  # per image and channel already
        elif name == "equalize":
            sub = F.equalize(sub)
        out[idx] = sub
    return out


def color_jitter(x: torch.Tensor, strength: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(brightness=s, contrast=s, saturation=s): factors and op order drawn per sample."""
    n, dev = x.shape[0], x.device
    factors = torch.empty(3, n, device=dev).uniform_(1 - strength, 1 + strength, generator=generator)
    order = torch.rand(n, 3, device=dev, generator=generator).argsort(dim=1)  # a random permutation of the 3 ops per sample
    ops = (brightness, contrast, saturation)
    for pos in range(3):
        for k, op in enumerate(ops):
            idx = (order[:, pos] == k).nonzero().flatten()
            if idx.numel():
                x = x.index_copy(0, idx, op(x[idx], factors[k, idx]))
    return x


def zoom_out_shift(x: torch.Tensor, min_scale: float = MIN_SCALE, fill: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Shrink each image by a factor in [min_scale, 1] and place it anywhere it fits whole.

    The content never leaves the frame (|shift| <= 1 - scale in normalised coordinates), so
    every item stays in view; the border is ``fill`` (default 0).
    """
    n, dev = x.shape[0], x.device
    scale = torch.empty(n, device=dev).uniform_(min_scale, 1.0, generator=generator)
    room = 1.0 - scale
    shift = (torch.rand(n, 2, device=dev, generator=generator) * 2 - 1) * room[:, None]
    # affine_grid maps output coords to input coords: input = (output - shift) / scale
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    if fill is None:
        return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sample (x - fill) with zero padding, then add fill back: the border becomes ``fill``
    fill = fill.view(1, -1, 1, 1).to(x)
    return nnf.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def decode_resize(jpegs: Sequence[torch.Tensor], size: int, device: torch.device | str) -> torch.Tensor:
    """Batch-decode JPEG bytes (1-D uint8 tensors) on ``device`` and resize each to size x size.

    On CUDA, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the whole batch with
    nvJPEG; on CPU the same call decodes with libjpeg-turbo. Returns uint8 (N, 3, size, size).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
    return torch.stack([F.resize(im, [size, size], antialias=True) for im in images])


class DeviceTransform(torch.nn.Module):
    """uint8 batch (N, 3, H, W) -> augmented, normalised float batch, on whatever device it lives.

    ``train=False`` only converts and normalises (validation). With ``decode_size`` set, the
    batch is a list of raw JPEG tensors that are decoded and resized on the device first
    (GPU JPEG decode, see ``presets.use_gpu_decode``); the horizontal flip then happens here too.

    Random draws come from the transform's own generator, reseeded by :meth:`set_epoch` from
    ``(seed, epoch, rank)``: a resumed epoch replays exactly the augmentation of the original run,
    whatever else consumed torch's global RNG before it (DataLoader workers starting, say).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, train: bool = True,
                 policy: str = "trivial", min_scale: float = MIN_SCALE, decode_size: int | None = None,
                 seed: int = 0, rank: int = 0):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"Invalid augment policy {policy!r}. Only {', '.join(POLICIES)} are supported.")
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.train_mode, self.policy, self.min_scale, self.decode_size = train, policy, min_scale, decode_size
        self.seed, self.rank = seed, rank
        self._epoch, self._generator = 0, None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._generator = epoch, None

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed((self.seed * 1_000_003 + self._epoch * 1_009 + self.rank) % 2 ** 63)
        return self._generator

    def forward(self, images, device: torch.device | str | None = None) -> torch.Tensor:
        device = torch.device(device) if device is not None else self.mean.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._rng(device) if self.train_mode else None
        if self.decode_size is not None and isinstance(images, (list, tuple)):
            images = decode_resize(images, self.decode_size, device)
            if self.train_mode:
                flip = torch.rand(len(images), device=device, generator=g) < 0.5
                images = torch.where(_col(flip), images.flip(-1), images)
        x = images.to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.train_mode:
            if self.policy == "trivial":
                x = trivial_augment(x, generator=g)
            elif self.policy == "jitter":
                x = color_jitter(x, generator=g)
            if self.min_scale < 1:
                x = zoom_out_shift(x, self.min_scale, fill=self.mean.to(device).flatten(), generator=g)
        return (x - self.mean.to(device)) / self.std.to(device)
