"""The V2 binary tensor extension for ``BYTES`` inputs, as an ASGI middleware.

With the extension a client sends the JSON request header, then raw tensor bytes, and says
where the JSON ends in the ``Inference-Header-Content-Length`` header; a ``BYTES`` tensor is a
sequence of (4-byte little-endian length, bytes) elements. KServe 0.21's REST decoder turns
binary ``BYTES`` elements into UTF-8 text before the model sees them, which fails (500) for
JPEGs. This middleware rewrites such a request into the plain JSON form first, base64 text in
``data``, which the model server reads. Other requests pass through untouched.
"""

from __future__ import annotations

import base64
import json
import re
import struct

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
HEADER = b"inference-header-content-length"


class BinaryBytesInputs:
    """ASGI middleware: binary ``BYTES`` inputs of V2 infer requests -> base64 JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST" or not INFER_PATH.match(scope["path"])
                or not any(k == HEADER for k, _ in scope["headers"])):
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        json_length = next(v for k, v in scope["headers"] if k == HEADER)
        try:
            new_body = to_json_request(body, int(json_length))
        except ValueError as e:
            return await _send_json(send, 400, {"error": f"invalid binary V2 request: {e}"})
        headers = [(k, v) for k, v in scope["headers"] if k not in (HEADER, b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(new_body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the app asks again only to wait for a disconnect
                return await receive()
            sent = True
            return {"type": "http.request", "body": new_body, "more_body": False}

        return await self.app({**scope, "headers": headers}, replay, send)


def to_json_request(body: bytes, json_length: int) -> bytes:
    """Rewrite a binary-extension request as plain V2 JSON; ``ValueError`` says what is wrong."""
    if not 0 < json_length <= len(body):
        raise ValueError(f"Inference-Header-Content-Length {json_length} is outside the body of {len(body)} bytes")
    try:
        request = json.loads(body[:json_length])
        inputs = request["inputs"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the JSON header is not an inference request: {e}") from None
    offset = json_length
    for tensor in inputs:
        params = tensor.get("parameters") or {}
        if "binary_data_size" not in params:
            continue
        size = int(params.pop("binary_data_size"))
        raw = body[offset:offset + size]
        if len(raw) != size:
            raise ValueError(f"input {tensor.get('name')!r} claims {size} binary bytes, the body has {len(raw)}")
        offset += size
        if tensor.get("datatype") != "BYTES":
            raise ValueError(f"binary data is supported for BYTES inputs only, not {tensor.get('datatype')}")
        tensor["data"] = [base64.b64encode(x).decode("ascii") for x in _split_bytes(raw, tensor.get("name"))]
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes after the last binary input")
    return json.dumps(request).encode()


def _split_bytes(raw: bytes, name) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError(f"input {name!r}: a BYTES element length is cut off")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError(f"input {name!r}: a BYTES element claims {length} bytes, {len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
