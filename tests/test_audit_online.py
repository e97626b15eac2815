"""The audit online: ``expected_quantity`` per instance (V1) or as a V2 input, answered with
``p_expected`` and ``flagged``, against a real ``bincounter serve`` on 127.0.0.1, and
``bincounter predict --expected``. The model has a fitted temperature (2.0), so the served
probabilities must be the calibrated ones."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from bincounter.audit import online
from bincounter.model import ModelConfig, build_model, load_model_dir, save_model_dir
from bincounter.presets import eval_transform
from bincounter.serving import client

NAME = "bincounter"
V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("online-model")
    save_model_dir(build_model("resnet18", 6), ModelConfig(arch="resnet18", max_count=5, k_or_more=True, input_size=32,
                                                           resize_size=36, temperature=2.0,
                                                           audit_threshold=THRESHOLD), str(path))
    return str(path)


@pytest.fixture(scope="module")
def url(model_dir, tmp_path_factory):
    """A real ``bincounter serve`` on 127.0.0.1 (a free port), as the local engine starts it."""
    from bincounter.engines import local

    log = tmp_path_factory.mktemp("online-server") / "server.log"
    deployment = local.start_server(model_dir, model_name=NAME, log_path=str(log))
    try:
        yield deployment.url
    finally:
        local.stop_server(deployment)


@pytest.fixture(scope="module")
def jpegs(sample_dir) -> list[bytes]:
    return [(sample_dir / f"{i}.jpg").read_bytes() for i in ("00004", "00013", "00036")]


def calibrated(model_dir: str, images: list[bytes]):
    """softmax(logits / T) computed here; large JPEGs are draft-decoded to twice the resize, as the server does."""
    import math

    net, cfg = load_model_dir(model_dir)
    tf = eval_transform(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std)
    batch = []
    for data in images:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG" and min(im.size) >= 4 * cfg.resize_size:
            scale = min(im.size) / (2 * cfg.resize_size)
            im.draft("RGB", (math.ceil(im.size[0] / scale), math.ceil(im.size[1] / scale)))
        batch.append(tf(im.convert("RGB")))
    with torch.inference_mode():
        return torch.softmax(net(torch.stack(batch)) / cfg.temperature, dim=1).numpy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_v1_instances_with_expected_quantity_get_p_expected_and_flagged(url, model_dir, jpegs):
    body = {"instances": [{"image": {"b64": b64(jpegs[0])}, "expected_quantity": 2},
                          {"image": {"b64": b64(jpegs[1])}},
                          {"image": {"b64": b64(jpegs[2])}, "expected_quantity": 9}]}
    r = httpx.post(url + V1, json=body, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = calibrated(model_dir, jpegs)
    assert preds[0]["probabilities"] == pytest.approx(probs[0].tolist(), abs=1e-5)  # the temperature is applied
    assert preds[0]["p_expected"] == pytest.approx(probs[0][2], abs=1e-5)
    assert preds[0]["flagged"] == (probs[0][2] < THRESHOLD)
    assert "p_expected" not in preds[1] and "flagged" not in preds[1]
    assert preds[2]["p_expected"] == pytest.approx(probs[2][5], abs=1e-5)  # 9 is "5 or more"
    # The request's threshold overrides the model's.
    body["parameters"] = {"threshold": 1.0}
    again = httpx.post(url + V1, json=body, timeout=60).json()["predictions"]
    assert again[0]["flagged"] is True and again[2]["flagged"] is True


def test_v2_expected_quantity_input_gives_two_more_outputs(url, model_dir, jpegs):
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(j) for j in jpegs[:2]]},
                       {"name": "expected_quantity", "shape": [2], "datatype": "INT64", "data": [0, 4]}],
            "parameters": {"threshold": 0.2}}
    r = httpx.post(url + V2, json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    probs = calibrated(model_dir, jpegs[:2])
    assert out["p_expected"]["datatype"] == "FP32" and out["flagged"]["datatype"] == "BOOL"
    assert out["p_expected"]["data"] == pytest.approx([probs[0][0], probs[1][4]], abs=1e-5)
    assert out["flagged"]["data"] == [bool(probs[0][0] < 0.2), bool(probs[1][4] < 0.2)]
    plain = httpx.post(url + V2, json={"inputs": body["inputs"][:1]}, timeout=60).json()
    assert {o["name"] for o in plain["outputs"]} == {"count", "label", "confidence", "probabilities"}


@pytest.mark.parametrize("body, message", [
    ({"instances": [{"image": {"b64": "x"}, "expected_quantity": -1}]}, "must be >= 0"),
    ({"instances": [{"image": {"b64": "x"}, "expected_quantity": "3"}]}, "must be an integer"),
    ({"instances": [{"image": {"b64": "x"}, "expected_quantity": 2.5}]}, "must be an integer"),
    ({"instances": [{"image": {"b64": "x"}, "expected_quantity": 2}], "parameters": {"threshold": 2}},
     "threshold must be a number in (0, 1]"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                 {"name": "expected_quantity", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}, "2 elements"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                 {"name": "expected_quantity", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "INT64 or INT32"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "outputs": [{"name": "p_expected"}]}, "need the input 'expected_quantity'"),
])
def test_bad_expected_quantities_are_400_and_the_server_keeps_serving(url, jpegs, body, message):
    for inp in body.get("inputs", []):
        if inp["name"] == "image":
            inp["data"] = [b64(jpegs[0])]
    for inst in body.get("instances", []):
        inst["image"]["b64"] = b64(jpegs[0])
    path = V2 if "inputs" in body else V1
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200


def test_predict_cli_with_expected(url, sample_dir, capsys):
    paths = [str(sample_dir / "00004.jpg"), str(sample_dir / "00013.jpg")]
    args = client.get_args_parser().parse_args([*paths, "--url", url, "--expected", "1", "3", "--threshold", "1.0"])
    assert client.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("p_expected=" in line and line.endswith("FLAGGED") for line in lines)
    for protocol in ("v1", "v2"):
        results = client.predict([Path(p).read_bytes() for p in paths], url=url, protocol=protocol, expected=[1, 3])
        assert [r.p_expected is not None for r in results] == [True, True]
    bad = client.get_args_parser().parse_args([*paths, "--url", url, "--expected", "1"])
    assert client.main(bad) == 2 and "one per image" in capsys.readouterr().err


def test_judge_refuses_an_expected_quantity_the_model_cannot_judge():
    cfg = ModelConfig(max_count=3, k_or_more=False)
    assert online.judge([[0.1, 0.2, 0.3, 0.4]], [3], cfg, 0.5) == [{"p_expected": 0.4, "flagged": True}]
    with pytest.raises(ValueError, match="above the model's K=3"):
        online.judge([[0.1, 0.2, 0.3, 0.4]], [4], cfg, 0.5)
