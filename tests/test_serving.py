"""The model server, run for real: `bincounter serve` on a free localhost port, queried over HTTP.

The model is a randomly initialised ResNet18 at a small input size (serving does not
need a trained model; it needs answers that match a direct forward pass).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bincounter.model import ModelConfig, build_model, load_model_dir, save_model_dir
from bincounter.presets import eval_transform
from bincounter.serving import client as serving_client
from bincounter.serving import server as serving_server
from bincounter.serving.server import BinCounterModel, ModelLoadError

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bincounter"
MAX_BATCH = 16
MAX_PIXELS = 4_000_000
MAX_REQUEST = 4 * 1024 * 1024
VERSION = "3"


# ---------------------------------------------------------------- helpers


def jpeg(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_jpeg(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny real JPEG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1_body(images: list[bytes]) -> dict:
    return {"instances": [{"image": {"b64": b64(x)}} for x in images]}


def v2_body(images: list[bytes]) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": [b64(x) for x in images]}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_probs(model_dir: str, images: list[bytes]) -> np.ndarray:
    """A direct forward pass: PIL decode, the eval transform, the network, softmax.

    Like the server, a JPEG over twice the resize is decoded in draft mode (a 36 px resize here,
    so the real photos are); bincounter/imaging.py's own tests cover the decoding.
    """
    model, cfg = load_model_dir(model_dir)
    tf = eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std)

    def decode(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG" and min(image.size) >= 4 * cfg.resize_size:
            scale = min(image.size) / (2 * cfg.resize_size)
            image.draft("RGB", (math.ceil(image.size[0] / scale), math.ceil(image.size[1] / scale)))
        return image.convert("RGB")

    batch = torch.stack([tf(decode(x)) for x in images])
    with torch.inference_mode():
        return torch.softmax(model(batch), dim=1).numpy()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    # A 32 px input keeps the forward pass cheap on 2 busy cores; serving is resolution-agnostic.
    save_model_dir(build_model("resnet18", 6), ModelConfig(arch="resnet18", max_count=5, k_or_more=True,
                                                           input_size=32, resize_size=36, version=VERSION), str(path))
    return str(path)


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory) -> dict:
    """The server (REST and gRPC), its log, its ports."""
    port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # TorchScript starts in ~1 s (ONNX export takes ~10 s; test_serving_images.py checks ONNX against it).
    cmd = [sys.executable, "-m", "bincounter.cli", "serve", "--model", model_dir, "--model-name", MODEL_NAME,
           "--port", str(port), "--max-batch-size", str(MAX_BATCH), "--max-image-pixels", str(MAX_PIXELS),
           "--max-request-bytes", str(MAX_REQUEST), "--runtime", "torchscript", "--enable_grpc", "true",
           "--grpc_port", str(grpc_port), "--enable_latency_logging", "false",
           "--torch-threads", "1"]  # 1 thread: robust on a busy 2-core CI
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready in 120 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "log": log, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served["url"]


@pytest.fixture(scope="module")
def sample_jpegs(sample_dir) -> list[bytes]:
    """Four real ABID photos (different sizes and counts)."""
    return [(sample_dir / f"{i}.jpg").read_bytes() for i in ("00004", "00013", "00036", "00055")]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


# ---------------------------------------------------------------- health


def test_health_and_readiness(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get(f"/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
    assert http.get(f"/v2/models/{MODEL_NAME}/ready").json() == {"name": MODEL_NAME, "ready": True}
    meta = http.get(f"/v2/models/{MODEL_NAME}").json()
    assert meta["versions"] == [VERSION] and "parameters" not in meta  # a list, never null
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"count", "label", "confidence", "probabilities"}
    assert http.get("/v1/models/other").status_code == 404


# ---------------------------------------------------------------- answers match a direct forward pass


def test_v1_predict_matches_direct_forward(http, model_dir, sample_jpegs):
    images = sample_jpegs + [jpeg(48, 40, seed=1), jpeg(300, 200, seed=2)]
    r = http.post(f"/v1/models/{MODEL_NAME}:predict", json=v1_body(images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL_NAME and body["model_version"] == VERSION
    assert body["classes"] == ["0", "1", "2", "3", "4", "5+"]
    preds = body["predictions"]
    assert len(preds) == len(images)
    ref = reference_probs(model_dir, images)
    for p, want in zip(preds, ref):
        assert set(p) == {"count", "label", "confidence", "probabilities"}
        np.testing.assert_allclose(p["probabilities"], want, atol=1e-5)
        assert p["count"] == int(want.argmax())
        assert p["label"] == body["classes"][p["count"]]
        assert p["confidence"] == pytest.approx(float(want.max()), abs=1e-5)


def test_v2_infer_matches_direct_forward(http, model_dir, sample_jpegs):
    images = [jpeg(64, 64, seed=3)] + sample_jpegs[:2]
    body = v2_body(images)
    body["id"] = "req-42"
    r = http.post(f"/v2/models/{MODEL_NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_name"] == MODEL_NAME and answer["model_version"] == VERSION and answer["id"] == "req-42"
    assert json.loads(answer["parameters"]["classes"]) == ["0", "1", "2", "3", "4", "5+"]
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["count"]["datatype"] == "INT64" and out["count"]["shape"] == [3]
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [3, 6]
    ref = reference_probs(model_dir, images)
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(3, 6), ref, atol=1e-5)
    assert out["count"]["data"] == ref.argmax(axis=1).tolist()
    np.testing.assert_allclose(out["confidence"]["data"], ref.max(axis=1), atol=1e-5)
    assert out["label"]["data"] == [["0", "1", "2", "3", "4", "5+"][k] for k in ref.argmax(axis=1)]


def test_kserve_rest_client(server, model_dir, sample_jpegs):
    """KServe's own Python client, V2 (InferRequest/InferResponse) and V1 (dict)."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    images = sample_jpegs[2:]
    ref = reference_probs(model_dir, images)

    async def query():
        v2 = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        v1 = InferenceRESTClient(RESTConfig(protocol="v1", retries=0, timeout=30))
        try:
            tensor = InferInput(name="image", shape=[len(images)], datatype="BYTES")
            tensor.set_data_from_numpy(np.array([b64(x) for x in images], dtype=object), binary_data=False)
            res2 = await v2.infer(server, InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]),
                                  model_name=MODEL_NAME)
            res1 = await v1.infer(server, v1_body(images), model_name=MODEL_NAME)
            # The client's default: raw JPEG bytes in the binary tensor extension.
            raw = InferInput(name="image", shape=[len(images)], datatype="BYTES")
            raw.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
            res3 = await v2.infer(server, InferRequest(model_name=MODEL_NAME, infer_inputs=[raw]),
                                  model_name=MODEL_NAME)
            return res2, res1, res3
        finally:
            await v2.close()
            await v1.close()

    res2, res1, res3 = asyncio.run(query())
    assert res2.model_name == MODEL_NAME  # (InferResponse.from_rest drops model_version)
    np.testing.assert_allclose(res2.get_output_by_name("probabilities").as_numpy(), ref, atol=1e-5)
    assert res2.get_output_by_name("count").as_numpy().tolist() == ref.argmax(axis=1).tolist()
    np.testing.assert_allclose([p["probabilities"] for p in res1["predictions"]], ref, atol=1e-5)
    np.testing.assert_allclose(res3.get_output_by_name("probabilities").as_numpy(), ref, atol=1e-5)


def test_v2_binary_extension_errors_are_4xx(http):
    jpg = jpeg(seed=8)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(jpg) + 100}}]}).encode()
    body = header + len(jpg).to_bytes(4, "little") + jpg
    r = http.post(V2, content=body, headers={"Inference-Header-Content-Length": str(len(header)),
                                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and f"claims {4 + len(jpg) + 100} binary bytes" in r.json()["error"]
    r = http.post(V2, content=body, headers={"Inference-Header-Content-Length": str(len(body) + 1)})
    assert r.status_code == 400 and "outside the body" in r.json()["error"]
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(jpg)}}]}).encode()
    good = header + len(jpg).to_bytes(4, "little") + jpg
    r = http.post(V2, content=good, headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["name"] == "count"


# ---------------------------------------------------------------- bad input: 4xx naming the problem, then service as usual

V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"
JSON = {"Content-Type": "application/json"}


def _truncated() -> bytes:
    data = jpeg(200, 160, seed=5)
    return data[: len(data) // 2]


BAD_REQUESTS = {
    "v1 malformed json": (V1, b'{"instances": [', 400, "Unrecognized request format"),
    "v2 malformed json": (V2, b'{"inputs": [', 400, "invalid request body"),
    "v2 not an inference request": (V2, {"inputs": "abc"}, 400, "invalid request body at inputs"),
    "v1 deeply nested json": (V1, b"[" * 100000, 400, "depth limit exceeded"),
    "v2 deeply nested json": (V2, b"[" * 100000, 400, "error parsing the body"),
    "v1 not json at all": (V1, b"\xff\xd8 raw jpeg bytes", 400, "Unrecognized request format"),
    "v1 invalid base64": (V1, {"instances": [{"image": {"b64": "not*base64!"}}]}, 400, "instances[0].image.b64 is not valid base64"),
    "v2 invalid base64": (V2, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 400, "image[0] is not valid base64"),
    "v1 not an image": (V1, v1_body([b"hello, I am text"]), 400, "image 0: the bytes are not an image"),
    "v2 not an image": (V2, v2_body([jpeg(), b"GIF89a"]), 400, "image 1: the bytes are not an image"),
    "v1 truncated jpeg": (V1, v1_body([_truncated()]), 400, "truncated or corrupt"),
    "v2 truncated jpeg": (V2, v2_body([_truncated()]), 400, "truncated or corrupt"),
    "v1 decompression bomb": (V1, v1_body([bomb_jpeg()]), 400, "image 0: the image is too large"),
    "v2 decompression bomb": (V2, v2_body([bomb_jpeg(4000, 3000)]), 400, "image 0: the image is too large"),
    "v1 empty batch": (V1, {"instances": []}, 400, "empty batch"),
    "v2 empty batch": (V2, {"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}, 400, "empty batch"),
    "v1 oversized batch": (V1, v1_body([jpeg(8, 8)] * (MAX_BATCH + 1)), 400, f"batch of {MAX_BATCH + 1} images is larger than the limit of {MAX_BATCH}"),
    "v2 oversized batch": (V2, v2_body([jpeg(8, 8)] * (MAX_BATCH + 1)), 400, "is larger than the limit"),
    "v1 wrong instance shape": (V1, {"instances": [{"b64": "aGk="}]}, 400, 'instances[0] must be {"image"'),
    "v1 no instances": (V1, {"inputs": []}, 400, "'instances' list"),
    "v2 wrong datatype": (V2, {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "must have a BYTES input 'image'"),
    "v2 unknown input": (V2, {"inputs": [*v2_body([jpeg()])["inputs"], {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "known inputs"),
    "v2 unknown output": (V2, {**v2_body([jpeg()]), "outputs": [{"name": "volume"}]}, 400, "unknown output(s) ['volume']"),
    "v2 negative shape": (V2, {"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "has shape [-1]"),
    "v2 shape mismatch": (V2, {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "has shape [2] but 1 elements"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_then_service_continues(http, case):
    path, body, status, message = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers=JSON)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"]  # the protocol's error shape
    good = http.post(path, json=(v1_body if path == V1 else v2_body)([jpeg(seed=7)]))
    assert good.status_code == 200, good.text


def smooth_png(width: int, height: int, seed: int) -> bytes:
    """A large but small-file PNG (a gradient): costly to decode, quick to upload.

    PNG, not JPEG: the server decodes a large JPEG in draft mode, which would make it cheap.
    """
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = ((x + y + seed * 10) % 256).astype(np.uint8).repeat(3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_health_answers_during_a_forward_pass(http, server, model_dir):
    """Decoding and the forward pass run off the event loop: liveness keeps answering meanwhile.

    A blocked loop would leave a gap in the liveness answers as long as the decoding itself.
    """
    from bincounter.serving.inference import Counter

    images = [smooth_png(2000, 2000, seed=s) for s in range(MAX_BATCH)]
    counter = Counter(*load_model_dir(model_dir))
    t = time.perf_counter()
    counter.preprocess(images)
    decode_s = time.perf_counter() - t
    body = v1_body(images)

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(httpx.post, f"{server}{V1}", json=body, timeout=120)
        answered = []
        while not job.done():
            assert http.get("/v2/health/live").status_code == 200
            answered.append(time.perf_counter())
        assert job.result().status_code == 200
    gaps = np.diff(answered)
    assert len(answered) >= 3 and gaps.max() < 0.6 * decode_s, (
        f"liveness went unanswered for {gaps.max():.2f} s; decoding takes {decode_s:.2f} s")


# ---------------------------------------------------------------- load


def test_concurrent_clients_zero_errors(server):
    """16 concurrent clients x 50 requests each, V1 and V2 mixed."""
    bodies = {V1: v1_body([jpeg(32, 32, seed=10)]), V2: v2_body([jpeg(32, 32, seed=11)])}

    def client(i: int) -> list[str]:
        errors = []
        with httpx.Client(base_url=server, timeout=60) as c:
            for k in range(50):
                path = V1 if (i + k) % 2 else V2
                r = c.post(path, json=bodies[path])
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
        return errors

    with ThreadPoolExecutor(16) as pool:
        errors = [e for errs in pool.map(client, range(16)) for e in errs]
    assert errors == []


# ---------------------------------------------------------------- load() fails fast


def test_load_fails_fast_on_a_bad_folder(tmp_path, model_dir):
    missing = BinCounterModel(MODEL_NAME, str(tmp_path / "nope"), runtime="eager")
    with pytest.raises(ModelLoadError, match=r"nope.*No config.json"):
        missing.load()
    assert not missing.ready

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text(Path(model_dir, "config.json").read_text())
    with pytest.raises(ModelLoadError, match="No model.pt"):
        BinCounterModel(MODEL_NAME, str(incomplete), runtime="eager").load()

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"arch": "resnet18", "colour": "red"}))
    (unknown / "model.pt").write_bytes(Path(model_dir, "model.pt").read_bytes())
    with pytest.raises(ModelLoadError, match="Unknown keys.*colour"):
        BinCounterModel(MODEL_NAME, str(unknown), runtime="eager").load()

    # The entrypoint reports it and exits non-zero instead of serving an unready model.
    args = serving_server.get_args_parser().parse_args(["--model", str(tmp_path / "nope"), "--port", "1",
                                                        "--configure_logging", "false"])
    assert serving_server.main(args) == 1


def test_load_from_s3(model_dir, s3_bucket, sample_jpegs):
    """--model s3://bucket/prefix loads the folder straight from S3 (here: moto server mode)."""
    model, config = load_model_dir(model_dir)
    uri = f"s3://{s3_bucket}/models/bincounter"
    save_model_dir(model, config, uri)
    served = BinCounterModel(MODEL_NAME, uri, runtime="eager")
    assert served.load() and served.version == VERSION
    [pred] = served.counter.predict(sample_jpegs[:1])
    np.testing.assert_allclose(pred.probabilities, reference_probs(model_dir, sample_jpegs[:1])[0], atol=1e-5)


def test_load_sets_ready_last(model_dir):
    model = BinCounterModel(MODEL_NAME, model_dir, runtime="eager")
    assert not model.ready
    assert model.load() is True and model.ready and model.version == VERSION


def test_serve_flags_map_onto_kserve():
    args = serving_server.get_args_parser().parse_args(["--model", "/m", "--model-name", "x", "--port", "9000"])
    assert (args.model, args.model_name, args.http_port, args.enable_grpc) == ("/m", "x", 9000, False)
    defaults = serving_server.get_args_parser().parse_args([])
    assert (defaults.model, defaults.model_name, defaults.http_port) == ("/mnt/models", "bincounter", 8080)
    assert (defaults.runtime, defaults.batching_max_size) == ("onnx", 0)
    # Several KServe workers would run without this server's request guards: refused.
    workers = serving_server.get_args_parser().parse_args(["--workers", "2", "--configure_logging", "false"])
    assert serving_server.main(workers) == 2


# ---------------------------------------------------------------- client


def test_predict_cli_prints_count_per_image(server, model_dir, sample_jpegs, tmp_path, capsys):
    paths = []
    for i, data in enumerate(sample_jpegs[:3]):
        paths.append(tmp_path / f"bin{i}.jpg")
        paths[-1].write_bytes(data)
    ref = reference_probs(model_dir, sample_jpegs[:3])
    for protocol in ("v1", "v2"):
        args = serving_client.get_args_parser().parse_args(
            [*map(str, paths), "--url", server, "--protocol", protocol, "--batch-size", "2"])
        assert serving_client.main(args) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 3
        for line, path, want in zip(lines, paths, ref):
            label = ["0", "1", "2", "3", "4", "5+"][int(want.argmax())]
            assert line.startswith(f"{path}\tcount={label}\tconfidence={want.max():.3f}\tmodel_version={VERSION}")


def test_predict_library_returns_structured_results(server, model_dir, sample_jpegs):
    ref = reference_probs(model_dir, sample_jpegs)
    for protocol in ("v1", "v2"):
        results = serving_client.predict(sample_jpegs, url=server, protocol=protocol, names=list("abcd"))
        assert [r.image for r in results] == list("abcd")
        np.testing.assert_allclose([r.probabilities for r in results], ref, atol=1e-5)
        assert [r.count for r in results] == ref.argmax(axis=1).tolist()
        assert all(r.model_version == VERSION for r in results)
    with pytest.raises(serving_client.PredictError, match="400.*not an image"):
        serving_client.predict([b"nope"], url=server)
    with pytest.raises(serving_client.PredictError, match="404"):
        serving_client.predict([jpeg()], url=server, model_name="other")


def test_predict_sends_token_and_host_header():
    """Inside Kubeflow the ingress needs the bearer token and the InferenceService's host."""
    seen = {}

    def ingress(request: httpx.Request) -> httpx.Response:
        seen.update(url=str(request.url), auth=request.headers.get("authorization"), host=request.headers.get("host"))
        return httpx.Response(200, json={"predictions": [{"count": 2, "label": "2", "confidence": 0.9,
                                                          "probabilities": [0, 0, 0.9, 0.1, 0, 0]}],
                                         "model_version": "5"})

    with httpx.Client(transport=httpx.MockTransport(ingress)) as c:
        [r] = serving_client.predict([jpeg()], url="http://gateway.local/", token="T0K",
                                     host_header="bincounter.team.example.com", client=c)
    assert seen == {"url": "http://gateway.local/v1/models/bincounter:predict", "auth": "Bearer T0K",
                    "host": "bincounter.team.example.com"}
    assert (r.count, r.model_version) == (2, "5")


def test_torch_threads_and_split_processes_follow_the_pod_cpu_limit(monkeypatch):
    """A pod limited to 1.5 CPUs on a big node gets 2 torch threads, not one per node core; split's
    default process count follows the same limit."""
    from bincounter import cpus
    from bincounter.data import split as split_lib

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpus, "_cgroup_v2_quota", lambda: 0.5)
    assert cpus.cpu_limit() == 1 and split_lib.default_workers() == 1  # split sizes its processes alike
    monkeypatch.setattr(cpus, "_cgroup_v2_quota", lambda: 1.5)
    assert cpus.cpu_limit() == min(cores, 2)
    monkeypatch.setattr(cpus, "_cgroup_v2_quota", lambda: None)  # v2 without a limit
    monkeypatch.setattr(cpus, "_cgroup_v1_quota", lambda: None)
    assert cpus.cpu_limit() == cores == split_lib.default_workers()


# ---------------------------------------------------------------- stock Open Inference Protocol clients as peers


def test_triton_http_client(server, model_dir, sample_jpegs):
    """tritonclient.http: binary tensors (its default), JSON tensors (no Content-Type), outputs by name."""
    import tritonclient.http as triton

    images = sample_jpegs[:2]
    ref = reference_probs(model_dir, images)
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
        assert client.get_model_metadata(MODEL_NAME)["versions"] == [VERSION]
        assert client.is_model_ready(MODEL_NAME, model_version=VERSION)
        for binary in (True, False):
            tensor = triton.InferInput("image", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images if binary else [b64(x).encode() for x in images], dtype=object),
                                       binary_data=binary)
            result = client.infer(MODEL_NAME, [tensor], model_version=VERSION,
                                  outputs=[triton.InferRequestedOutput("count", binary_data=binary),
                                           triton.InferRequestedOutput("probabilities", binary_data=binary)])
            np.testing.assert_allclose(result.as_numpy("probabilities"), ref, atol=1e-5)
            assert result.as_numpy("count").tolist() == ref.argmax(axis=1).tolist()
            assert result.as_numpy("label") is None  # not asked for, not sent
            assert result.get_response()["model_version"] == VERSION
        with pytest.raises(triton.InferenceServerException, match="no version '0'"):
            client.infer(MODEL_NAME, [tensor], model_version="0")
    finally:
        client.close()


TRITON_GRPC_PEER = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
url, model, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
images = [open(p, "rb").read() for p in paths]
client = triton.InferenceServerClient(url)
out = {"ready": client.is_server_ready() and client.is_model_ready(model)}
tensor = triton.InferInput("image", [len(images)], "BYTES")
tensor.set_data_from_numpy(np.array(images, dtype=object))
result = client.infer(model, [tensor])
out["probabilities"] = result.as_numpy("probabilities").tolist()
out["labels"] = [x.decode() for x in result.as_numpy("label")]
out["version"] = result.get_response().model_version
only = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("confidence")])
out["only"] = [o.name for o in only.get_response().outputs]
bad = triton.InferInput("image", [1], "BYTES")
bad.set_data_from_numpy(np.array([b"not a photo"], dtype=object))
for name, call in (("bad", lambda: client.infer(model, [bad])), ("unload", lambda: client.unload_model(model))):
    try:
        call()
        out[name] = "no error"
    except triton.InferenceServerException as e:
        out[name] = [e.status(), e.message()]
out["still_ready"] = client.is_model_ready(model)
print(json.dumps(out))
"""


def test_triton_grpc_client(served, model_dir, sample_jpegs, tmp_path):
    """tritonclient.grpc sends images in raw_input_contents and reads raw_output_contents.

    It runs in its own process: tritonclient.grpc and kserve both register the ``inference.*``
    protobuf messages, and one process cannot hold both.
    """
    images = sample_jpegs[1:]
    paths = []
    for i, data in enumerate(images):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(data)
    run = subprocess.run([sys.executable, "-c", TRITON_GRPC_PEER, served["grpc"], MODEL_NAME, *paths],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    ref = reference_probs(model_dir, images)
    assert out["ready"] and out["version"] == VERSION
    np.testing.assert_allclose(out["probabilities"], ref, atol=1e-5)
    assert out["labels"] == [["0", "1", "2", "3", "4", "5+"][k] for k in ref.argmax(axis=1)]
    assert out["only"] == ["confidence"]
    assert out["bad"][0] == "StatusCode.INVALID_ARGUMENT" and "not an image" in out["bad"][1]
    assert out["unload"][0] == "StatusCode.UNIMPLEMENTED" and "disabled" in out["unload"][1]
    assert out["still_ready"]


def test_kserve_grpc_client(served, model_dir, sample_jpegs):
    """KServe's InferenceGRPCClient, raw bytes in raw_input_contents (its binary_data default)."""
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    images = sample_jpegs[:3]
    ref = reference_probs(model_dir, images)

    async def query():
        client = InferenceGRPCClient(served["grpc"], timeout=30)
        try:
            tensor = InferInput(name="image", shape=[len(images)], datatype="BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
            return await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]))
        finally:
            await client.close()

    result = asyncio.run(query())
    np.testing.assert_allclose(result.get_output_by_name("probabilities").as_numpy(), ref, atol=1e-5)
    assert result.model_version == VERSION


# ---------------------------------------------------------------- safety: no request takes the server down


def test_no_unload_over_the_data_plane(http):
    for action in ("load", "unload"):
        r = http.post(f"/v2/repository/models/{MODEL_NAME}/{action}")
        assert r.status_code == 404 and "repository extension is disabled" in r.json()["error"]
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.post(V2, json=v2_body([jpeg()])).status_code == 200


def test_readiness_reflects_the_model(model_dir):
    """The server's readiness (REST /v2/health/ready and gRPC ServerReady) is the model's.

    KServe's own answer is True for as long as the process runs, model loaded or not.
    """
    model = BinCounterModel(MODEL_NAME, model_dir, runtime="eager")
    ready = serving_server.readiness(model)
    assert asyncio.run(ready()) is False
    model.load()
    assert asyncio.run(ready()) is True


def test_body_size_limit_is_413_before_reading(server, http):
    big = b"x" * (MAX_REQUEST + 1)
    r = http.post(V1, content=big, headers=JSON)
    assert r.status_code == 413 and "more than the limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused once the limit is passed
        for _ in range(MAX_REQUEST // 65536 + 2):
            yield b"y" * 65536

    r = http.post(V2, content=chunks(), headers=JSON)
    assert r.status_code == 413
    # The claim alone is enough: the server answers without waiting for a body that never comes.
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(f"POST {V1} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode())
        assert s.recv(200).startswith(b"HTTP/1.1 413")


def test_content_types(http):
    """JSON is read as JSON whatever the Content-Type says; a deeply nested text body is a 400 (was a 500)."""
    r = http.post(V1, content=b"[" * 100000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "not JSON (RecursionError)" in r.json()["error"]
    r = http.post(V2, content=b"[" * 100000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = http.post(V2, content=json.dumps(v2_body([jpeg()])).encode(), headers={"Content-Type": ""})
    assert r.status_code == 200, r.text
    r = http.post(V2, content=json.dumps(v2_body([jpeg()])).encode(),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
    assert r.status_code == 200, r.text


def test_versions_paths(http):
    base = f"/v2/models/{MODEL_NAME}/versions/{VERSION}"
    assert http.get(base).json()["versions"] == [VERSION]
    assert http.get(f"{base}/ready").json() == {"name": MODEL_NAME, "ready": True}
    r = http.post(f"{base}/infer", json=v2_body([jpeg()]))
    assert r.status_code == 200 and r.json()["model_version"] == VERSION
    for path in ("", "/ready", "/infer"):
        r = http.request("POST" if path == "/infer" else "GET", f"/v2/models/{MODEL_NAME}/versions/9{path}",
                         json=v2_body([jpeg()]))
        assert r.status_code == 404 and f"serves version '{VERSION}'" in r.json()["error"]
    assert http.get("/no/such/path").json() == {"error": "Not Found"}


def test_outputs_by_name_and_no_null_fields(http):
    r = http.post(V2, json={**v2_body([jpeg(), jpeg(seed=1)]), "outputs": [{"name": "label"}, {"name": "count"}]})
    answer = r.json()
    assert [o["name"] for o in answer["outputs"]] == ["label", "count"]
    assert all("parameters" not in o for o in answer["outputs"])  # optional: absent, not null


def test_client_errors_log_one_line_server_errors_keep_tracebacks(served, http):
    log = served["log"]
    before = log.read_text().count("\n")
    r = http.post(V1, json=v1_body([b"definitely not an image"]))
    assert r.status_code == 400
    time.sleep(0.3)
    new = log.read_text().splitlines()[before:]
    reasons = [line for line in new if "not an image" in line]
    assert len(reasons) == 1 and "WARNING" in reasons[0], new
    assert not any("Traceback" in line for line in new), new


def test_prometheus_drift_metrics(http):
    def scrape() -> dict[str, float]:
        values = {}
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("bincounter_") and f'model_version="{VERSION}"' in line:
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0] + ("{le=" + name.split('le="')[1].split('"')[0] + "}"
                                             if 'le="' in name else "")] = float(value)
        return values

    before = scrape()
    r = http.post(V1, json=v1_body([jpeg(seed=s) for s in range(3)]))
    preds = r.json()["predictions"]
    after = scrape()
    assert after["bincounter_predicted_count_count"] - before.get("bincounter_predicted_count_count", 0) == 3
    assert after["bincounter_confidence_count"] - before.get("bincounter_confidence_count", 0) == 3
    low = sum(p["confidence"] < 0.5 for p in preds)  # an untrained 6-class model: all of them
    assert after["bincounter_low_confidence_total"] - before.get("bincounter_low_confidence_total", 0) == low
    zeros = sum(p["count"] == 0 for p in preds)
    assert after["bincounter_predicted_count_bucket{le=0.0}"] - \
        before.get("bincounter_predicted_count_bucket{le=0.0}", 0) == zeros


def test_cross_request_batching_in_the_model(model_dir, sample_jpegs, one_torch_thread):
    """With --batching-max-size, concurrent requests share forward passes and get their own answers."""
    model = BinCounterModel(MODEL_NAME, model_dir, runtime="eager", batch_max_size=8, batch_max_wait_ms=200)
    model.load()
    passes = []
    forward = model.counter.forward
    model._batcher.forward = lambda batch: passes.append(len(batch)) or forward(batch)

    async def one(body):
        return await model.predict(await model.preprocess(body))

    async def run():
        return await asyncio.gather(*(one(v1_body([x])) for x in sample_jpegs))

    answers = asyncio.run(run())
    model.stop()
    assert sum(passes) == len(sample_jpegs) and len(passes) < len(sample_jpegs)
    ref = reference_probs(model_dir, sample_jpegs)
    np.testing.assert_allclose([a["predictions"][0]["probabilities"] for a in answers], ref, atol=1e-5)
