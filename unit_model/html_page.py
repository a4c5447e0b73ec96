"""``results/index.html``: the study's report as one self-contained page (tables, heatmaps, charts, curves).

The page carries its images inline (base64 PNG), so it opens from anywhere, mailed or copied, with no
folder beside it. Its tables are summary.md's, turned into HTML here: headings (``###``), pipe tables and
paragraphs are all that summary.md uses.
"""

from __future__ import annotations

import base64
import html
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


def markdown_html(lines: list[str]) -> list[str]:
    """summary.md's subset of Markdown: ``###`` headings, pipe tables (header, rule, rows) and paragraphs."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append("</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # the |---| rule under the header
                table.append(cells)
            continue
        flush()
        if line.startswith("### "):
            out.append(f"<h3>{inline(line[4:])}</h3>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return out


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_index_html(results: Path, summary_md: list[str], title: str = "Transfer study") -> Path:
    """Write ``results/index.html`` from summary.md's lines and the PNGs already in ``results``."""
    body = [f"<h1>{html.escape(title)}</h1>", *markdown_html(summary_md)]
    gain = results / "gain_by_method.png"
    if gain.is_file():
        body += ["<h2>Gain over random initialisation</h2>", figure(gain, "mean test gain, 95% bootstrap CI")]
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
