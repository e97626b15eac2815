"""Opening untrusted images (bincounter/imaging.py), the V2 binary parser, the runtimes and batching: no server.

Every crafted image below was a crasher or a resource hog of the model server before the
imaging core existed (issue 11); each is now an ``ImageError`` (a 400 in the server), fast.
The fuzz tests (hypothesis) mutate valid images and binary requests for a few seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bincounter.data.split import resize_jpeg
from bincounter.imaging import ImageError, ImageLimits, open_image
from bincounter.model import ModelConfig, build_model
from bincounter.serving.batching import Batcher
from bincounter.serving.binary_v2 import split_bytes, to_json_request
from bincounter.serving.inference import Counter, decode_image

LIMITS = ImageLimits()  # the server's defaults


def encode(fmt: str, mode: str = "RGB", size=(16, 12), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": None, "P": None, "RGBA": 4}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode="L" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def with_field(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A few-hundred-byte real JPEG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(encode("JPEG", size=(16, 16)))
    sof = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def repeated_scans_jpeg(repeats: int) -> bytes:
    """A progressive JPEG whose scans are repeated ``repeats`` times: each is another full decoding pass."""
    data = encode("JPEG", size=(64, 48), progressive=True, quality=90)
    first_scan, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:first_scan] + data[first_scan:end] * repeats + data[end:]


def png_strip(width: int, height: int) -> bytes:
    """A tiny PNG (it compresses to nothing) of an extreme aspect ratio."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


# Crashers found by fuzzing decode_image before (issue 11): each was an uncaught exception, a 500.
CRASHERS = {
    "bmp pixel depth": with_field(encode("BMP"), 28, "<H", 7),
    "bmp compression": with_field(encode("BMP"), 30, "<I", 9),
    "bmp header type": with_field(encode("BMP"), 14, "<I", 77),
    "bmp palette size": with_field(encode("BMP", "P"), 46, "<I", 1 << 30),
    "png truncated IHDR": encode("PNG")[:8] + struct.pack(">I", 5) + b"IHDR" + bytes(9),
    "jpeg cut in its first 600 bytes": encode("JPEG", size=(64, 64))[:300],
    "webp decoder": encode("WEBP")[:20] + b"\xff" * 40,
}
# What decoded, or was about to, far more than any photo needs.
HOGS = {
    "631-byte JPEG claiming 6000x6600": (jpeg_claiming(6000, 6600), "pixels"),
    "12 KB PNG of 1x3,000,000": (png_strip(1, 3_000_000), "aspect ratio"),
    "progressive JPEG with repeated scans": (repeated_scans_jpeg(40), "scans"),
}


@pytest.mark.parametrize("case", list(CRASHERS))
def test_malformed_images_are_image_errors(case):
    with pytest.raises(ImageError):
        decode_image(CRASHERS[case], LIMITS)


@pytest.mark.parametrize("case", list(HOGS))
def test_decode_work_is_capped_before_decoding(case):
    data, reason = HOGS[case]
    start = time.perf_counter()
    with pytest.raises(ImageError, match=reason):
        decode_image(data, LIMITS)
    assert time.perf_counter() - start < 0.5


def test_limits_and_guards():
    assert decode_image(encode("JPEG", size=(30, 20))).size == (30, 20)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="too large: 100x100 = 10000 pixels, more than the limit of 5000"):
        decode_image(encode("JPEG", size=(100, 100)), ImageLimits(max_pixels=5000))
    with pytest.raises(ImageError, match="too large"):
        decode_image(jpeg_claiming(60000, 60000))  # PIL's own limit, without ours
    with pytest.raises(ImageError, match="more than the limit of 100 bytes"):
        decode_image(encode("JPEG"), ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="not an image in a supported format"):
        decode_image(b"GIF89a" + bytes(40))
    assert decode_image(encode("PNG", "P")).mode == "RGB"
    assert decode_image(encode("PNG", "RGBA")).mode == "RGB"
    # The real-photo defaults leave room: the largest ABID photo is 733x992, a normal progressive JPEG passes.
    assert decode_image(encode("JPEG", size=(992, 733)), LIMITS).size == (992, 733)
    assert decode_image(encode("JPEG", size=(640, 480), progressive=True), LIMITS).size == (640, 480)


def test_large_jpegs_decode_in_draft_mode():
    """A big JPEG is DCT-downscaled while decoding, to no less than the size asked for."""
    data = encode("JPEG", size=(2000, 1600))
    image = decode_image(data, LIMITS, draft_size=400)
    assert 400 <= min(image.size) < 800 and image.size[0] > image.size[1]


def oriented_jpeg(orientation: int) -> bytes:
    """A 60x40 JPEG, left third red and the rest blue, stored with an EXIF Orientation tag."""
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_the_same_in_split_and_serving():
    """Orientation 6 ("rotate 90 CW to view"): the upright photo is 40x60 with the red band on top."""
    data = oriented_jpeg(6)
    served = decode_image(data, LIMITS)
    split = Image.open(io.BytesIO(resize_jpeg(data, "bin-1", short_side=1000)))  # no resize: short side < 1000
    for image in (served, split):
        assert image.size == (40, 60)
        top, bottom = np.asarray(image)[5, 20], np.asarray(image)[55, 20]
        assert top[0] > 200 and top[2] < 60, top  # red
        assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue
    assert decode_image(oriented_jpeg(1), LIMITS).size == (60, 40)


def test_16_bit_png_is_scaled_not_clipped():
    """A mid-grey 16-bit photo stays mid-grey (convert("RGB") made it all white)."""
    levels = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, "PNG")
    image = decode_image(buf.getvalue(), LIMITS)
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    pixels = np.asarray(image)[..., 0].astype(float)
    np.testing.assert_allclose(pixels, levels / 257.0, atol=1.0)


# ---------------------------------------------------------------- fuzzing (bounded: a few seconds each)

SEEDS = [encode("JPEG", size=(24, 16)), encode("JPEG", size=(24, 16), progressive=True), encode("PNG", "P"),
         encode("PNG"), encode("BMP"), encode("BMP", "P"), encode("WEBP")]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                                                    max_size=8), cut=st.integers(0, 4096))
def test_fuzz_decoding_raises_only_image_errors(seed, edits, cut):
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[:max(1, len(data) - cut % len(data))])
    try:
        image = decode_image(data, LIMITS, draft_size=32)
    except ImageError:
        return
    assert image.mode == "RGB" and min(image.size) > 0


def _binary_request(images: list[bytes]) -> tuple[bytes, int]:
    raw = b"".join(len(x).to_bytes(4, "little") + x for x in images)
    header = json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, len(header)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)


@FUZZ
@given(body=st.binary(max_size=64), header=JSON_VALUES, length=st.integers(-5, 200), tail=st.binary(max_size=16))
def test_fuzz_binary_parser_raises_only_value_errors(body, header, length, tail):
    for payload, json_length in ((body, length), (json.dumps(header).encode() + tail, len(json.dumps(header)))):
        try:
            assert isinstance(json.loads(to_json_request(payload, json_length)), dict)
        except ValueError:
            pass


BINARY_CRASHERS = {  # each gave a 500 before (issue 11)
    "inputs is a string": {"inputs": "abc"},
    "inputs is null": {"inputs": None},
    "binary_data_size 1e999": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": 1e999}}]},
    "parameters is a list": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": [1]}]},
}


@pytest.mark.parametrize("case", list(BINARY_CRASHERS))
def test_malformed_binary_headers_are_value_errors(case):
    header = json.dumps(BINARY_CRASHERS[case]).encode()
    with pytest.raises(ValueError):
        to_json_request(header + b"\x00" * 8, len(header))


def test_binary_parser_round_trip():
    images = [b"\xff\xd8one", b"", b"three"]
    body, length = _binary_request(images)
    [tensor] = json.loads(to_json_request(body, length))["inputs"]
    assert "binary_data_size" not in tensor["parameters"] and len(tensor["data"]) == 3
    raw = b"".join(len(x).to_bytes(4, "little") + x for x in images)
    assert split_bytes(raw, "image") == images
    with pytest.raises(ValueError, match="claims 5 bytes"):
        split_bytes(raw[:-1], "image")


# ---------------------------------------------------------------- runtimes and batching


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", max_count=5, k_or_more=True, input_size=32, resize_size=36, version="v")
    return build_model("resnet18", cfg.num_classes).eval(), cfg


def test_onnx_runtime_matches_torchscript_on_the_real_sample(tiny_model, sample_dir, one_torch_thread):
    """Max probability difference < 1e-4 on all 31 real ABID photos."""
    model, cfg = tiny_model
    photos = [p.read_bytes() for p in sorted(sample_dir.glob("*.jpg"))]
    assert len(photos) >= 30
    scripted = Counter(model, cfg, runtime="torchscript")
    onnx = Counter(model, cfg, runtime="onnx", threads=1)
    batch = scripted.preprocess(photos)
    diff = (scripted.forward(batch) - onnx.forward(batch)).abs().max().item()
    assert diff < 1e-4, diff
    assert [p.count for p in scripted.postprocess(scripted.forward(batch[:3]))] == \
           [p.count for p in onnx.predict(photos[:3])]


def test_batcher_gathers_concurrent_requests_and_splits_the_answers(tiny_model, one_torch_thread):
    model, cfg = tiny_model
    counter = Counter(model, cfg)
    sizes = []

    def forward(batch):
        sizes.append(len(batch))
        return counter.forward(batch)

    requests = [torch.randn(n, 3, 32, 32) for n in (1, 2, 1, 3, 1)]
    pool = concurrent.futures.ThreadPoolExecutor(1)

    async def run():
        batcher = Batcher(forward, pool, max_batch=8, max_wait_s=0.2)
        try:
            return await asyncio.gather(*(batcher(x) for x in requests))
        finally:
            batcher.stop()

    answers = asyncio.run(run())
    pool.shutdown()
    assert sum(sizes) == 8 and len(sizes) < len(requests)  # shared passes, every image once
    for x, probs in zip(requests, answers):
        torch.testing.assert_close(probs, counter.forward(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(forward, pool, max_batch=1, max_wait_s=0.01)
