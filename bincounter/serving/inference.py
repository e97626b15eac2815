"""Inference without a server: image bytes in, counts and class probabilities out.

``Counter`` is what the KServe model server wraps and what the serving benchmark
calls directly as the "bare model" baseline. It decodes images defensively
(untrusted bytes from the network) and runs one batched forward pass per call.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from bincounter.model import ModelConfig, decode
from bincounter.presets import eval_transform

# Formats a client may send. Restricting them keeps PIL's rarer (and riskier) decoders,
# e.g. EPS via Ghostscript, away from network input.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# 40 Mpx is ~8x the largest ABID photo; a larger image is almost surely a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
RUNTIMES = ("eager", "torchscript")


class ImageError(ValueError):
    """An input image cannot be used; the message says which image and why."""


@dataclasses.dataclass
class Prediction:
    count: int  # the most probable class; the last class means "max_count or more" when k_or_more
    label: str  # the class name, e.g. "3" or "5+"
    confidence: float  # probability of that class
    probabilities: list[float]  # one per class, in class order (index i = count i)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Image.Image:
    """Decode untrusted image bytes to an RGB PIL image, or raise ``ImageError``.

    The pixel count is checked from the header, before any pixel is decoded, so a
    tiny file that claims 100k x 100k pixels costs nothing.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, more than the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"the bytes are not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image is too large: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"the image is too large: {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{max_pixels} pixels (decompression-bomb guard)")
    if width == 0 or height == 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    try:
        image.load()  # decode now, so a truncated or corrupt file fails here and not in the transform
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the {image.format} image cannot be decoded, it is truncated or corrupt: {e}") from None


class Counter:
    """A loaded model plus its eval transform: ``predict(list_of_image_bytes) -> list[Prediction]``.

    Args:
        model: the network from ``bincounter.model.load_model_dir`` (eval mode, CPU).
        config: its ``ModelConfig``.
        runtime: ``"eager"`` runs the module as is; ``"torchscript"`` traces and freezes it
            (see docs/benchmarks/serving.md for which is faster).
        max_image_pixels, max_image_bytes: limits for each decoded image.
    """

    def __init__(self, model: nn.Module, config: ModelConfig, runtime: str = "eager",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        if runtime not in RUNTIMES:
            raise ValueError(f"Invalid runtime {runtime!r}. Only {', '.join(RUNTIMES)} are supported.")
        self.config = config
        self.runtime = runtime
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.transform = eval_transform(config.input_size, config.resize_size, config.mean, config.std)
        model = model.eval()
        if runtime == "torchscript":
            example = torch.zeros(1, 3, config.input_size, config.input_size)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated in favour of compile
                model = torch.jit.freeze(torch.jit.trace(model, example))
        self.model = model

    def preprocess(self, images: list[bytes]) -> torch.Tensor:
        """Decode and transform images into one batch; ``ImageError`` names the bad image by index."""
        tensors = []
        for i, data in enumerate(images):
            try:
                image = decode_image(data, self.max_image_pixels, self.max_image_bytes)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
            tensors.append(self.transform(image))
        return torch.stack(tensors)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape ``[N, num_classes]``."""
        return torch.softmax(self.model(batch), dim=1)

    def postprocess(self, probs: torch.Tensor) -> list[Prediction]:
        names = self.config.class_names
        # The decoding training chose on validation (config.json "decoding"; argmax for older folders).
        index = decode(probs, self.config.decoding)
        confidence = probs.gather(1, index[:, None])[:, 0]
        return [Prediction(count=int(k), label=names[int(k)], confidence=float(c), probabilities=p.tolist())
                for k, c, p in zip(index, confidence, probs)]

    def predict(self, images: list[bytes]) -> list[Prediction]:
        return self.postprocess(self.forward(self.preprocess(images)))
