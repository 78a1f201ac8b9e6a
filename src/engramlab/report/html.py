"""Self-contained HTML reports: sections of text, tables and plotly figures, with plotly.js inlined once.

Pages open offline (no CDN), so a report copied off a cluster still shows its plots.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engramlab.results import write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;
color:#1f2328;line-height:1.45}
h1{border-bottom:1px solid #d0d7de;padding-bottom:.3rem} h2{margin-top:2.2rem;border-bottom:1px solid #eaeef2}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem} th,td{border:1px solid #d0d7de;padding:.25rem .6rem}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.7rem;overflow-x:auto;font-size:.85rem} .meta{color:#57606a;font-size:.88rem}
"""


@dataclass
class Section:
    """One titled part of a report: paragraphs/HTML, key-value tables and plotly figures, in that order."""

    title: str
    text: str = ""  # trusted HTML fragment written by engramlab (escape user strings with `esc`)
    tables: list[str] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)  # plotly.graph_objects.Figure


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """An HTML table from row dicts; floats rounded to `digits` significant digits."""
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.{digits}g}</td>')
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v:,}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(data: Mapping[str, Any]) -> str:
    """A two-column table of headline numbers."""
    return table([{"quantity": k, "value": v} for k, v in data.items()])


def render(title: str, sections: Sequence[Section], summary: Mapping[str, Any] | None = None) -> str:
    """The whole page as a string."""
    from plotly.offline import get_plotlyjs

    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">engramlab report, written {datetime.now(UTC):%Y-%m-%d %H:%M UTC}</p>',
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        if section.text:
            parts.append(section.text)
        parts.extend(section.tables)
        for fig in section.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    if summary is not None:
        parts.append("<h2>summary.json</h2><pre>" + esc(json.dumps(summary, indent=2, default=str)) + "</pre>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def write_report(
    path: str | os.PathLike, title: str, sections: Sequence[Section], summary: Mapping[str, Any] | None = None
) -> None:
    """Render and write a report atomically."""
    write_text(path, render(title, sections, summary))
