"""The KServe model server for the counter: ``bincounter serve`` / ``python -m bincounter.serving.server``.

Serves one model folder (``model.pt`` + ``config.json``) over KServe's REST data plane:

- V1: ``POST /v1/models/<name>:predict`` with ``{"instances": [{"image": {"b64": "<JPEG>"}}, ...]}``;
- V2 (Open Inference Protocol): ``POST /v2/models/<name>/infer`` with one ``BYTES`` input whose
  elements are base64-encoded JPEGs;
- health: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v1/models/<name>``,
  ``GET /v2/models/<name>/ready``.

docs/serving.md documents the request and response formats and the error codes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import uuid
from typing import Any

import kserve
import kserve.logging
import kserve.model_server
import numpy as np
import torch
from kserve.errors import InvalidInput
from kserve.logging import logger
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from PIL import Image

from bincounter import errors
from bincounter.model import load_model_dir
from bincounter.serving.binary_v2 import BinaryBytesInputs
from bincounter.serving.inference import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, RUNTIMES, Counter,
                                          ImageError, Prediction)

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri
DEFAULT_MAX_BATCH_SIZE = 32
# TorchScript (trace + freeze) was faster than eager on CPU in every run of
# benchmarks/bench_serving.py (6-17% on one quiet-ish thread; docs/benchmarks/serving.md).
# torch.compile was no faster at batch 1 and 8% faster at batch 8, but needs a C compiler in
# the image (the server image has none) and ~45 s of compiling per new batch shape.
DEFAULT_RUNTIME = "torchscript"
V1_FORMAT = '{"instances": [{"image": {"b64": "<base64 JPEG>"}}, ...]}'


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says which folder and why."""


@dataclasses.dataclass
class _Batch:
    """What preprocess hands to predict: the still-encoded images and how to answer."""
    images: list[tuple[str, str | bytes]]  # (where in the request, base64 text or raw bytes)
    v2: bool
    request_id: str | None = None


def _b64decode(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{where} is not valid base64: {e}") from None


class BinCounterModel(kserve.Model):
    """Counts the items in bin photos with a model folder written by ``bincounter train``."""

    def __init__(self, name: str, model_dir: str = DEFAULT_MODEL_DIR, *, runtime: str = DEFAULT_RUNTIME,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        super().__init__(name)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = model_dir
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.counter: Counter | None = None
        self.version: str | None = None
        # One thread owns the network: forward passes run one at a time, each using all of
        # torch's intra-op threads, instead of several passes fighting over the same cores.
        self._forward_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def load(self) -> bool:
        try:
            model, config = load_model_dir(self.model_dir)
        except Exception as e:  # any failure here means the folder cannot be served: say which and why
            raise ModelLoadError(
                f"Cannot load the model folder {self.model_dir!r}: {type(e).__name__}: {e}. It must hold model.pt "
                f"and config.json as written by `bincounter train` (in KServe, the storageUri is mounted at "
                f"{DEFAULT_MODEL_DIR}).") from e
        self.counter = Counter(model, config, runtime=self.runtime, max_image_pixels=self.max_image_pixels,
                               max_image_bytes=self.max_image_bytes)
        self.version = config.version
        logger.info("Loaded %s model version %s from %s (%d classes, runtime %s)", config.arch, config.version,
                    self.model_dir, config.num_classes, self.runtime)
        self.ready = True  # last: the readiness probe must not pass before the model can answer
        return self.ready

    def stop(self):
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        super().stop()

    # KServe shows these at GET /v2/models/<name>.
    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        n = self.counter.config.num_classes if self.counter else -1
        return [{"name": "count", "datatype": "INT64", "shape": [-1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "confidence", "datatype": "FP32", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]}]

    def _check_batch_size(self, n: int, field: str) -> None:
        if n == 0:
            raise InvalidInput(f"empty batch: {field} holds no images")
        if n > self.max_batch_size:
            raise InvalidInput(f"batch of {n} images is larger than the limit of {self.max_batch_size} "
                               f"(--max-batch-size); split the request")

    def _v1_images(self, body: Any) -> list[tuple[str, str | bytes]]:
        if isinstance(body, bytes):  # KServe passes the body through undecoded when Content-Type is not JSON
            try:
                body = json.loads(body)
            except ValueError as e:
                raise InvalidInput(f"request body is not JSON ({e}); send {V1_FORMAT}") from None
        if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
            raise InvalidInput(f"V1 request must be a JSON object with an 'instances' list: {V1_FORMAT}")
        instances = body["instances"]
        self._check_batch_size(len(instances), "'instances'")
        images = []
        for i, instance in enumerate(instances):
            image = instance.get("image") if isinstance(instance, dict) else None
            if not isinstance(image, dict) or "b64" not in image:
                raise InvalidInput(f"instances[{i}] must be {{\"image\": {{\"b64\": \"<base64 JPEG>\"}}}}")
            images.append((f"instances[{i}].image.b64", image["b64"]))
        return images

    def _v2_images(self, request: InferRequest) -> list[tuple[str, str | bytes]]:
        if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
            got = [(i.name, i.datatype) for i in request.inputs]
            raise InvalidInput(f"V2 request must have exactly one BYTES input (e.g. 'image') holding "
                               f"base64-encoded JPEGs; got inputs {got}")
        tensor = request.inputs[0]
        data = tensor.data
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).tolist()
        if not isinstance(data, list):
            raise InvalidInput(f"input '{tensor.name}' data must be a list of base64 strings")
        if not tensor.shape or int(np.prod(tensor.shape)) != len(data):
            raise InvalidInput(f"input '{tensor.name}' has shape {tensor.shape} but {len(data)} elements")
        self._check_batch_size(len(data), f"input '{tensor.name}'")
        return [(f"{tensor.name}[{i}]", x) for i, x in enumerate(data)]

    def _decode(self, images: list[tuple[str, str | bytes]]) -> torch.Tensor:
        # gRPC carries raw bytes; the REST JSON form carries base64 text.
        raw = [x if isinstance(x, bytes) else _b64decode(x, where) for where, x in images]
        try:
            return self.counter.preprocess(raw)
        except ImageError as e:
            raise InvalidInput(str(e)) from None

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> _Batch:
        if isinstance(payload, InferRequest):
            return _Batch(self._v2_images(payload), v2=True, request_id=payload.id)
        return _Batch(self._v1_images(payload), v2=False)

    async def predict(self, batch: _Batch, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        loop = asyncio.get_running_loop()
        # Decoding (base64, then the image) runs on the loop's thread pool, the forward pass on
        # the model's own thread: the event loop keeps answering health checks meanwhile.
        tensor = await loop.run_in_executor(None, self._decode, batch.images)
        probs = await loop.run_in_executor(self._forward_pool, self.counter.forward, tensor)
        predictions = self.counter.postprocess(probs)
        return self._v2_response(predictions, probs, batch) if batch.v2 else self._v1_response(predictions)

    def _v1_response(self, predictions: list[Prediction]) -> dict:
        return {"predictions": [p.to_dict() for p in predictions], "classes": self.counter.config.class_names,
                "model_name": self.name, "model_version": self.version}

    def _v2_response(self, predictions: list[Prediction], probs: torch.Tensor, batch: _Batch) -> InferResponse:
        n = len(predictions)
        outputs = [
            InferOutput("count", [n], "INT64", data=[p.count for p in predictions]),
            InferOutput("label", [n], "BYTES", data=[p.label for p in predictions]),
            InferOutput("confidence", [n], "FP32", data=[p.confidence for p in predictions]),
            InferOutput("probabilities", list(probs.shape), "FP32", data=probs.reshape(-1).tolist()),
        ]
        return InferResponse(response_id=batch.request_id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.version, infer_outputs=outputs,
                             parameters={"classes": json.dumps(self.counter.config.class_names)})


def cpu_limit() -> int:
    """CPUs this process may use: its affinity, capped by the cgroup CPU quota (a pod's CPU limit).

    torch sizes its thread pool from the host's core count; in a pod limited to 2 CPUs on a
    64-core node that means 64 spinning threads throttled to 2 CPUs, many times slower.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for read in (_cgroup_v2_quota, _cgroup_v1_quota):
        try:
            quota = read()
        except (OSError, ValueError):
            continue
        if quota is not None:
            return min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cgroup_v2_quota() -> float | None:
    with open("/sys/fs/cgroup/cpu.max") as f:
        quota, period = f.read().split()
    return None if quota == "max" else int(quota) / int(period)


def _cgroup_v1_quota() -> float | None:
    with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
        quota, period = int(f.read()), int(g.read())
    return None if quota <= 0 else quota / period


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    # KServe's own flags (--workers, --enable_grpc, --grpc_port, ...) come with its parser.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     parents=[kserve.model_server.parser],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR, type=str,
                        help="model folder: local path, s3:// URI, or the storageUri mount inside KServe")
    parser.add_argument("--model-name", dest="model_name", type=str,
                        help="name in the endpoint paths (same as --model_name)")
    parser.add_argument("--port", dest="http_port", type=int, help="HTTP port (same as --http_port)")
    parser.add_argument("--max-batch-size", default=DEFAULT_MAX_BATCH_SIZE, type=int,
                        help="most images in one request; larger requests get 400")
    parser.add_argument("--max-image-pixels", default=DEFAULT_MAX_IMAGE_PIXELS, type=int,
                        help="most pixels in one image (decompression-bomb guard); larger images get 400")
    parser.add_argument("--max-image-bytes", default=DEFAULT_MAX_IMAGE_BYTES, type=int,
                        help="most bytes in one encoded image; larger images get 400")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                        help="how to run the network (docs/benchmarks/serving.md compares them)")
    parser.add_argument("--torch-threads", default=0, type=int,
                        help="torch intra-op threads for the forward pass; 0: $OMP_NUM_THREADS if set, "
                             "else the CPUs the process may use (affinity and cgroup CPU limit)")
    # Our defaults for KServe's flags: the endpoint name, and REST only (an InferenceService
    # exposes one port; pass --enable_grpc true for gRPC on --grpc_port).
    parser.set_defaults(model_name="bincounter", http_port=8080, enable_grpc=False)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.configure_logging:  # before load(), so its log lines show (ModelServer would do it later)
        kserve.logging.configure_logging(args.log_config_file)
    errors.check_port_free(args.http_port)  # before the model load, which can take minutes
    if args.enable_grpc:
        errors.check_port_free(args.grpc_port, what="--grpc_port")
    model = BinCounterModel(args.model_name, args.model, runtime=args.runtime, max_batch_size=args.max_batch_size,
                            max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes)
    try:
        model.load()
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_limit())
    logger.info("torch uses %d intra-op threads", torch.get_num_threads())
    # Every server setting is passed explicitly: kserve.model_server's own module-level
    # defaults come from sys.argv, which is not this parser's view of the command line.
    server = kserve.ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers, max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format, event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    # PIL's own bomb guard (a process-wide setting) follows our limit too; decode_image turns its
    # warning above the limit into an error, so no pixel of a too-large image is decoded.
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    # Raw JPEGs in the V2 binary tensor extension: see binary_v2.py for why this is needed.
    kserve.model_server.app.add_middleware(BinaryBytesInputs)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
