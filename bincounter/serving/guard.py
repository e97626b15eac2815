"""The ASGI middleware in front of KServe's REST app: what KServe 0.21 does not do, in one place.

``DataPlaneGuard`` sees every HTTP request before KServe's FastAPI app does, and:

- refuses a body larger than ``max_body_bytes`` with 413, from ``Content-Length`` before reading
  it, or as soon as a chunked body passes the limit;
- answers 404 for the model repository extension (``/v2/repository/...``): over the data plane,
  ``unload`` would take the model down for good while liveness stayed 200;
- serves ``/v2/models/<name>/versions/<v>/...`` for the model's real version (KServe raises
  NotImplementedError, a 501) and answers 404 for any other version;
- reads a V2 infer body without the binary extension as JSON, whatever its ``Content-Type``
  (Triton's HTTP client sends none);
- rewrites the V2 binary tensor extension into plain JSON (``binary_v2.py``);
- drops ``null`` optional fields from V2 JSON answers (``versions``, ``parameters``: the spec
  makes them optional, and a null is neither a list nor an object) and lists the model's version
  in its metadata.

Every refusal is the protocol's error shape, ``{"error": "..."}``, logged as one line.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from kserve.logging import logger

from bincounter.serving.binary_v2 import to_json_request

V2_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")
REPOSITORY_PATH = re.compile(r"^/v2/repository(/|$)")
BINARY_HEADER = b"inference-header-content-length"
# The V2 answers whose JSON the guard tidies (metadata and infer); small, so re-encoding is cheap.
_TIDY_KEYS = ("versions", "parameters")


class DataPlaneGuard:
    """ASGI middleware; ``model_version(name)`` gives the served version of a model, or None if unknown."""

    def __init__(self, app, *, model_version: Callable[[str], str | None], max_body_bytes: int):
        self.app = app
        self.model_version = model_version
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if REPOSITORY_PATH.match(path):
            return await _refuse(send, 404, f"{path}: the model repository extension is disabled on this server")
        headers = dict(scope["headers"])
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await _refuse(send, 413, f"the request body is {int(length)} bytes, more than the limit of "
                                                f"{self.max_body_bytes} bytes (--max-request-bytes)")
        match = V2_MODEL_PATH.match(path)
        if match is None:
            if scope["method"] == "POST":
                return await self._forward_body(scope, receive, send, None)
            return await self.app(scope, receive, send)
        name, version, rest = match["name"], match["version"], match["rest"] or ""
        served = self.model_version(name)
        if version is not None:
            if served is None:
                return await _refuse(send, 404, f"model {name!r} is not served here")
            if version != served:
                return await _refuse(send, 404, f"model {name!r} has no version {version!r}; it serves version "
                                                f"{served!r}")
            scope = {**scope, "path": f"/v2/models/{name}{rest}", "raw_path": f"/v2/models/{name}{rest}".encode()}
        send = _tidy_json(send, served if rest == "" else None)
        if scope["method"] == "POST" and rest == "/infer":
            return await self._forward_body(scope, receive, send, headers)
        return await self.app(scope, receive, send)

    async def _forward_body(self, scope, receive, send, infer_headers: dict | None):
        """Read the whole body (within the limit), rewrite a V2 infer body if needed, replay it to the app."""
        body = await self._read_body(receive)
        if body is None:
            return await _refuse(send, 413, f"the request body is more than the limit of {self.max_body_bytes} "
                                            f"bytes (--max-request-bytes)")
        headers = scope["headers"]
        if infer_headers is not None:
            if BINARY_HEADER in infer_headers:
                json_length = infer_headers[BINARY_HEADER]
                try:
                    if not json_length.isdigit():
                        raise ValueError(f"Inference-Header-Content-Length {json_length.decode(errors='replace')!r} "
                                         f"is not a byte count")
                    body = to_json_request(body, int(json_length))
                except ValueError as e:
                    return await _refuse(send, 400, f"invalid binary V2 request: {e}")
                headers = [(k, v) for k, v in headers if k not in (BINARY_HEADER, b"content-length", b"content-type")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            elif infer_headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/json":
                # Without the binary extension's header the body can only be JSON; Triton's HTTP
                # client sends it without a Content-Type, curl -d as a form.
                headers = [(k, v) for k, v in headers if k != b"content-type"]
                headers.append((b"content-type", b"application/json"))
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the app asks again only to wait for a disconnect
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app({**scope, "headers": headers}, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The body, or None as soon as it passes the limit (a chunked body has no Content-Length)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _tidy_json(send, version: str | None):
    """Wrap ``send``: drop null ``versions``/``parameters`` from a JSON answer; list ``version`` in metadata."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def tidy_send(message):
        nonlocal start
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] != 200 or not content_type.startswith(b"application/json"):
                return await send(message)
            start = message
            return None
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = b"".join(chunks)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            _drop_nulls(answer)
            if version is not None and "inputs" in answer:  # model metadata
                answer["versions"] = [version]
            body = json.dumps(answer).encode()
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return tidy_send


def _drop_nulls(value) -> None:
    if isinstance(value, dict):
        for key in _TIDY_KEYS:
            if key in value and value[key] is None:
                del value[key]
        for item in value.values():
            _drop_nulls(item)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                _drop_nulls(item)


async def _refuse(send, status: int, reason: str) -> None:
    logger.warning("%d %s", status, reason)
    body = json.dumps({"error": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
