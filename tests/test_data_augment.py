"""Batch-wise device augmentation (bincounter/augment.py) and the uint8 worker half (presets.train_transform).

The batched ops are compared with torchvision's own per-image functional ops, and the jitter
policy's output distribution with the per-image ColorJitter the training transform used before
augmentation moved to the device. All on CPU: the device code is the same code on CUDA.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from bincounter import augment, presets
from bincounter.data.loader import ShardDataset, make_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _reference(name: str, image: torch.Tensor, bin_: int, sign: float) -> torch.Tensor:
    """torchvision's TrivialAugmentWide op ``name`` at magnitude bin ``bin_`` on one float image."""
    m = float(torch.linspace(0.0, 0.99, augment.NUM_BINS)[bin_]) * sign
    if name == "identity":
        return image
    if name in ("brightness", "color", "contrast", "sharpness"):
        fn = {"brightness": F.adjust_brightness, "color": F.adjust_saturation, "contrast": F.adjust_contrast,
              "sharpness": F.adjust_sharpness}[name]
        return fn(image, 1.0 + m)
    if name == "posterize":
        return F.posterize(image, int((8 - torch.arange(augment.NUM_BINS) / 5).round()[bin_]))
    if name == "solarize":
        return F.solarize(image, float(torch.linspace(1.0, 0.0, augment.NUM_BINS)[bin_]))
    return {"autocontrast": F.autocontrast, "equalize": F.equalize}[name](image)


@pytest.mark.parametrize("name", augment.PHOTOMETRIC_OPS)
def test_each_photometric_op_matches_torchvision_per_image(name):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 24)
    k = augment.PHOTOMETRIC_OPS.index(name)
    bins = torch.tensor([0, 3, 10, 17, 25, 30])
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    # every other sample gets identity: the op must touch only its own samples
    ops = torch.tensor([k, 0, k, 0, k, k])
    out = augment.trivial_augment(x, ops, bins, signs)
    for i in range(len(x)):
        ref = _reference(augment.PHOTOMETRIC_OPS[int(ops[i])], x[i], int(bins[i]), float(signs[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_trivial_augment_draws_op_and_magnitude_per_sample():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 16).expand(64, -1, -1, -1).contiguous()
    out = augment.trivial_augment(x)
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) > 20  # one shared op/magnitude per batch would give 1


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).double() / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def _stats(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": batch.mean((1, 2, 3)), "std": batch.std((1, 2, 3)),
            "saturation": (batch.amax(1) - batch.amin(1)).mean((1, 2))}


def test_jitter_policy_has_the_statistics_of_the_old_per_image_colorjitter(sample_dir):
    """The old training transform jittered each uint8 image with ColorJitter(0.2, 0.2, 0.2) in the worker."""
    torch.manual_seed(2)
    image = F.resize(decode_jpeg(torch.frombuffer(bytearray((sample_dir / "00004.jpg").read_bytes()),
                                                  dtype=torch.uint8)), [48, 48], antialias=True)
    n = 400
    old_jitter = T.Compose([T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                            T.ToDtype(torch.float32, scale=True)])
    old = torch.stack([old_jitter(image) for _ in range(n)])
    new = augment.color_jitter(image.float().div(255).expand(n, -1, -1, -1).contiguous())
    critical = 1.95 * (2 / n) ** 0.5  # KS at alpha = 0.001
    for key, a in _stats(old).items():
        b = _stats(new)[key]
        assert _ks(a, b) < critical, (key, _ks(a, b), critical)
    # and the test has teeth: twice the jitter strength is told apart
    wide = augment.color_jitter(image.float().div(255).expand(n, -1, -1, -1).contiguous(), strength=0.4)
    assert _ks(_stats(old)["mean"], _stats(wide)["mean"]) > critical


def test_zoom_out_shift_keeps_the_whole_image_in_view():
    torch.manual_seed(3)
    size = 64
    x = torch.ones(200, 1, size, size)
    out = augment.zoom_out_shift(x, min_scale=0.8)
    for o in out[:, 0]:
        rows, cols = (o > 0.5).any(1).nonzero(), (o > 0.5).any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert abs(h - w) <= 1  # a clipped image would lose rows or columns on one side only
        assert h >= 0.8 * size - 1
        # content mass matches a whole (unclipped) image scaled by h/size
        assert float(o.sum()) == pytest.approx(h * w, rel=0.08)
    assert len({round(float(o.sum())) for o in out}) > 20  # scale and shift vary per sample
    torch.testing.assert_close(augment.zoom_out_shift(x[:2], min_scale=1.0), x[:2])


def test_train_transform_flips_left_right_only_and_ships_uint8():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, :20, :30] = 255  # top-left quadrant white
    t = presets.train_transform(32)
    outs = [t(image) for _ in range(40)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)
    assert all(o[:, :16].float().mean() > 100 and o[:, 16:].float().mean() < 20 for o in outs)  # never upside down
    lefts = {bool(o[:, :16, :16].float().mean() > 100) for o in outs}
    assert lefts == {True, False}  # flipped left-right in some draws, not in others


def test_device_transform_eval_only_normalises():
    u = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    out = augment.DeviceTransform(MEAN, STD, train=False)(u, "cpu")
    ref = T.Normalize(MEAN, STD)(T.ToDtype(torch.float32, scale=True)(u))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="Invalid augment policy 'bogus'"):
        augment.DeviceTransform(MEAN, STD, policy="bogus")


def _shard(tmp_path, sample_dir, n=12) -> str:
    """A shard of real ABID photos (short side 96), in the split's format."""
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, jpg in enumerate(sorted(sample_dir.glob("*.jpg"))[:n]):
            im = Image.open(jpg).convert("RGB")
            im.thumbnail((200, 96))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps({"id": jpg.stem, "count": i % 6}).encode())):
                info = tarfile.TarInfo(f"{jpg.stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_device_decode_path_matches_the_worker_path(tmp_path, sample_dir):
    """GPU JPEG decode ships bytes and decodes on the device; here the device is the CPU.

    Same pixels (on CUDA nvJPEG may differ from libjpeg-turbo by a few levels: that is the
    tolerance bench_gpu checks) and the same label order as decoding in the workers.
    """
    uri = _shard(tmp_path, sample_dir)
    size = 64
    worker = ShardDataset([uri], T.Compose([T.Resize((size, size), antialias=True), T.ToPureTensor()]), 5, True)
    raw = ShardDataset([uri], None, 5, True)
    device = torch.device("cpu")
    to_device = augment.DeviceTransform(MEAN, STD, train=False)
    decode_on_device = augment.DeviceTransform(MEAN, STD, train=False, decode_size=size)
    a = [(to_device(x, device), y) for x, y in make_loader(worker, 5, 0, device)]
    b = [(decode_on_device(x, device), y) for x, y in make_loader(raw, 5, 0, device)]
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    assert sum(len(y) for _, y in a) == 12
    for (xa, _), (xb, _) in zip(a, b):
        torch.testing.assert_close(xa, xb, atol=2 / 255 / min(STD), rtol=0)
    # training mode on the device path flips per sample, left-right only
    torch.manual_seed(4)
    jpegs, _ = next(iter(make_loader(raw, 12, 0, device)))
    plain = augment.decode_resize(jpegs, size, device)
    train = augment.DeviceTransform((0, 0, 0), (1, 1, 1), policy="none", min_scale=1.0, decode_size=size)
    out = (train(jpegs, device) * 255).round().to(torch.uint8)
    flipped = [bool(torch.equal(o, p.flip(-1))) for o, p in zip(out, plain)]
    same = [bool(torch.equal(o, p)) for o, p in zip(out, plain)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_use_gpu_decode_is_auto_on_cuda_only():
    assert presets.use_gpu_decode("auto", torch.device("cuda", 0))
    assert not presets.use_gpu_decode("auto", torch.device("cpu"))
    assert not presets.use_gpu_decode("off", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="Invalid gpu_decode 'on'"):
        presets.use_gpu_decode("on", torch.device("cpu"))
