"""Blocks → Markdown and HTML, for report.py and compare.py.

Blocks: ("h", level, text) ("p", text) ("kv", [(k, v)]) ("ul", [text]) ("table", headers, rows, row_classes)
("plots", None) marks where HTML puts its plots.
"""
from __future__ import annotations

from html import escape
from typing import Any

NA = "—"  # an empty cell


def fmt_ms(v: float | None) -> str:
    if v is None:
        return NA
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fmt_size(n: int | None) -> str:
    if not n:
        return NA
    return f"{n / 1024:.1f} KB" if n < 2**20 else f"{n / 2**20:.2f} MB"


def fmt_value(v: Any, digits: int = 4) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x, digits) for x in v) or NA
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x, digits)}" for k, x in v.items()) or NA
    return str(v)


def fmt_pct(v: float | None) -> str:
    return NA if v is None else f"{100 * v:.2f}%"


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "kv":
            lines += [f"- **{k}:** {_md_cell(v)}" for k, v in b[1]] + [""]
        elif b[0] == "ul":
            lines += [f"- {_md_cell(x)}" for x in b[1]] + [""]
        elif b[0] == "table":
            lines.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]] + [""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 18px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}tr.chosen{background:#eef6ee;font-weight:600}
tr.failed td{color:#b22}tr.not-measured td{color:#777}tr.flagged{background:#fff1e6}td{white-space:nowrap}td.note{font-style:italic}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}dd{margin:0}
.plots{display:flex;flex-wrap:wrap;gap:18px}svg.plot{border:1px solid #e4e4e4;background:#fff}
.scroll{overflow-x:auto}"""


def _html_cells(row: list) -> str:
    """Table cells; a "not measured: …" cell spans the empty latency cells after it."""
    out, i = [], 0
    while i < len(row):
        span = 1
        if str(row[i]).startswith("not measured"):
            while i + span < len(row) and row[i + span] == NA:
                span += 1
        attr = f' colspan="{span}" class="note"' if span > 1 else ""
        out.append(f"<td{attr}>{escape(str(row[i]))}</td>")
        i += span
    return "".join(out)


def render_html(blocks: list, title: str, svgs: list[str]) -> str:
    e = escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "kv":
            out.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in b[1]) + "</dl>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            classes = b[3] or [""] * len(b[2])
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join(f'<tr class="{e(cls)}">' + _html_cells(r) + "</tr>" for r, cls in zip(b[2], classes))
            out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        elif b[0] == "plots" and svgs:
            out.append('<h2>Plots</h2><div class="plots">' + "".join(svgs) + "</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
