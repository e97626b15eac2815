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
import logging
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
from PIL import Image
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram
from starlette.exceptions import HTTPException

from bincounter import cpus, errors
from bincounter.imaging import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                                DEFAULT_MAX_JPEG_SCANS, ImageError, ImageLimits)
from bincounter.audit import online
from bincounter.model import load_model_dir
from bincounter.serving.batching import Batcher
from bincounter.serving.binary_v2 import split_bytes
from bincounter.serving.guard import DataPlaneGuard
from bincounter.serving.inference import RUNTIMES, Counter, Prediction

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri
DEFAULT_MAX_BATCH_SIZE = 32
# 32 base64 photos of ABID size (~60 KB each) are ~2.6 MB; 32 MiB leaves room for larger cameras
# and keeps a request far below the InferenceService's 2Gi memory limit.
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
# ONNX Runtime was the fastest CPU runtime in benchmarks/bench_serving.py (docs/benchmarks/serving.md).
# torch.compile was no faster at batch 1, needs a C compiler in the image (the server image has
# none) and ~45 s of compiling per new batch shape.
DEFAULT_RUNTIME = "onnx"
DEFAULT_LOW_CONFIDENCE = 0.5
# Served when config.json predates the version field (model folders written before it existed).
UNVERSIONED = "1"
V1_FORMAT = '{"instances": [{"image": {"b64": "<base64 JPEG>"}}, ...]}'
# The V2 inputs the model reads, by name. A request with one BYTES input of another name is
# read as the image too (the form before inputs were named).
V2_IMAGE_INPUT = "image"
V2_EXPECTED_INPUT = online.EXPECTED_FIELD  # optional INT64/INT32: the audit's expected quantity per image
V2_INPUTS = (V2_IMAGE_INPUT, V2_EXPECTED_INPUT)
V2_OUTPUTS = ("count", "label", "confidence", "probabilities")
V2_AUDIT_OUTPUTS = ("p_expected", "flagged")  # answered only when the request has expected_quantity

# Drift watching (docs/serving.md gives the alarm): what the model answers, not how fast.
_LABELS = ["model_name", "model_version"]
PREDICTED_COUNT = Histogram("bincounter_predicted_count", "Predicted item count per image (class index)", _LABELS,
                            buckets=tuple(range(0, 17)))
CONFIDENCE = Histogram("bincounter_confidence", "Probability of the predicted class per image", _LABELS,
                       buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
LOW_CONFIDENCE = PromCounter("bincounter_low_confidence", "Images whose predicted class has a probability below "
                             "--low-confidence", _LABELS)
IMAGES = PromCounter("bincounter_images", "Images counted", _LABELS)


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says which folder and why."""


@dataclasses.dataclass
class _Batch:
    """What preprocess hands to predict: the still-encoded images and how to answer."""
    images: list[tuple[str, str | bytes]]  # (where in the request, base64 text or raw bytes)
    request: InferRequest | None = None  # the V2 request (None: V1)
    expected: list[int | None] | None = None  # the audit's expected quantity per image (None: not asked)
    threshold: float = 0.0


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
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, limits: ImageLimits = ImageLimits(),
                 batch_max_size: int = 0, batch_max_wait_ms: float = 5.0,
                 low_confidence: float = DEFAULT_LOW_CONFIDENCE):
        super().__init__(name)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = model_dir
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.limits = limits
        self.low_confidence = low_confidence
        self.counter: Counter | None = None
        self.version: str | None = None
        # One thread owns the network: forward passes run one at a time, each using all of
        # torch's intra-op threads, instead of several passes fighting over the same cores.
        self._forward_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._batch_max_size = batch_max_size
        self._batch_max_wait_s = batch_max_wait_ms / 1000
        self._batcher: Batcher | None = None

    def load(self) -> bool:
        try:
            model, config = load_model_dir(self.model_dir)
            self.counter = Counter(model, config, runtime=self.runtime, limits=self.limits)
        except Exception as e:  # any failure here means the folder cannot be served: say which and why
            raise ModelLoadError(
                f"Cannot load the model folder {self.model_dir!r}: {type(e).__name__}: {e}. It must hold model.pt "
                f"and config.json as written by `bincounter train` (in KServe, the storageUri is mounted at "
                f"{DEFAULT_MODEL_DIR}).") from e
        self.version = config.version or UNVERSIONED
        if self._batch_max_size > 1:
            self._batcher = Batcher(self.counter.forward, self._forward_pool, self._batch_max_size,
                                    self._batch_max_wait_s)
        logger.info("Loaded %s model version %s from %s (%d classes, runtime %s, batching %s)", config.arch,
                    self.version, self.model_dir, config.num_classes, self.runtime,
                    f"up to {self._batch_max_size} images / {self._batch_max_wait_s * 1000:g} ms"
                    if self._batcher else "off")
        self.ready = True  # last: the readiness probe must not pass before the model can answer
        return self.ready

    def stop(self):
        if self._batcher:
            self._batcher.stop()
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        super().stop()

    # KServe shows these at GET /v2/models/<name>.
    def get_input_types(self) -> list[dict]:
        return [{"name": V2_IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]

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
            except (ValueError, RecursionError) as e:
                raise InvalidInput(f"request body is not JSON ({type(e).__name__}); send {V1_FORMAT}") from None
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

    def _v2_inputs(self, request: InferRequest) -> dict[str, InferInput]:
        """The request's inputs by name; one unnamed-as-'image' BYTES input is read as the image."""
        inputs = {tensor.name: tensor for tensor in request.inputs}
        if len(request.inputs) == 1 and V2_IMAGE_INPUT not in inputs and request.inputs[0].datatype == "BYTES":
            inputs = {V2_IMAGE_INPUT: request.inputs[0]}
        unknown = sorted(set(inputs) - set(V2_INPUTS))
        if unknown or V2_IMAGE_INPUT not in inputs or len(inputs) != len(request.inputs):
            got = [(i.name, i.datatype) for i in request.inputs]
            raise InvalidInput(f"V2 request must have a BYTES input {V2_IMAGE_INPUT!r} holding the encoded images "
                               f"(known inputs: {list(V2_INPUTS)}); got inputs {got}")
        return inputs

    def _v2_images(self, request: InferRequest) -> list[tuple[str, str | bytes]]:
        if request.model_version and request.model_version != self.version:  # gRPC carries the version in the body
            raise ModelNotFound(f"{self.name} version {request.model_version} (this server serves version "
                                f"{self.version})")
        tensor = self._v2_inputs(request)[V2_IMAGE_INPUT]
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r} must be BYTES (encoded images), not {tensor.datatype}")
        if tensor._raw_data is not None:  # gRPC raw_input_contents, as Triton's and KServe's gRPC clients send
            try:
                data = split_bytes(tensor._raw_data, tensor.name)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
        else:
            data = tensor.data
            if isinstance(data, np.ndarray):
                data = data.reshape(-1).tolist()
            if not isinstance(data, list):
                raise InvalidInput(f"input {tensor.name!r} data must be a list of base64 strings")
        shape = tensor.shape
        if (not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape)
                or math.prod(shape) != len(data)):
            raise InvalidInput(f"input {tensor.name!r} has shape {shape} but {len(data)} elements")
        self._check_batch_size(len(data), f"input {tensor.name!r}")
        self._requested_outputs(request)  # fail before the forward pass, not after it
        return [(f"{tensor.name}[{i}]", x) for i, x in enumerate(data)]

    @staticmethod
    def _requested_outputs(request: InferRequest) -> list[str]:
        names = [o.name for o in request.request_outputs or []]
        unknown = [n for n in names if n not in V2_OUTPUTS + V2_AUDIT_OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; the model has outputs {list(V2_OUTPUTS)} "
                               f"(and {list(V2_AUDIT_OUTPUTS)} with input {V2_EXPECTED_INPUT!r})")
        return names or list(V2_OUTPUTS)

    def _decode(self, images: list[tuple[str, str | bytes]]) -> torch.Tensor:
        # gRPC carries raw bytes; the REST JSON form carries base64 text.
        raw = [x if isinstance(x, bytes) else _b64decode(x, where) for where, x in images]
        try:
            return self.counter.preprocess(raw)
        except ImageError as e:
            raise InvalidInput(str(e)) from None

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> _Batch:
        if isinstance(payload, InferRequest):
            batch = _Batch(self._v2_images(payload), request=payload)
            expected, parameters = self._v2_expected(payload, len(batch.images)), payload.parameters
            if expected is None and set(self._requested_outputs(payload)) & set(V2_AUDIT_OUTPUTS):
                raise InvalidInput(f"outputs {list(V2_AUDIT_OUTPUTS)} need the input {V2_EXPECTED_INPUT!r}")
        else:
            batch = _Batch(self._v1_images(payload))
            expected, parameters = self._v1_expected(payload), payload.get("parameters")
        if expected is not None:
            try:
                batch.threshold = online.parse_threshold(parameters, self.counter.config.audit_threshold)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
            batch.expected = expected
        return batch

    @staticmethod
    def _v1_expected(body: Any) -> list[int | None] | None:
        """Each instance's optional ``expected_quantity`` (None when no instance has one)."""
        if isinstance(body, bytes):
            body = json.loads(body)  # _v1_images has checked that it parses
        values = [inst.get(online.EXPECTED_FIELD) for inst in body["instances"]]
        if all(v is None for v in values):
            return None
        try:
            return [None if v is None else online.parse_expected(v, f"instances[{i}].{online.EXPECTED_FIELD}")
                    for i, v in enumerate(values)]
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    def _v2_expected(self, request: InferRequest, n: int) -> list[int] | None:
        tensor = self._v2_inputs(request).get(V2_EXPECTED_INPUT)
        if tensor is None:
            return None
        if tensor.datatype not in ("INT64", "INT32"):
            raise InvalidInput(f"input {V2_EXPECTED_INPUT!r} must be INT64 or INT32, not {tensor.datatype}")
        data = tensor.data if tensor._raw_data is None else np.frombuffer(
            tensor._raw_data, dtype=np.int64 if tensor.datatype == "INT64" else np.int32)
        data = np.asarray(data).reshape(-1).tolist() if not isinstance(data, list) else data
        if len(data) != n:
            raise InvalidInput(f"input {V2_EXPECTED_INPUT!r} has {len(data)} elements for {n} images")
        try:
            return [online.parse_expected(v, f"{V2_EXPECTED_INPUT}[{i}]") for i, v in enumerate(data)]
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    async def predict(self, batch: _Batch, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        loop = asyncio.get_running_loop()
        # Decoding (base64, then the image) runs on the loop's thread pool, the forward pass on
        # the model's own thread: the event loop keeps answering health checks meanwhile.
        tensor = await loop.run_in_executor(None, self._decode, batch.images)
        if self._batcher:
            probs = await self._batcher(tensor)
        else:
            probs = await loop.run_in_executor(self._forward_pool, self.counter.forward, tensor)
        predictions = self.counter.postprocess(probs)
        self._observe(predictions)
        verdicts = None
        if batch.expected is not None:
            try:
                verdicts = online.judge(probs.tolist(), batch.expected, self.counter.config, batch.threshold)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
        if batch.request is not None:
            return self._v2_response(predictions, probs, batch.request, verdicts)
        return self._v1_response(predictions, verdicts)

    def _observe(self, predictions: list[Prediction]) -> None:
        labels = (self.name, self.version)
        count, confidence, low = (PREDICTED_COUNT.labels(*labels), CONFIDENCE.labels(*labels),
                                  LOW_CONFIDENCE.labels(*labels))
        for p in predictions:
            count.observe(p.count)
            confidence.observe(p.confidence)
            if p.confidence < self.low_confidence:
                low.inc()
        IMAGES.labels(*labels).inc(len(predictions))

    def _v1_response(self, predictions: list[Prediction], verdicts: list[dict | None] | None = None) -> dict:
        rows = [p.to_dict() for p in predictions]
        for row, verdict in zip(rows, verdicts or []):
            row.update(verdict or {})
        return {"predictions": rows, "classes": self.counter.config.class_names,
                "model_name": self.name, "model_version": self.version}

    def _v2_response(self, predictions: list[Prediction], probs: torch.Tensor, request: InferRequest,
                     verdicts: list[dict] | None = None) -> InferResponse:
        n = len(predictions)
        outputs = {
            "count": lambda: InferOutput("count", [n], "INT64", data=[p.count for p in predictions]),
            "label": lambda: InferOutput("label", [n], "BYTES", data=[p.label for p in predictions]),
            "confidence": lambda: InferOutput("confidence", [n], "FP32", data=[p.confidence for p in predictions]),
            "probabilities": lambda: InferOutput("probabilities", list(probs.shape), "FP32",
                                                 data=probs.reshape(-1).tolist()),
        }
        names = self._requested_outputs(request)
        if verdicts is not None:
            outputs["p_expected"] = lambda: InferOutput("p_expected", [n], "FP32",
                                                        data=[v["p_expected"] for v in verdicts])
            outputs["flagged"] = lambda: InferOutput("flagged", [n], "BOOL", data=[v["flagged"] for v in verdicts])
            if not request.request_outputs:
                names = names + list(V2_AUDIT_OUTPUTS)
        return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.version,
                             infer_outputs=[outputs[name]() for name in names],
                             parameters={"classes": json.dumps(self.counter.config.class_names)},
                             use_binary_outputs=request.use_binary_outputs,
                             requested_outputs=request.request_outputs)


class RepositoryDisabled(NotImplementedError):
    def __init__(self):
        # KServe's gRPC interceptor answers UNIMPLEMENTED with the exception's .reason.
        self.reason = "the model repository extension is disabled on this server"
        super().__init__(self.reason)


class _DisabledRepository:
    """Stands in for KServe's model repository extension: load and unload are not served.

    Over the data plane, unload would take the model down for good (predict 404, load 503) while
    liveness stayed 200. REST answers 404 before reaching here (guard.py); gRPC gets UNIMPLEMENTED.
    """

    async def load(self, model_name: str):
        raise RepositoryDisabled()

    async def unload(self, model_name: str):
        raise RepositoryDisabled()


class _ClientErrorsOnOneLine(logging.Filter):
    """KServe logs every handled error with its traceback, ~30 lines for each bad request.

    A client's mistake (4xx, or gRPC INVALID_ARGUMENT / NOT_FOUND / UNIMPLEMENTED) becomes one line
    with its reason; tracebacks stay for server errors (5xx).
    """

    CLIENT_ERRORS = (InvalidInput, ModelNotFound, NotImplementedError, RequestValidationError)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.CLIENT_ERRORS):
            record.msg, record.args = "client error %s: %s", (type(exc).__name__, _one_line(str(exc)))
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


async def _validation_error_to_400(_, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON or a body that is not an inference request: 400 ``{"error": ...}``, not FastAPI's 422."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    # loc is e.g. ("body", "InferenceRequest", "inputs", 0): keep the path inside the request.
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not str(x)[:1].isupper())
    reason = f"invalid request body{' at ' + where if where else ''}: {first.get('msg', 'not valid')}"
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more errors)"
    logger.warning("client error RequestValidationError: %s", _one_line(reason))
    return JSONResponse(status_code=400, content={"error": reason})


async def _http_error(_, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown path, unparsable body) in the protocol's shape, not ``{"detail": ...}``."""
    if exc.status_code < 500:
        logger.warning("client error %d: %s", exc.status_code, _one_line(str(exc.detail)))
    return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)


def readiness(model: BinCounterModel):
    """The server's readiness check (REST and gRPC): the model's. KServe's says True while the process runs."""
    async def ready() -> bool:
        return bool(model.ready)
    return ready


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
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                        help="how to run the network (docs/benchmarks/serving.md compares them)")
    parser.add_argument("--torch-threads", default=0, type=int,
                        help="intra-op threads for the forward pass; 0: $OMP_NUM_THREADS if set, "
                             "else the CPUs the process may use (affinity and cgroup CPU limit)")
    limits = parser.add_argument_group("limits (what one request may cost; more is a 4xx)")
    limits.add_argument("--max-request-bytes", default=DEFAULT_MAX_REQUEST_BYTES, type=int,
                        help="most bytes in one HTTP request body; more is a 413, refused before it is read")
    limits.add_argument("--max-batch-size", default=DEFAULT_MAX_BATCH_SIZE, type=int,
                        help="most images in one request")
    limits.add_argument("--max-image-bytes", default=DEFAULT_MAX_IMAGE_BYTES, type=int,
                        help="most bytes in one encoded image")
    limits.add_argument("--max-image-pixels", default=DEFAULT_MAX_IMAGE_PIXELS, type=int,
                        help="most pixels in one image, from its header (decompression-bomb guard)")
    limits.add_argument("--max-aspect-ratio", default=DEFAULT_MAX_ASPECT_RATIO, type=float,
                        help="longest over shortest side of one image")
    limits.add_argument("--max-jpeg-scans", default=DEFAULT_MAX_JPEG_SCANS, type=int,
                        help="most scans in one JPEG (each is a full decoding pass)")
    batching = parser.add_argument_group("cross-request batching (off by default: on a CPU it buys little)")
    batching.add_argument("--batching-max-size", default=0, type=int,
                          help="gather up to this many images from concurrent requests into one forward pass; "
                               "0 or 1: off")
    batching.add_argument("--batching-max-wait-ms", default=5.0, type=float,
                          help="longest a request waits for others to join its batch")
    parser.add_argument("--low-confidence", default=DEFAULT_LOW_CONFIDENCE, type=float,
                        help="an answer whose probability is below this counts in bincounter_low_confidence_total")
    # Our defaults for KServe's flags: the endpoint name, and REST only (an InferenceService
    # exposes one port; pass --enable_grpc true for gRPC on --grpc_port).
    parser.set_defaults(model_name="bincounter", http_port=8080, enable_grpc=False)
    return parser


def build_model(args: argparse.Namespace) -> BinCounterModel:
    """The model object for parsed arguments (not loaded yet)."""
    limits = ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                         max_aspect_ratio=args.max_aspect_ratio, max_jpeg_scans=args.max_jpeg_scans)
    return BinCounterModel(args.model_name, args.model, runtime=args.runtime, max_batch_size=args.max_batch_size,
                           limits=limits, batch_max_size=args.batching_max_size,
                           batch_max_wait_ms=args.batching_max_wait_ms, low_confidence=args.low_confidence)


def main(args: argparse.Namespace) -> int:
    if args.configure_logging:  # before load(), so its log lines show (ModelServer would do it later)
        kserve.logging.configure_logging(args.log_config_file)
    errors.check_port_free(args.http_port)  # before the model load, which can take minutes
    if args.enable_grpc:
        errors.check_port_free(args.grpc_port, what="--grpc_port")
    if args.workers != 1:
        # KServe runs several workers by re-importing its app in each process, without the
        # middleware and handlers added below (body limit, no repository extension, ...).
        print(f"error: --workers {args.workers}: this server runs one worker process (its request guards live in "
              f"it); scale with replicas, and use --torch-threads for the CPUs of one", file=sys.stderr)
        return 2
    logger.addFilter(_ClientErrorsOnOneLine())
    # Threads first: ONNX Runtime sizes its pool when the session is created in load().
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpus.cpu_limit())
    logger.info("the forward pass uses %d intra-op threads", torch.get_num_threads())
    model = build_model(args)
    try:
        model.load()
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Every server setting is passed explicitly: kserve.model_server's own module-level
    # defaults come from sys.argv, which is not this parser's view of the command line.
    server = kserve.ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers, max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format, event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    server.model_repository_extension = _DisabledRepository()

    server.dataplane.ready = readiness(model)
    # PIL's own bomb guard (a process-wide setting) follows our limit too.
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    app = kserve.model_server.app
    app.add_exception_handler(RequestValidationError, _validation_error_to_400)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(DataPlaneGuard, model_version=lambda name: model.version if name == model.name else None,
                       max_body_bytes=args.max_request_bytes)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
