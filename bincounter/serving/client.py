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
    # With an expected quantity (the audit): P(expected quantity) and whether it is below the threshold.
    p_expected: float | None = None
    flagged: bool | None = None


def endpoint(url: str, model_name: str, protocol: str) -> str:
    base = url.rstrip("/")
    if protocol == "v1":
        return f"{base}/v1/models/{model_name}:predict"
    if protocol == "v2":
        return f"{base}/v2/models/{model_name}/infer"
    raise ValueError(f"Invalid protocol {protocol!r}. Only {', '.join(PROTOCOLS)} are supported.")


def request_body(images: list[bytes], protocol: str, expected: list[int] | None = None,
                 threshold: float | None = None) -> dict:
    encoded = [base64.b64encode(data).decode("ascii") for data in images]
    params = {"threshold": threshold} if threshold is not None else None
    if protocol == "v1":
        instances = [{"image": {"b64": b64}} for b64 in encoded]
        for inst, e in zip(instances, expected or []):
            inst["expected_quantity"] = e
        return {"instances": instances, **({"parameters": params} if params and expected else {})}
    inputs = [{"name": "image", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}]
    if expected:
        inputs.append({"name": "expected_quantity", "shape": [len(expected)], "datatype": "INT64", "data": expected})
    return {"inputs": inputs, **({"parameters": params} if params and expected else {})}


def parse_response(answer: dict, names: list[str], protocol: str) -> list[ImageResult]:
    version = answer.get("model_version")
    if protocol == "v1":
        preds = answer["predictions"]
        _check_length(len(preds), len(names))
        return [ImageResult(image=name, count=p["count"], label=p["label"], confidence=p["confidence"],
                            probabilities=p["probabilities"], model_version=version,
                            p_expected=p.get("p_expected"), flagged=p.get("flagged"))
                for name, p in zip(names, preds)]
    out = {o["name"]: o for o in answer["outputs"]}
    n, num_classes = out["probabilities"]["shape"]
    _check_length(n, len(names))
    probs = out["probabilities"]["data"]
    audit = {k: out[k]["data"] for k in ("p_expected", "flagged") if k in out}
    return [ImageResult(image=name, count=out["count"]["data"][i], label=out["label"]["data"][i],
                        confidence=out["confidence"]["data"][i],
                        probabilities=probs[i * num_classes:(i + 1) * num_classes], model_version=version,
                        p_expected=audit["p_expected"][i] if audit else None,
                        flagged=audit["flagged"][i] if audit else None)
            for i, name in enumerate(names)]


def _check_length(got: int, sent: int) -> None:
    if got != sent:
        raise PredictError(f"the server answered {got} predictions for {sent} images")


def predict(images: list[bytes], *, url: str, names: list[str] | None = None, model_name: str = "bincounter",
            protocol: str = "v1", token: str | None = None, host_header: str | None = None,
            timeout: float = 60.0, client: httpx.Client | None = None, expected: list[int] | None = None,
            threshold: float | None = None) -> list[ImageResult]:
    """Send ``images`` (encoded JPEG bytes) in one request; one ``ImageResult`` per image, in order.

    With ``expected`` (one expected quantity per image) the server also answers ``p_expected`` and
    ``flagged`` at ``threshold`` (default: the model's ``audit_threshold``).

    Raises ``PredictError`` with the server's message when it answers anything but 200.
    """
    names = names or [f"image-{i}" for i in range(len(images))]
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if host_header:
        headers["Host"] = host_header
    if expected is not None and len(expected) != len(images):
        raise ValueError(f"{len(expected)} expected quantities for {len(images)} images: give one per image")
    body = json.dumps(request_body(images, protocol, expected, threshold))
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
    parser.add_argument("--expected", type=int, nargs="+", default=None, metavar="N",
                        help="the expected quantity of each image (one per IMAGE, in order): also print p_expected "
                             "and whether the bin is flagged for a recount")
    parser.add_argument("--threshold", type=float, default=None,
                        help="with --expected: flag when p_expected < this (default: the model's audit_threshold)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.expected is not None and len(args.expected) != len(args.images):
        print(f"error: --expected has {len(args.expected)} values for {len(args.images)} images; give one per image",
              file=sys.stderr)
        return 2
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        expected = args.expected[start:start + args.batch_size] if args.expected is not None else None
        try:
            images = [_read(path) for path in paths]
            results += predict(images, names=paths, url=args.url, model_name=args.model_name,
                               protocol=args.protocol, token=args.token or os.environ.get("BINCOUNTER_TOKEN"),
                               host_header=args.host_header, timeout=args.timeout, expected=expected,
                               threshold=args.threshold)
        except (OSError, PredictError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for r in results:
        if args.json:
            print(json.dumps(dataclasses.asdict(r)))
        else:
            audit = (f"\tp_expected={r.p_expected:.3f}\t{'FLAGGED' if r.flagged else 'ok'}"
                     if r.p_expected is not None else "")
            print(f"{r.image}\tcount={r.label}\tconfidence={r.confidence:.3f}\tmodel_version={r.model_version}{audit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
