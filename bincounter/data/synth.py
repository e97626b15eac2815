"""``bincounter synth``: synthetic warehouse bins written in the exact ABID layout.

Each image shows a yellow cardboard bin seen from the front, a location label with a
QR-like code, two bands of semi-transparent elastic straps across the opening, and
0..K items (boxes, bags, books) of varied size, colour and partial overlap, on one to
three shelves of depth. ``metadata/<id>.json`` lists the items under ``BIN_FCSKU_DATA``
(asin, name, normalizedName, quantity, dimensions, weight; some dimensions null, as in
the real data) and ``EXPECTED_QUANTITY`` = the number of items drawn. Counts are uniform
over 0..K. Every image depends only on ``(seed, index)``, so a run is deterministic and
can be generated in any order or in parallel. Nothing downstream knows the data is synthetic.

Usage::

    from bincounter.data.synth import synthesize
    summary = synthesize("s3://bucket/abid", images=300, max_count=5, seed=0)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw, ImageFont

from bincounter import storage
from bincounter.data import abid

IMAGE_SIZE = (400, 350)  # mean size; each image jitters it by up to 15%

_PALETTE = [  # product colours seen in bins: cardboard dominates, then packaging colours
    (176, 136, 92), (160, 120, 80), (196, 160, 112), (230, 230, 224), (245, 245, 240),
    (40, 40, 46), (70, 70, 80), (180, 40, 40), (200, 80, 50), (40, 70, 160), (60, 120, 190),
    (40, 130, 70), (120, 160, 60), (230, 200, 50), (120, 60, 140), (220, 120, 160), (140, 140, 150),
]
# item height as a fraction of the space above each row's floor, back row first
_ROW_HEIGHTS = {1: [(0.45, 0.85)], 2: [(0.6, 0.9), (0.3, 0.5)], 3: [(0.65, 0.9), (0.42, 0.6), (0.25, 0.38)]}
_ADJ = ["Deluxe", "Compact", "Portable", "Classic", "Wireless", "Organic", "Heavy Duty", "Mini", "Premium", "Kids"]
_NOUN = ["Phone Case", "Water Bottle", "Notebook", "Toy Figure", "Charger", "Socks", "Board Game",
         "Tea Sampler", "Screwdriver Set", "Puzzle", "Headphones", "Candle", "Dog Treats", "Lamp"]


def _colour(rng: random.Random, base=None, jitter=18):
    base = base or rng.choice(_PALETTE)
    return tuple(max(0, min(255, c + rng.randint(-jitter, jitter))) for c in base)


def _shade(c, f):
    return tuple(max(0, min(255, int(v * f))) for v in c)


def _draw_item(draw: ImageDraw.ImageDraw, over: ImageDraw.ImageDraw, rng: random.Random, box, kind, col):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == "bag":  # translucent poly bag: soft blob plus highlights
        over.rounded_rectangle(box, radius=int(min(w, h) * 0.3), fill=col + (215,),
                               outline=_shade(col, 0.6) + (255,), width=2)
        for _ in range(2):
            hx = x0 + rng.uniform(0.15, 0.7) * w
            over.line([(hx, y0 + 0.2 * h), (hx + 0.15 * w, y0 + 0.7 * h)], fill=(255, 255, 255, 150), width=2)
        return
    # box or book: front face, lighter top face (depth), dark outline, a label or tape
    depth = int(min(w, h) * rng.uniform(0.08, 0.18))
    draw.polygon([(x0, y0), (x0 + depth, y0 - depth), (x1 + depth, y0 - depth), (x1, y0)],
                 fill=_shade(col, 1.2), outline=_shade(col, 0.5))
    draw.polygon([(x1, y0), (x1 + depth, y0 - depth), (x1 + depth, y1 - depth), (x1, y1)],
                 fill=_shade(col, 0.75), outline=_shade(col, 0.5))
    draw.rectangle(box, fill=col, outline=_shade(col, 0.45), width=2)
    if kind == "book":
        band = y0 + int(h * rng.uniform(0.2, 0.6))
        draw.rectangle([x0 + 2, band, x1 - 2, band + max(3, h // 8)], fill=_colour(rng))
    elif rng.random() < 0.7:
        lx, ly = x0 + w * rng.uniform(0.1, 0.4), y0 + h * rng.uniform(0.15, 0.5)
        draw.rectangle([lx, ly, lx + w * 0.4, ly + h * 0.25], fill=(240, 240, 235), outline=(90, 90, 90))
        for k in range(3):
            yy = ly + 3 + k * max(3, h * 0.06)
            if yy < ly + h * 0.25 - 2:
                draw.line([(lx + 3, yy), (lx + w * 0.35, yy)], fill=(60, 60, 60), width=1)


def render_bin(rng: random.Random, count: int) -> tuple[Image.Image, list[dict]]:
    """Draw one bin with ``count`` items; return the image and the drawn items' specs."""
    W = int(IMAGE_SIZE[0] * rng.uniform(0.85, 1.15))
    H = int(IMAGE_SIZE[1] * rng.uniform(0.85, 1.15))
    bin_col = _colour(rng, (214, 196, 134), 14)
    img = Image.new("RGB", (W, H), bin_col)
    draw = ImageDraw.Draw(img)

    # the opening (outer) and the back wall (inner): walls in perspective between them
    ox0, oy0, ox1, oy1 = int(W * rng.uniform(0.0, 0.05)), int(H * rng.uniform(0.07, 0.12)), \
        int(W * rng.uniform(0.95, 1.0)), int(H * rng.uniform(0.86, 0.92))
    bx0, by0 = ox0 + int(W * rng.uniform(0.04, 0.10)), oy0 + int(H * rng.uniform(0.03, 0.08))
    bx1, by1 = ox1 - int(W * rng.uniform(0.04, 0.10)), oy1 - int(H * rng.uniform(0.08, 0.14))
    draw.rectangle([ox0, oy0, ox1, oy1], fill=_shade(bin_col, 0.92))
    draw.polygon([(ox0, oy0), (bx0, by0), (bx0, by1), (ox0, oy1)], fill=_shade(bin_col, 1.04))
    draw.polygon([(ox1, oy0), (bx1, by0), (bx1, by1), (ox1, oy1)], fill=_shade(bin_col, 0.84))
    draw.polygon([(ox0, oy1), (bx0, by1), (bx1, by1), (ox1, oy1)], fill=_shade(bin_col, 0.97))
    draw.rectangle([bx0, by0, bx1, by1], fill=_shade(bin_col, 0.80))

    # items on 1-3 rows of depth; back rows are drawn first and smaller, front rows overlap them
    rows = 1 if count <= 3 else 2 if count <= 8 else 3
    per_row = [count // rows + (1 if r < count % rows else 0) for r in range(rows)]
    items: list[dict] = []
    prev = None
    for r, n in enumerate(per_row):
        if n == 0:
            continue
        t = rng.uniform(0.5, 1.0) if rows == 1 else 0.2 + 0.8 * r / (rows - 1)  # 0 = back wall, 1 = front
        left, right = bx0 + (ox0 - bx0) * t, bx1 + (ox1 - bx1) * t
        floor = by1 + (oy1 - by1) * t
        # front rows are lower so that the back rows' upper halves stay visible (countable)
        lo, hi = _ROW_HEIGHTS[rows][r]
        avail = floor - by0
        cell = (right - left) / n
        over_layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # translucent bags, composited per row
        over = ImageDraw.Draw(over_layer)
        for k in range(n):
            if prev is not None and rng.random() < 0.25:  # same SKU again: quantity 2 on one asin
                kind, col, asin = prev["kind"], prev["colour"], prev["asin"]
            else:
                kind = rng.choices(["box", "bag", "book"], [0.6, 0.25, 0.15])[0]
                col = _colour(rng)
                asin = "B0" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
            w = cell * (rng.uniform(0.25, 0.45) if kind == "book" else rng.uniform(0.6, 0.95))
            h = avail * rng.uniform(lo, hi)
            cx = left + cell * (k + 0.5 + rng.uniform(-0.15, 0.15))
            bottom = floor - rng.uniform(0, 0.06) * (oy1 - oy0)
            box = [int(cx - w / 2), int(bottom - h), int(cx + w / 2), int(bottom)]
            _draw_item(draw, over, rng, box, kind, col)
            prev = {"kind": kind, "colour": col, "asin": asin, "box": box}
            items.append(prev)
        img.paste(over_layer, (0, 0), over_layer)

    # elastic straps: two bands of thin light lines across the opening, see-through between lines
    straps = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    sd = ImageDraw.Draw(straps)
    for centre in (rng.uniform(0.25, 0.4), rng.uniform(0.62, 0.78)):
        y = H * centre
        slope = rng.uniform(-0.03, 0.03) * H
        for j in range(rng.randint(7, 12)):
            yy = y + j * rng.uniform(2.5, 4.0)
            sd.line([(0, yy), (W, yy + slope)], fill=(246, 244, 236, rng.randint(110, 190)), width=1)
    img.paste(straps, (0, 0), straps)

    # location label with a QR-like code on the top frame
    lw, lh = int(W * rng.uniform(0.2, 0.28)), max(14, int(oy0 * 0.9))
    lx = int(W * rng.uniform(0.3, 0.5))
    label_col = _colour(rng, rng.choice([(245, 245, 240), (240, 170, 130), (240, 190, 200)]), 8)
    draw.rectangle([lx, 1, lx + lw, 1 + lh], fill=label_col)
    draw.text((lx + 4, 1 + max(0, lh - 11) // 2), f"{rng.randint(1, 4)}{rng.choice('ABCDEF')}",
              fill=(20, 20, 20), font=ImageFont.load_default())
    q = max(2, lh // 7)
    qx = lx + lw - 7 * q - 3
    for a in range(6):
        for b in range(6):
            if rng.random() < 0.5:
                draw.rectangle([qx + a * q, 2 + b * q, qx + a * q + q - 1, 2 + b * q + q - 1], fill=(10, 10, 10))

    # lighting varies from bin to bin
    f = rng.uniform(0.8, 1.1)
    if abs(f - 1) > 0.02:
        img = img.point(lambda v: min(255, int(v * f)))
    return img, items


def _metadata(rng: random.Random, items: list[dict], id: str) -> dict:
    skus: dict[str, dict] = {}
    for it in items:
        if it["asin"] in skus:
            skus[it["asin"]]["quantity"] += 1
            continue
        name = f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}"

        def dim(lo, hi, unit):  # ABID has null dimensions/weights now and then
            return None if rng.random() < 0.1 else {"unit": unit, "value": round(rng.uniform(lo, hi), 6)}

        skus[it["asin"]] = {"asin": it["asin"], "height": dim(0.5, 12, "IN"), "length": dim(1, 16, "IN"),
                            "name": name, "normalizedName": name, "quantity": 1,
                            "weight": dim(0.05, 6, "pounds"), "width": dim(0.5, 12, "IN")}
    return {"BIN_FCSKU_DATA": skus, "EXPECTED_QUANTITY": sum(s["quantity"] for s in skus.values())}


def make_record(seed: int, index: int, max_count: int) -> tuple[str, bytes, bytes, int]:
    """Image ``index`` of a run: ``(id, jpeg, metadata_json, count)``; depends only on its arguments."""
    rng = random.Random(f"bincounter-synth:{seed}:{index}")  # str seeds hash stably across runs
    count = rng.randint(0, max_count)
    img, items = render_bin(rng, count)
    id_ = f"{index + 1:05d}"  # the zero-padded ABID id series
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(80, 92))
    meta = json.dumps(_metadata(rng, items, id_), indent=4).encode()
    return id_, buf.getvalue(), meta, count


def synthesize(dest: str, *, images: int, max_count: int, seed: int = 0, workers: int = 4,
               endpoint_url: str | None = None) -> dict:
    """Write ``images`` synthetic bins with 0..``max_count`` items to ``dest`` (folder or ``s3://``).

    Returns a summary: ``{"dest", "images", "max_count", "seed", "class_counts", "bytes", "seconds"}``.
    """
    if images < 0 or max_count < 0:
        raise ValueError(f"--images and --max-count must be >= 0, got {images} and {max_count}")
    t0 = time.perf_counter()

    def one(index: int) -> tuple[int, int]:
        id_, jpeg, meta, count = make_record(seed, index, max_count)
        storage.write_bytes(abid.image_uri(dest, id_), jpeg, endpoint_url=endpoint_url)
        storage.write_bytes(abid.metadata_uri(dest, id_), meta, endpoint_url=endpoint_url)
        return count, len(jpeg) + len(meta)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, range(images)))
    return {"dest": str(dest), "images": images, "max_count": max_count, "seed": seed,
            "class_counts": abid.count_classes(c for c, _ in results),
            "bytes": sum(b for _, b in results), "seconds": round(time.perf_counter() - t0, 3)}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""), add_help=add_help)
    p.add_argument("--output", default=None, help="output folder or s3://bucket/prefix (required)")
    p.add_argument("dest", nargs="?", default=None, help=argparse.SUPPRESS)  # the old positional spelling
    p.add_argument("--images", type=int, default=300, help="number of bins to generate (default: %(default)s)")
    p.add_argument("--max-count", type=int, default=5,
                   help="items per bin are uniform over 0..K (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="parallel writers (default: %(default)s)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (default: AWS config / AWS_ENDPOINT_URL)")
    return p


def output_arg(args: argparse.Namespace) -> str:
    """``--output``, or the deprecated positional DEST (one release, with a warning)."""
    from bincounter import errors

    if args.dest is not None and args.output is not None:
        raise errors.UsageError(f"give the output once: --output {args.output} (the positional DEST "
                                f"{args.dest} is the deprecated spelling)")
    if args.dest is not None:
        print("warning: the positional DEST is deprecated and goes in the next release; use --output DEST",
              file=sys.stderr)
        return args.dest
    if args.output is None:
        raise errors.UsageError("the following arguments are required: --output")
    return args.output


def main(args: argparse.Namespace) -> int:
    summary = synthesize(output_arg(args), images=args.images, max_count=args.max_count, seed=args.seed,
                         workers=args.workers, endpoint_url=args.endpoint_url)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())
