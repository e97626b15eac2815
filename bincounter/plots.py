"""The pictures a run leaves: training curves, samples per count, confusion matrix, mistakes.

Each function returns PNG bytes (the caller decides where they go: a split folder,
the evaluation folder, a KFP artifact). matplotlib is imported lazily and with the
Agg backend: there is no display in pods or on servers.
"""

from __future__ import annotations

import io
from typing import Sequence

SAMPLES_PER_COUNT = 4  # images per row of samples.png
MISTAKES_SHOWN = 24


def items(n: int) -> str:
    """``1 item``, ``3 items``: the captions say what a person would."""
    return f"{n} item" if n == 1 else f"{n} items"


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display in pods), or one clear error where the
    ``train`` extra is not installed (the model server image has no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from bincounter.errors import UserError

        raise UserError("drawing the plots needs matplotlib, which is not installed: "
                        "pip install 'bincounter[train]'") from None
    return plt


DPI = 90


def _png(fig, tight: bool = True) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    # zlib level 3: a grid of photos encodes 3x faster than at PIL's default 6, for 10% more bytes
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})
    plt.close(fig)
    return buf.getvalue()


def _image_grid(rows: int, cols: int, cell: tuple[float, float]):
    """A figure of ``rows`` x ``cols`` image cells (inches), axes off, laid out by fixed margins:
    tight_layout measures every caption of every cell, which took seconds for a 6-row grid."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    caption = 0.4  # inches above each image: two lines of 8-9 pt text
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.05 / (cell[1] * rows), top=1 - caption / (cell[1] * rows),
                        wspace=0.05, hspace=caption / (cell[1] - caption))
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _thumbnail(jpeg: bytes, cell: tuple[float, float]):
    """The decoded image, no larger than its cell at DPI: drawing a full photo into a 2-inch cell
    only costs resampling time."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg))
    img.draft("RGB", (int(cell[0] * DPI), int(cell[1] * DPI)))  # JPEG: decode at a reduced scale
    img = img.convert("RGB")
    img.thumbnail((int(cell[0] * DPI), int(cell[1] * DPI)))
    return img


def training_curves(history: Sequence[dict]) -> bytes:
    """Loss (train and val) and val accuracy per epoch, from training's ``metrics.json`` ``epochs``.

    Training records the train loss per epoch but no train accuracy (it would cost a second
    pass over the training data); the accuracy panel shows val accuracy and val within-1.
    """
    plt = pyplot()
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("train-loss", "train"), ("val-loss", "val")):
        if any(key in row for row in history):
            loss_ax.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for key, label in (("train-accuracy", "train accuracy"), ("val-accuracy", "val accuracy"),
                       ("val-within1", "val within-1")):
        if any(key in row for row in history):
            acc_ax.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="fraction of images", title="Accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _png(fig)


def class_distribution(class_counts: dict[str, dict[str, int]]) -> bytes:
    """Images per count, one bar per split side by side (``{split: {count: images}}``)."""
    plt = pyplot()
    classes = sorted({int(c) for cc in class_counts.values() for c in cc})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) + 3), 4))
    width = 0.8 / max(1, len(class_counts))
    for k, (name, cc) in enumerate(class_counts.items()):
        offset = (k - (len(class_counts) - 1) / 2) * width
        ax.bar([c + offset for c in classes], [cc.get(str(c), 0) for c in classes], width, label=name)
    ax.set(xlabel="items in bin (EXPECTED_QUANTITY)", ylabel="images", title="Class distribution")
    ax.set_xticks(classes)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
    return _png(fig)


def samples_by_count(samples: Sequence[tuple[str, int, bytes]], per_count: int = SAMPLES_PER_COUNT) -> bytes:
    """One row per count (every class shown), ``per_count`` images each, captioned ``<id>: 1 item``."""
    by_count: dict[int, list] = {}
    for id_, count, jpeg in samples:
        row = by_count.setdefault(int(count), [])
        if len(row) < per_count:
            row.append((id_, jpeg))
    counts = sorted(by_count) or [0]
    cell = (2.6, 2.4)
    fig, axes = _image_grid(len(counts), per_count, cell)
    for r, count in enumerate(counts):
        for c, (id_, jpeg) in enumerate(by_count.get(count, [])):
            axes[r][c].imshow(_thumbnail(jpeg, cell))
            axes[r][c].set_title(f"{id_}: {items(count)}", fontsize=9)
    return _png(fig, tight=False)


def confusion(cm, class_names: Sequence[str], title: str = "") -> bytes:
    """Counts and the row-normalised view (recall per true count) side by side, each with a colour bar."""
    import numpy as np

    plt = pyplot()
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    recall = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.4 * n, 1.2 + 0.7 * n))
    for ax, values, name, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], recall, "recall (row-normalised)",
                                                                         "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if values is recall else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), class_names)
        ax.set_yticks(range(n), class_names)
        ax.set(xlabel="predicted count", ylabel="true count", title=name)
        threshold = (values.max() / 2) if values.size else 0
        for (t, p), v in np.ndenumerate(values):
            ax.text(p, t, fmt.format(v), ha="center", va="center", fontsize=8,
                    color="white" if v > threshold else "black")
    if title:
        fig.suptitle(title)
    return _png(fig)


def mistakes(wrong: Sequence[tuple[str, int, int, bytes]], limit: int = MISTAKES_SHOWN) -> bytes:
    """A grid of misclassified images ``(id, true, predicted, jpeg)``, captioned with both counts."""
    shown = list(wrong)[:limit]
    cols = 6
    rows = max(1, (len(shown) + cols - 1) // cols)
    cell = (2.4, 2.5)
    fig, axes = _image_grid(rows, cols, cell)
    if not shown:
        axes[0][0].text(0, 0.5, "no misclassified images", fontsize=12)
    for ax, (id_, true, pred, jpeg) in zip(axes.flat, shown):
        ax.imshow(_thumbnail(jpeg, cell))
        ax.set_title(f"{id_}\ntrue {true}, predicted {pred}", fontsize=8)
    return _png(fig, tight=False)
