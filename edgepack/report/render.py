"""Blocks → Markdown and HTML, for report.py and compare.py.

Blocks: ("h", level, text) ("p", text) ("kv", [(k, v)]) ("ul", [text]) ("table", headers, rows, row_classes)
("plots", None) marks where HTML puts its plots.
"""
from __future__ import annotations

from html import escape
from typing import Any

NA = "—"  # an empty cell
ORIGINAL = "original"  # the candidate that is the model exactly as given (pipeline)


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


def points(fraction: float) -> str:
    """0.01 -> '1 point', 0.005 -> '0.5 points' (accuracy drops are given and shown in points)."""
    v = round(100 * fraction, 4)
    return f"{v:g} point" + ("" if v == 1 else "s")


def ordered(report) -> list:
    """The candidates as reports show them: the original model first."""
    return sorted(report.candidates, key=lambda c: c.name != ORIGINAL)


def reference(report):
    """The candidate latency ratios are taken against: the original model, else the fp32 baseline."""
    by_name = {c.name: c for c in report.candidates}
    for name in (ORIGINAL, report.baseline):
        c = by_name.get(name)
        if c is not None and c.latency is not None:
            return c
    return None


def budget_text(report) -> str:
    b = report.budget or {}
    if b.get("metric") == "accuracy" and b.get("max_drop") is not None:
        ref = b.get("reference_accuracy")
        return f"accuracy at most {points(b['max_drop'])} below the original's" + (
            f" {100 * ref:.2f}%" if ref is not None else "")
    if b.get("min_top1_agreement") is not None:
        return (f"top-1 agreement ≥ {100 * b['min_top1_agreement']:g}% and cosine ≥ {b.get('min_cosine', 0):g} "
                "with the original")
    return "fidelity to the original within the target's thresholds"


def in_points(text: str) -> str:
    """'(drop +0.0139, budget 0.0100)' -> '(drop 1.39 points, budget 1 point)': accuracy drops in points."""
    import re

    text = re.sub(r"\(drop ([+-]?\d+\.\d+)(?!\d*\s*points?\b)", lambda m: f"(drop {points(float(m.group(1)))}", text)
    return re.sub(r"budget (\d+\.\d+)\)", lambda m: f"budget {points(float(m.group(1)))})", text)


def choice_text(report) -> str:
    """Why the chosen candidate won, in points and ratios to the original (the pipeline's reason when the
    choice was not by latency)."""
    c = next((c for c in report.candidates if c.name == report.chosen), None)
    if c is None or c.latency is None or not c.within_budget:
        return in_points(report.reason)
    why = f"the fastest within the budget ({budget_text(report)}): p50 {fmt_ms(c.latency.p50)} ms"
    ref = reference(report)
    if ref is not None and ref is not c:
        why += f", {c.latency.p50 / ref.latency.p50:.2f}× the " + ("original" if ref.name == ORIGINAL else ref.name)
    f = c.fidelity
    if f is not None and f.accuracy is not None:
        why += f"; accuracy {100 * f.accuracy:.2f}%"
    elif f is not None and f.outputs:  # each output by its own metric (a top-1 of an embedding means nothing)
        why += "; " + ", ".join(f"{r['output']} {r['metric']} {r['value']:.4g}" for r in f.outputs
                                if r.get("value") is not None)
    elif f is not None and f.top1_agreement is not None:
        why += f"; top-1 agreement {100 * f.top1_agreement:.2f}%"
    return why


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


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}p,dl,ul{max-width:1100px}
table{border-collapse:collapse;margin:8px 0 18px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3;white-space:normal}tr.chosen{background:#eef6ee;font-weight:600}
tr.failed td{color:#b22}tr.not-measured td,tr.skipped td{color:#777}tr.flagged{background:#fff1e6}
td{white-space:nowrap}td.note,tr.wrap td{white-space:normal;overflow-wrap:break-word}td.note{font-style:italic;min-width:14em}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 14px}dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
.plots{display:flex;flex-wrap:wrap;gap:18px}svg.plot{border:1px solid #e4e4e4;background:#fff;max-width:100%;height:auto}
.scroll{overflow-x:auto;max-width:100%}"""


def _html_cells(row: list) -> str:
    """Table cells; a "not measured: …" or "skipped: …" note spans the empty cells after it, and wraps."""
    out, i = [], 0
    while i < len(row):
        span, note = 1, i > 0 and str(row[i]).startswith(("not measured", "skipped:"))
        while note and i + span < len(row) and row[i + span] == NA:
            span += 1
        attr = (f' colspan="{span}"' if span > 1 else "") + (' class="note"' if note else "")
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
