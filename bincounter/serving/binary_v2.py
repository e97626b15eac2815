"""The V2 binary tensor extension for ``BYTES`` inputs: parsing, with every malformed case a ``ValueError``.

With the extension a client sends the JSON request header, then raw tensor bytes, and says
where the JSON ends in the ``Inference-Header-Content-Length`` header; a ``BYTES`` tensor is a
sequence of (4-byte little-endian length, bytes) elements. KServe 0.21's REST decoder turns
binary ``BYTES`` elements into UTF-8 text before the model sees them, which fails (500) for
JPEGs, so ``guard.DataPlaneGuard`` rewrites such a request into the plain JSON form first
(base64 text in ``data``) with ``to_json_request``. gRPC's ``raw_input_contents`` use the same
element framing (``split_bytes``).
"""

from __future__ import annotations

import base64
import json
import struct


def to_json_request(body: bytes, json_length: int) -> bytes:
    """Rewrite a binary-extension request as plain V2 JSON; ``ValueError`` says what is wrong."""
    if not 0 < json_length <= len(body):
        raise ValueError(f"Inference-Header-Content-Length {json_length} is outside the body of {len(body)} bytes")
    try:
        request = json.loads(body[:json_length])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the JSON header is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ValueError("the JSON header must be an object with an 'inputs' list")
    offset = json_length
    for i, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict):
            raise ValueError(f"inputs[{i}] must be an object")
        params = tensor.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"inputs[{i}].parameters must be an object, got {type(params).__name__}")
        if "binary_data_size" not in params:
            continue
        size = params.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"inputs[{i}].parameters.binary_data_size must be a non-negative integer, got {size!r}")
        raw = body[offset:offset + size]
        if len(raw) != size:
            raise ValueError(f"input {tensor.get('name')!r} claims {size} binary bytes, the body has {len(raw)}")
        offset += size
        if tensor.get("datatype") != "BYTES":
            raise ValueError(f"binary data is supported for BYTES inputs only, not {tensor.get('datatype')!r}")
        tensor["data"] = [base64.b64encode(x).decode("ascii") for x in split_bytes(raw, tensor.get("name"))]
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes after the last binary input")
    return json.dumps(request).encode()


def split_bytes(raw: bytes, name) -> list[bytes]:
    """The elements of a serialized ``BYTES`` tensor: each a 4-byte little-endian length, then the bytes."""
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
