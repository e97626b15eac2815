"""The audit report: ``audit.md`` (figures and thumbnails as files beside it) and ``audit.html``
(the same, self-contained: images embedded, as the KFP UI shows it).

Contents: how many bins were flagged, the most suspicious ones with their thumbnail
(expected vs predicted), the distribution of ``p_expected``, the reliability diagram of
the model's calibration on its validation split, and when the truth is known (injected
discrepancies) the detection figures and a precision/recall curve.
"""

from __future__ import annotations

import base64
import html
import io
import os

HIST_PNG, PR_PNG, RELIABILITY_PNG = "p_expected.png", "precision_recall.png", "reliability.png"
MD_FILE, HTML_FILE = "audit.md", "audit.html"
THUMBS_DIR = "thumbnails"


def _figure(draw) -> bytes:
    from bincounter.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=100)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_histogram(counts: list[int], threshold: float) -> bytes:
    def draw(ax):
        width = 1.0 / len(counts)
        ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge", color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
        ax.set_xlabel("p_expected")
        ax.set_ylabel("bins")
        ax.set_yscale("symlog")
        ax.legend(fontsize=8)
        ax.set_title("distribution of p_expected")
    return _figure(draw)


def plot_pr(curve: list[dict], threshold: float) -> bytes:
    def draw(ax):
        pts = [c for c in curve if c["flagged"]]
        ax.plot([c["recall"] for c in pts], [c["precision"] for c in pts], color="tab:blue")
        at = min(curve, key=lambda c: abs(c["threshold"] - threshold))
        ax.plot([at["recall"]], [at["precision"]], "o", color="tab:red", label=f"threshold {threshold:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.legend(fontsize=8)
        ax.set_title("finding the discrepant bins")
    return _figure(draw)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write(local, summary: dict, suspicious: list[dict], thumbs: dict[str, str], *,
          calibration: dict | None = None, pr_curve: list[dict] | None = None) -> None:
    """Write the report's files into ``local`` (an object with ``path(name)``)."""
    from bincounter.calibration import plot_reliability

    threshold = summary["threshold"]
    figures: dict[str, bytes] = {HIST_PNG: plot_histogram(summary["p_expected_histogram"], threshold)}
    if pr_curve:
        figures[PR_PNG] = plot_pr(pr_curve, threshold)
    if calibration and calibration.get("reliability_before"):
        figures[RELIABILITY_PNG] = plot_reliability(
            calibration["reliability_before"], calibration["reliability_after"],
            f"{calibration.get('split', 'val')}: T = {calibration['temperature']:.3g}")
    os.makedirs(local.path(THUMBS_DIR), exist_ok=True)
    for name, data in figures.items():
        with open(local.path(name), "wb") as f:
            f.write(data)
    for row in suspicious:
        with open(local.path(f"{THUMBS_DIR}/{row['id']}.jpg"), "wb") as f:
            f.write(base64.b64decode(thumbs[row["id"]]))

    choice = summary.get("threshold_choice")
    lines = ["# Inventory audit", "",
             f"**{summary['flagged']} of {summary['bins']} bins flagged** ({100 * summary['flagged_share']:.1f}%): "
             f"the model's probability of their expected quantity is below {threshold:g}.", ""]
    if choice:
        lines += [f"Threshold chosen on {choice['split']} for precision >= {choice['target_precision']:g} "
                  f"(there: precision {choice['precision']:.3f}, recall {choice['recall']:.3f}, "
                  f"{choice['discrepant']} of {choice['bins']} bins with injected discrepancies).", ""]
    lines += ["| | |", "|---|---|", f"| bins scored | {summary['bins']} |", f"| flagged | {summary['flagged']} |",
              f"| skipped | {summary['skipped']} {summary['skipped_by_reason'] or ''} |", ""]
    if summary["flagged_by_expected_quantity"]:
        lines += ["Flagged by expected quantity: " + ", ".join(
            f"{k}: {v}" for k, v in summary["flagged_by_expected_quantity"].items()), ""]
    det = summary.get("detection")
    if det:
        lines += ["## Detection quality (injected discrepancies)", "",
                  f"{det['discrepant']} of {det['bins']} bins had their expected quantity altered by +-1..3.", "",
                  "| precision | recall | F1 | AUROC | precision top 1% | precision top 5% |",
                  "|---|---|---|---|---|---|",
                  "| " + " | ".join(_fmt(det[k]) for k in ("precision", "recall", "f1", "auroc", "precision_at_1pct",
                                                            "precision_at_5pct")) + " |", "",
                  f"![precision/recall]({PR_PNG})", ""]
    lines += ["## Most suspicious bins", "", "| bin | id | expected | predicted | p_expected |", "|---|---|---|---|---|"]
    for row in suspicious:
        lines.append(f"| ![{row['id']}]({THUMBS_DIR}/{row['id']}.jpg) | {row['id']} | {row['expected_quantity']} | "
                     f"{row['predicted_count']} | {row['p_expected']:.4f} |")
    lines += ["", "## Distribution of p_expected", "", f"![p_expected]({HIST_PNG})", ""]
    if RELIABILITY_PNG in figures:
        lines += ["## Calibration", "",
                  f"Temperature {calibration['temperature']:.4g}, fitted on the {calibration.get('split', 'val')} split "
                  f"({calibration.get('samples', '?')} bins): expected calibration error "
                  f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after.", "",
                  f"![reliability]({RELIABILITY_PNG})", ""]
    else:
        lines += ["## Calibration", "", "The model has no fitted temperature (trained before calibration existed).", ""]
    markdown = "\n".join(lines)
    with open(local.path(MD_FILE), "w") as f:
        f.write(markdown)
    with open(local.path(HTML_FILE), "w") as f:
        f.write(to_html(markdown, {**figures, **{f"{THUMBS_DIR}/{r['id']}.jpg": base64.b64decode(thumbs[r["id"]])
                                                  for r in suspicious}}))


def to_html(markdown: str, images: dict[str, bytes]) -> str:
    """The report's Markdown as one self-contained HTML page (tables, headings, images inlined).

    Only the few constructs ``write`` produces are converted; everything else is escaped text.
    """
    import re

    def inline(text: str) -> str:
        def img(m):
            alt, src = m.group(1), m.group(2)
            data = images.get(src)
            kind = "png" if src.endswith(".png") else "jpeg"
            uri = f"data:image/{kind};base64,{base64.b64encode(data).decode()}" if data is not None else src
            return f'<img alt="{html.escape(alt)}" src="{uri}">'
        out = html.escape(text)
        out = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", img, out)
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)

    body, table = [], []

    def end_table():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(-+\|)+", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            head, rest = cells[0], cells[1:]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        end_table()
        if line.startswith("## "):
            body.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{inline(line[2:])}</h1>")
        elif line:
            body.append(f"<p>{inline(line)}</p>")
    end_table()
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Inventory audit</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")
