"""The Amazon Bin Image Dataset (ABID) format: metadata parsing, record validation, split files.

A dataset root (local folder or ``s3://`` prefix) holds ``bin-images/<id>.jpg`` and
``metadata/<id>.json`` with the same id. Ids are strings: ``01044`` (zero-padded series,
metadata has ``normalizedName``) and ``1044`` (unpadded extra series, metadata has
``image_fname``) are different bins. A malformed record never crashes a run and is never
labelled silently: it becomes a :class:`Skipped` with its id and a reason code.

Usage::

    from bincounter.data import abid
    result = abid.scan("data/abid")     # -> ScanResult(records=[BinRecord...], skipped=[Skipped...])
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bincounter import storage

IMAGES_DIR = "bin-images"
METADATA_DIR = "metadata"

# Reason codes of skipped records (the summary counts them by code).
BAD_JSON = "bad_json"
MISSING_EXPECTED_QUANTITY = "missing_expected_quantity"
BAD_COUNT = "bad_count"
NEGATIVE_COUNT = "negative_count"
IMAGE_WITHOUT_METADATA = "image_without_metadata"
METADATA_WITHOUT_IMAGE = "metadata_without_image"
UNREADABLE_JPEG = "unreadable_jpeg"
MISSING_OBJECT = "missing_object"
FETCH_FAILED = "fetch_failed"

_ID_RE = re.compile(r"^[0-9]+$")


class RecordError(ValueError):
    """A record that cannot be used; ``code`` is one of the reason codes above."""

    def __init__(self, id: str, code: str, detail: str = ""):
        self.id, self.code, self.detail = id, code, detail
        super().__init__(f"{id}: {code}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Item:
    """One SKU in a bin. Dimensions are inches, weight pounds; any may be ``None`` (null in ABID)."""

    asin: str
    name: str | None
    quantity: int
    height: float | None = None
    length: float | None = None
    width: float | None = None
    weight: float | None = None


@dataclass(frozen=True)
class BinRecord:
    id: str
    count: int  # EXPECTED_QUANTITY, the label
    items: tuple[Item, ...] = ()
    image_fname: str | None = None


@dataclass(frozen=True)
class Skipped:
    id: str
    reason: str  # a reason code
    detail: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


@dataclass
class ScanResult:
    records: list[BinRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        return count_classes(r.count for r in self.records)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))


def count_classes(counts) -> dict[str, int]:
    """``{"0": n0, "1": n1, ...}`` sorted numerically (JSON keys are strings)."""
    c = Counter(int(x) for x in counts)
    return {str(k): c[k] for k in sorted(c)}


def _measure(value) -> float | None:
    # {"unit": "IN", "value": x} or null; a bare number is accepted too.
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_metadata(data: bytes | str, id: str) -> BinRecord:
    """Parse one ``metadata/<id>.json``; raises :class:`RecordError` naming what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(id, BAD_JSON, str(e)) from None
    if not isinstance(doc, dict):
        raise RecordError(id, BAD_JSON, f"top level is {type(doc).__name__}, expected an object")
    if doc.get("EXPECTED_QUANTITY") is None:
        raise RecordError(id, MISSING_EXPECTED_QUANTITY,
                          "EXPECTED_QUANTITY is null" if "EXPECTED_QUANTITY" in doc else "no EXPECTED_QUANTITY key")
    count = doc["EXPECTED_QUANTITY"]
    if isinstance(count, bool) or not isinstance(count, int):
        raise RecordError(id, BAD_COUNT, f"EXPECTED_QUANTITY={count!r} is not an integer")
    if count < 0:
        raise RecordError(id, NEGATIVE_COUNT, f"EXPECTED_QUANTITY={count}")
    raw_items = doc.get("BIN_FCSKU_DATA") or {}
    if not isinstance(raw_items, dict):
        raise RecordError(id, BAD_JSON, "BIN_FCSKU_DATA is not an object")
    items = []
    for key, it in raw_items.items():
        if not isinstance(it, dict):
            raise RecordError(id, BAD_JSON, f"item {key!r} is not an object")
        q = it.get("quantity")
        items.append(Item(
            asin=str(it.get("asin") or key),  # the item's asin is the truth, the key a fallback
            name=it.get("name") or it.get("normalizedName"),
            quantity=int(q) if isinstance(q, int) and not isinstance(q, bool) else 0,
            height=_measure(it.get("height")), length=_measure(it.get("length")),
            width=_measure(it.get("width")), weight=_measure(it.get("weight")),
        ))
    return BinRecord(id=id, count=count, items=tuple(items), image_fname=doc.get("image_fname"))


def check_jpeg(data: bytes, id: str) -> tuple[int, int]:
    """Return ``(width, height)`` if ``data`` decodes as a JPEG; else raise :class:`RecordError`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise ValueError(f"format is {im.format}, not JPEG")
            im.load()  # a full decode: truncated files fail here, not at training time
            return im.size
    except Exception as e:  # PIL raises many types for broken files
        raise RecordError(id, UNREADABLE_JPEG, f"{type(e).__name__}: {e}") from None


def _ids_in(names, suffix: str) -> set[str]:
    return {n[: -len(suffix)] for n in names if n.endswith(suffix) and "/" not in n}


def scan(root: str, *, verify_images: bool = False, workers: int = 8,
         endpoint_url: str | None = None, unsigned: bool = False) -> ScanResult:
    """Pair and parse every record under ``root`` (a folder or ``s3://`` prefix in ABID layout).

    Images without metadata and metadata without images are skipped and reported. With
    ``verify_images`` every JPEG is decoded too (``split`` decodes them anyway, so it leaves this off).
    """
    kw = dict(endpoint_url=endpoint_url, unsigned=unsigned)
    image_ids = _ids_in((n for n, _ in storage.list_files(storage.join(root, IMAGES_DIR), **kw)), ".jpg")
    meta_ids = _ids_in((n for n, _ in storage.list_files(storage.join(root, METADATA_DIR), **kw)), ".json")
    result = ScanResult()
    for i in sorted(image_ids - meta_ids):
        result.skipped.append(Skipped(i, IMAGE_WITHOUT_METADATA,
                                      f"{IMAGES_DIR}/{i}.jpg has no {METADATA_DIR}/{i}.json"))
    for i in sorted(meta_ids - image_ids):
        result.skipped.append(Skipped(i, METADATA_WITHOUT_IMAGE,
                                      f"{METADATA_DIR}/{i}.json has no {IMAGES_DIR}/{i}.jpg"))

    def load(id_: str) -> BinRecord | Skipped:
        try:
            rec = parse_metadata(storage.read_bytes(metadata_uri(root, id_), **kw), id_)
            if verify_images:
                check_jpeg(storage.read_bytes(image_uri(root, id_), **kw), id_)
            return rec
        except RecordError as e:
            return Skipped(e.id, e.code, e.detail)

    ids = sorted(image_ids & meta_ids)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for out in pool.map(load, ids):
            (result.skipped if isinstance(out, Skipped) else result.records).append(out)
    result.skipped.sort(key=lambda s: s.id)
    return result


def image_uri(root: str, id: str) -> str:
    return storage.join(root, IMAGES_DIR, f"{id}.jpg")


def metadata_uri(root: str, id: str) -> str:
    return storage.join(root, METADATA_DIR, f"{id}.json")


# --- selection files -----------------------------------------------------------------------------

def id_from_index(index: int) -> str:
    """Standard split files use 0-based indices: index 0 is bin ``00001``."""
    return f"{int(index) + 1:05d}"


def id_from_number(number: int | str) -> str:
    """1-based ids as in ``random_val.txt``: ``4`` -> ``00004`` (the zero-padded series)."""
    return f"{int(number):05d}"


def read_id_file(path: str, *, endpoint_url: str | None = None) -> dict[str, int | None]:
    """Read a selection file into ``{id: count-or-None}``, in file order.

    Formats (told apart by content):
      * ``file_list.json``: ``{"1": ["data/metadata/00710.json", ...], ...}`` -> ids from the paths
        (kept verbatim: ``100313`` stays ``100313``), counts from the class keys;
      * ``counting_train.json`` / ``counting_val*.json``: ``[[index, count], ...]`` with 0-based index;
      * ``random_val.txt``: one 1-based id per line.
    """
    text = storage.read_bytes(path, endpoint_url=endpoint_url).decode()
    name = Path(storage.split_s3(path)[1] if storage.is_s3(path) else path).name
    stripped = text.lstrip()
    out: dict[str, int | None] = {}
    if stripped.startswith("{"):
        for cls, paths in json.loads(text).items():
            for p in paths:
                stem = p.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                if not _ID_RE.match(stem):
                    raise ValueError(f"{name}: entry {p!r} does not name an ABID metadata file")
                out[stem] = int(cls)
    elif stripped.startswith("["):
        for entry in json.loads(text):
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"{name}: expected [index, count] pairs, got {entry!r}")
            out[id_from_index(entry[0])] = int(entry[1])
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if not _ID_RE.match(line):
                raise ValueError(f"{name}:{n}: {line!r} is not a numeric id")
            out[id_from_number(line)] = None
    return out
