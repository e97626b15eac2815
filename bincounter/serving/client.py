"""``bincounter predict``: send bin photos to a served model and print the count for each.

Works against a local ``bincounter serve`` and against an InferenceService inside
Kubeflow, where the request goes through the Istio ingress and needs a bearer token
(``--token``) and the service's host name (``--host-header``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys

import httpx

PROTOCOLS = ("v1", "v2")


class PredictError(RuntimeError):
    """The server refused or failed the request; the message holds its status and answer."""


@dataclasses.dataclass
class ImageResult:
    image: str  # the name the caller gave the image (its path for the CLI)
    count: int
    label: str
    confidence: float
    probabilities: list[float]
    model_version: str | None


def endpoint(url: str, model_name: str, protocol: str) -> str:
    base = url.rstrip("/")
    if protocol == "v1":
        return f"{base}/v1/models/{model_name}:predict"
    if protocol == "v2":
        return f"{base}/v2/models/{model_name}/infer"
    raise ValueError(f"Invalid protocol {protocol!r}. Only {', '.join(PROTOCOLS)} are supported.")


def request_body(images: list[bytes], protocol: str) -> dict:
    encoded = [base64.b64encode(data).decode("ascii") for data in images]
    if protocol == "v1":
        return {"instances": [{"image": {"b64": b64}} for b64 in encoded]}
    return {"inputs": [{"name": "image", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}]}


def parse_response(answer: dict, names: list[str], protocol: str) -> list[ImageResult]:
    version = answer.get("model_version")
    if protocol == "v1":
        preds = answer["predictions"]
        _check_length(len(preds), len(names))
        return [ImageResult(image=name, count=p["count"], label=p["label"], confidence=p["confidence"],
                            probabilities=p["probabilities"], model_version=version)
                for name, p in zip(names, preds)]
    out = {o["name"]: o for o in answer["outputs"]}
    n, num_classes = out["probabilities"]["shape"]
    _check_length(n, len(names))
    probs = out["probabilities"]["data"]
    return [ImageResult(image=name, count=out["count"]["data"][i], label=out["label"]["data"][i],
                        confidence=out["confidence"]["data"][i],
                        probabilities=probs[i * num_classes:(i + 1) * num_classes], model_version=version)
            for i, name in enumerate(names)]


def _check_length(got: int, sent: int) -> None:
    if got != sent:
        raise PredictError(f"the server answered {got} predictions for {sent} images")


def predict(images: list[bytes], *, url: str, names: list[str] | None = None, model_name: str = "bincounter",
            protocol: str = "v1", token: str | None = None, host_header: str | None = None,
            timeout: float = 60.0, client: httpx.Client | None = None) -> list[ImageResult]:
    """Send ``images`` (encoded JPEG bytes) in one request; one ``ImageResult`` per image, in order.

    Raises ``PredictError`` with the server's message when it answers anything but 200.
    """
    names = names or [f"image-{i}" for i in range(len(images))]
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if host_header:
        headers["Host"] = host_header
    body = json.dumps(request_body(images, protocol))
    http = client or httpx.Client(timeout=timeout)
    try:
        response = http.post(endpoint(url, model_name, protocol), content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise PredictError(f"cannot reach {endpoint(url, model_name, protocol)}: {type(e).__name__}: {e}") from e
    finally:
        if client is None:
            http.close()
    if response.status_code != 200:
        raise PredictError(f"{response.status_code} from {response.url}: {response.text[:500]}")
    return parse_response(response.json(), names, protocol)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG files to count")
    parser.add_argument("--url", default="http://127.0.0.1:8080", type=str,
                        help="base URL of the server (inside Kubeflow: the Istio ingress gateway)")
    parser.add_argument("--model-name", default="bincounter", type=str, help="model name in the endpoint path")
    parser.add_argument("--protocol", default="v1", choices=PROTOCOLS, help="KServe V1 or V2 (Open Inference)")
    parser.add_argument("--token", default=None, type=str,
                        help="bearer token for the Authorization header; if unset, $BINCOUNTER_TOKEN is used")
    parser.add_argument("--host-header", default=None, type=str,
                        help="Host header, e.g. the InferenceService's host bincounter.<namespace>.example.com")
    parser.add_argument("--timeout", default=60.0, type=float, help="seconds to wait for the answer")
    parser.add_argument("--batch-size", default=16, type=int, help="images per request")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    return parser


def main(args: argparse.Namespace) -> int:
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        try:
            images = [_read(path) for path in paths]
            results += predict(images, names=paths, url=args.url, model_name=args.model_name,
                               protocol=args.protocol, token=args.token or os.environ.get("BINCOUNTER_TOKEN"),
                               host_header=args.host_header, timeout=args.timeout)
        except (OSError, PredictError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for r in results:
        if args.json:
            print(json.dumps(dataclasses.asdict(r)))
        else:
            print(f"{r.image}\tcount={r.label}\tconfidence={r.confidence:.3f}\tmodel_version={r.model_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
