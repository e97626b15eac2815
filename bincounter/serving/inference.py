"""Inference without a server: image bytes in, counts and class probabilities out.

``Counter`` is what the KServe model server wraps and what the serving benchmark
calls directly as the "bare model" baseline. It decodes images defensively
(untrusted bytes from the network, ``bincounter.imaging``) and runs one batched
forward pass per call, on one of three runtimes:

- ``eager``: the PyTorch module as is;
- ``torchscript``: traced and frozen;
- ``onnx``: exported with ``torch.onnx`` at load and run by ONNX Runtime (the default: the fastest
  on CPU in benchmarks/bench_serving.py, docs/benchmarks/serving.md).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

from bincounter.calibration import probabilities
from bincounter.imaging import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                                DEFAULT_MAX_JPEG_SCANS, IMAGE_FORMATS, ImageError, ImageLimits, open_image)
from bincounter.model import ModelConfig, decode
from bincounter.presets import eval_transform

RUNTIMES = ("eager", "torchscript", "onnx")


@dataclasses.dataclass
class Prediction:
    count: int  # the most probable class; the last class means "max_count or more" when k_or_more
    label: str  # the class name, e.g. "3" or "5+"
    confidence: float  # probability of that class
    probabilities: list[float]  # one per class, in class order (index i = count i)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), draft_size: int | None = None):
    """Untrusted image bytes -> upright RGB PIL image, or ``ImageError`` (see ``bincounter.imaging``)."""
    return open_image(data, limits=limits, draft_size=draft_size)


def export_onnx(model: nn.Module, input_size: int) -> bytes:
    """The network as an ONNX model with a dynamic batch dimension (input ``images``, output ``logits``)."""
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about its own internals
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                    verbose=False)
    return program.model_proto.SerializeToString()


class Counter:
    """A loaded model plus its eval transform: ``predict(list_of_image_bytes) -> list[Prediction]``.

    Args:
        model: the network from ``bincounter.model.load_model_dir`` (eval mode, CPU).
        config: its ``ModelConfig``.
        runtime: one of ``RUNTIMES`` (module docstring).
        limits: what one image may cost to decode.
        threads: intra-op threads for ONNX Runtime (0: torch's current setting).
    """

    def __init__(self, model: nn.Module, config: ModelConfig, runtime: str = "eager",
                 limits: ImageLimits = ImageLimits(), threads: int = 0):
        if runtime not in RUNTIMES:
            raise ValueError(f"Invalid runtime {runtime!r}. Only {', '.join(RUNTIMES)} are supported.")
        self.config = config
        self.runtime = runtime
        self.limits = limits
        self.transform = eval_transform(config.input_size, config.resize_size, config.mean, config.std)
        model = model.eval()
        self._session = None
        if runtime == "torchscript":
            example = torch.zeros(1, 3, config.input_size, config.input_size)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated in favour of compile
                model = torch.jit.freeze(torch.jit.trace(model, example))
        elif runtime == "onnx":
            try:
                import onnxruntime as ort  # the serve extra; only this runtime needs it
            except ImportError as e:
                raise RuntimeError("--runtime onnx needs onnxruntime (pip install 'bincounter[serve]'); "
                                   "or use --runtime torchscript") from e

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: it warns about unused initializers otherwise
            self._session = ort.InferenceSession(export_onnx(model, config.input_size), options,
                                                 providers=["CPUExecutionProvider"])
        self.model = model

    def preprocess(self, images: list[bytes]) -> torch.Tensor:
        """Decode and transform images into one batch; ``ImageError`` names the bad image by index."""
        tensors = []
        for i, data in enumerate(images):
            try:
                # Draft to twice the resize: the antialiased resize that follows sees plenty of pixels.
                image = decode_image(data, self.limits, draft_size=2 * self.config.resize_size)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
            tensors.append(self.transform(image))
        return torch.stack(tensors)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape ``[N, num_classes]``."""
        if self._session is not None:
            (logits,) = self._session.run(["logits"], {"images": np.ascontiguousarray(batch.numpy())})
            return probabilities(torch.from_numpy(logits), self.config.temperature)
        return probabilities(self.model(batch), self.config.temperature)  # calibrated: the model's temperature

    def postprocess(self, probs: torch.Tensor) -> list[Prediction]:
        names = self.config.class_names
        # The decoding training chose on validation (config.json "decoding"; argmax for older folders).
        index = decode(probs, self.config.decoding)
        confidence = probs.gather(1, index[:, None])[:, 0]
        return [Prediction(count=int(k), label=names[int(k)], confidence=float(c), probabilities=p.tolist())
                for k, c, p in zip(index, confidence, probs)]

    def predict(self, images: list[bytes]) -> list[Prediction]:
        return self.postprocess(self.forward(self.preprocess(images)))
