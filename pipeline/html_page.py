"""``results/index.html``: the study's report as one self-contained page (tables, heatmaps, charts, curves).

The page carries its images inline (base64 PNG), so it opens from anywhere, mailed or copied, with no
folder beside it. Its headings, paragraphs and tables are the summary's blocks (pipeline/report.py), the ones
summary.md is written from: the page renders the data, it does not parse the markdown.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from utils.io import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
img { max-width: 100%; }
"""


def inline(text: str) -> str:
    """Markdown emphasis of summary.md's cells (``**bold**``), escaped for HTML."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def blocks_html(blocks: Sequence) -> list[str]:
    """The summary's blocks (``kind`` heading, paragraph or table) as HTML."""
    out: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h3>{inline(b.text)}</h3>")
        elif b.kind == "paragraph":
            out.append(f"<p>{inline(b.text)}</p>")
        else:
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in b.header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append("</table>")
    return out


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_index_html(results: Path, blocks: Sequence, title: str = "Transfer study") -> Path:
    """Write ``results/index.html`` from the summary's blocks and the PNGs already in ``results``."""
    body = [f"<h1>{html.escape(title)}</h1>", *blocks_html(blocks)]
    gain = results / "gain_by_method.png"
    if gain.is_file():
        body += ["<h2>Gain over random initialisation</h2>", figure(gain, "mean test gain, 95% bootstrap CI")]
    estimators = results / "estimators.png"
    if estimators.is_file():
        body += ["<h2>Transferability estimators</h2>",
                 figure(estimators, "Spearman with single-source transfer, mean over cells, 95% bootstrap CI")]
    curves = sorted(results.glob("learning_curves_*.png"))
    if curves:
        body.append("<h2>Learning curves</h2>")
        body += [figure(p, p.stem.removeprefix("learning_curves_").replace("_", " ")) for p in curves]
    heatmaps = sorted((results / "heatmaps").glob("*.png"))
    if heatmaps:
        body.append("<h2>Fusion weights (targets in rows, sources in columns)</h2>")
        body += [figure(p, p.stem.replace("_", " ")) for p in heatmaps]
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>", *body, "</body></html>", ""]
    path = results / "index.html"
    write_text_atomic(path, "\n".join(page))
    return path
