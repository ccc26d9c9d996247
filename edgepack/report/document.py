"""Report → report.md, report.html (inline SVG plots), Rich table; report.json via report_json.py.

Markdown and HTML are rendered from the same list of blocks (render.py) so they always say the same thing.
compare_reports lives in compare.py (importable from here too).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgepack.report import plots
from edgepack.report.build import noise_warnings
from edgepack.report.json import SCHEMA_VERSION, report_to_dict
from edgepack.report.render import NA, fmt_ms, fmt_pct, fmt_size, fmt_value, render_html, render_markdown
from edgepack.types import CandidateResult, Report

TOP_OPS = 15
_INT_PRECISIONS = ("int8", "int8-dynamic", "int4")

# ------------------------------------------------------------------------------------------- formatting


def _device(c: CandidateResult) -> str:
    used = c.latency.device if c.latency else None
    if used is None:
        return f"{c.device} → {NA}"
    return used if used == c.device else f"{c.device} → {used}"


def _kernels(c: CandidateResult) -> str:
    k = c.kernels or {}
    if "int_ops" not in k:
        return NA
    n = k.get("int_ops", 0) + k.get("float_ops", 0)
    return f"int {k['int_ops']}/{n} ops, {100 * k.get('int_time_share', 0.0):.0f}% of time"


def quality_metric(report: Report) -> tuple[str, str]:
    """The Fidelity field the plots use: accuracy when labels existed, else top-1 agreement, else cosine."""
    fids = [c.fidelity for c in report.candidates if c.fidelity]
    for key, label in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement")):
        if any(getattr(f, key) is not None for f in fids):
            return key, label
    return "cosine", "cosine similarity"


# -------------------------------------------------------------------------------------- the content

# Blocks: ("h", level, text) ("p", text) ("kv", [(k, v)]) ("ul", [text]) ("table", headers, rows, row_classes)
# ("plots", None) marks where HTML puts its plots.


def _environment(report: Report) -> list:
    h, t = report.host, report.target
    measured = [c for c in report.candidates if c.latency]
    used = sorted({f"{c.latency.runtime}/{c.latency.device}" for c in measured})
    hints = [f"{r.get('runtime')}/{r.get('device') or r.get('provider')}: {r['inference_precision']}"
             for r in t.get("runtimes", []) if isinstance(r, dict) and r.get("inference_precision")]
    hint = h.get("precision_hint") or (", ".join(hints) if hints else "none (runtime default)")
    batches = sorted({c.latency.batch for c in measured})
    threads = h.get("threads", h.get("threads_used"))
    runtimes = [(name, f"{r['version']} (devices: {fmt_value(r.get('devices'))})" if r.get("version") else "not installed")
                for name, r in (h.get("runtimes") or {}).items()]
    return [("h", 2, "Environment"), ("kv", [
        ("CPU", f"{h.get('cpu', '?')} ({h.get('arch', '?')})"),
        ("CPU features", fmt_value(h.get("features")) if h.get("features") else "none detected"),
        ("Cores / threads used", f"{h.get('cores', '?')} physical cores / {threads if threads else '?'} threads"),
        ("OS", fmt_value(h.get("os"))), ("Python", fmt_value(h.get("python"))),
        *runtimes,
        ("Provider/device used", ", ".join(used) if used else "none (nothing measured)"),
        ("Precision hint", hint),
        ("Batch", ", ".join(map(str, batches)) if batches else NA),
    ])]


def _header(report: Report) -> list:
    m, t = report.model, report.target
    runtimes = [f"{r.get('runtime')}/{r.get('provider') or r.get('device')}" for r in t.get("runtimes", [])
                if isinstance(r, dict)]
    io = lambda specs: "; ".join(f"{s.get('name')} {s.get('dtype')} {s.get('shape')}" for s in specs
                                 if isinstance(s, dict)) or NA
    out: list[Any] = [("h", 1, f"edgepack report: {Path(str(m.get('source', 'model'))).name} → {t.get('name', '?')}"),
           ("p", f"Created {report.created} by edgepack {report.edgepack_version} (report schema {SCHEMA_VERSION})."),
           ("h", 2, "Result")]
    if report.chosen:
        out.append(("p", f"Chosen: {report.chosen}. Reason: {report.reason}"))
    else:
        out.append(("p", f"No candidate chosen. Reason: {report.reason}"))
    out += [("h", 2, "Target and model"), ("kv", [
        ("Target", f"{t.get('name', '?')}: {t.get('description', '')}".strip(": ")),
        ("Target file", fmt_value(t.get("source")) or NA), ("Runtimes", ", ".join(runtimes) or NA),
        ("Model", fmt_value(m.get("source"))), ("Format", fmt_value(m.get("format"))), ("SHA-256", fmt_value(m.get("sha256"))),
        ("Parameters", fmt_value(m.get("parameters"))), ("Inputs", io(m.get("inputs", []))),
        ("Outputs", io(m.get("outputs", []))),
        ("Budget", fmt_value(report.budget)), ("Baseline", report.baseline or NA)])]
    return out


def _candidate_tables(report: Report) -> list:
    lat_rows, q_rows, classes = [], [], []
    for c in report.candidates:
        name = c.name + (" ★" if c.name == report.chosen else "")
        b = c.latency
        if b:
            lat = [fmt_ms(b.p50), fmt_ms(b.p90), fmt_ms(b.p99), f"{fmt_ms(b.mean)} ± {fmt_ms(b.std)}",
                   f"{fmt_ms(b.p50_ci95[0])}–{fmt_ms(b.p50_ci95[1])}", f"{b.throughput:.1f}", fmt_ms(b.load_ms),
                   fmt_ms(b.first_ms), f"{b.peak_memory_mb:.1f}"]
        else:  # never a number: say why instead
            why = c.latency_note or ("not measured: failed" if c.status == "failed" else "not measured")
            lat = [why] + [NA] * 8
        lat_rows.append([name, c.runtime, _device(c), c.precision, c.status, fmt_size(c.size_bytes),
                         fmt_size(c.compressed_bytes), *lat])
        f = c.fidelity
        q_rows.append([name, fmt_value(f.n) if f else NA, fmt_pct(f.accuracy) if f else NA,
                       fmt_pct(f.top1_agreement) if f else NA, f"{f.cosine:.6f}" if f else NA,
                       f"{f.max_abs_diff:.3g}" if f else NA, _kernels(c), fmt_value(c.within_budget)])
        classes.append("chosen" if c.name == report.chosen else "failed" if c.status == "failed"
                       else "not-measured" if b is None else "")
    return [("h", 2, "Candidates"), ("p", "Latency in ms per batch, size of the model files, memory in MB (2^20 "
                                     "bytes). ★ marks the chosen candidate."),
            ("table", ["candidate", "runtime", "device (asked → used)", "precision", "status", "size", "compressed",
                       "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "p50 95% CI ms", "throughput /s", "load ms",
                       "first inference ms", "peak memory MB"], lat_rows, classes),
            ("h", 3, "Accuracy and fidelity (vs the fp32 baseline)"),
            ("table", ["candidate", "samples", "accuracy", "top-1 agreement", "cosine", "max abs diff",
                       "int vs float kernels", "within budget"], q_rows, classes)]


def _steps(report: Report) -> list:
    out: list = [("h", 2, "Steps per candidate")]
    for c in report.candidates:
        items = []
        for s in c.steps:
            summary = s.summary
            if not s.changed:  # "nothing to change: no MatMul" → "no change: no MatMul"
                summary = "no change: " + re.sub(r"^(nothing to change|no change)\s*:?\s*", "", summary, flags=re.I)
            items.append(f"{s.kind} ({s.seconds:.2f} s): {summary}")
        items += [f"note: {n}" for n in c.notes]
        empty = "no step finished (the candidate failed)" if c.status == "failed" else "no steps (the model as loaded)"
        out += [("h", 3, c.name), ("ul", items or [empty])]
    failed = [c for c in report.candidates if c.status == "failed"]
    if failed:
        out[0:0] = [("h", 2, "Failed candidates"), ("ul", [f"{c.name}: {c.error or 'no error recorded'}"
                                                           for c in failed])]
    return out


def _op_rows(report: Report) -> tuple[list, list[bool]]:
    chosen = next((c for c in report.candidates if c.name == report.chosen), None)
    want_int = bool(chosen and chosen.precision in _INT_PRECISIONS)
    used = chosen.latency.device if chosen and chosen.latency else None
    ops = sorted(report.op_profile, key=lambda o: -float(o.get("ms", 0.0)))
    rows, flagged = [], []
    for o in ops[:TOP_OPS]:
        flags = []
        if o.get("fallback") or (want_int and not o.get("int")):
            flags.append("float")
        if used and o.get("device") and o["device"] != used:
            flags.append(f"on {o['device']}")
        rows.append([str(o.get("op")), fmt_value(o.get("calls")), fmt_ms(o.get("ms")), fmt_pct(o.get("share")),
                     "int" if o.get("int") else "float", fmt_value(o.get("device")), ", ".join(flags) or ""])
        flagged.append(bool(flags))
    rest = ops[TOP_OPS:]
    if rest:
        rows.append([f"other ({len(rest)} op types)", NA, fmt_ms(sum(o.get("ms", 0.0) for o in rest)),
                     fmt_pct(sum(o.get("share", 0.0) for o in rest)), NA, NA, ""])
        flagged.append(False)
    return rows, flagged


def _op_profile(report: Report) -> list:
    if not report.op_profile:
        return []
    rows, flagged = _op_rows(report)
    return [("h", 2, f"Operator profile of {report.chosen}"),
            ("p", "Time per op type per run (ms). Flagged: float kernels in an integer candidate, or ops that ran "
                  "on another device than the one measured."),
            ("table", ["op", "calls", "ms", "share", "kernel", "device", "flag"], rows,
             ["flagged" if f else "" for f in flagged])]


def _records_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers: list[str] = []
    for r in records:
        headers += [k for k in r if k not in headers]
    return headers, [[fmt_value(r.get(k)) for k in headers] for r in records]


def _value_blocks(title: str, value: Any, level: int) -> list[Any]:
    """An extra section: scalars as key/value lines, lists of records and dicts of records as tables."""
    out: list = [("h", level, title.replace("_", " ").capitalize())]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        headers, rows = _records_table(value)
        return out + [("table", headers, rows, [])]
    if not isinstance(value, dict):
        return out + [("p", fmt_value(value))]
    scalars = [(k, fmt_value(v)) for k, v in value.items() if not isinstance(v, (dict, list)) or
               (isinstance(v, list) and not any(isinstance(x, dict) for x in v))]
    nested: dict[str, Any] = {k: v for k, v in value.items() if isinstance(v, dict) or
              (isinstance(v, list) and any(isinstance(x, dict) for x in v))}
    if scalars:
        out.append(("kv", scalars))
    if nested and all(isinstance(v, dict) and not any(isinstance(x, (dict, list)) for x in v.values())
                      for v in nested.values()):  # {row: {col: scalar}} → one table
        headers, rows = _records_table([{"name": k, **v} for k, v in nested.items()])
        return out + [("table", headers, rows, [])]
    for k, v in nested.items():
        out += _value_blocks(str(k), v, min(level + 1, 4))
    return out


def _rest(report: Report) -> list:
    out = _op_profile(report)
    if report.batch_sweep:
        headers, rows = _records_table(list(report.batch_sweep))
        out += [("h", 2, "Batch sweep"), ("table", headers, rows, [])]
    warnings = list(dict.fromkeys([*report.warnings, *noise_warnings(report)]))
    if warnings:
        out += [("h", 2, "Warnings"), ("ul", warnings)]
    for key, value in report.extra.items():
        out += _value_blocks(str(key), value, 2)
    return out


def _blocks(report: Report) -> list:
    return [*_header(report), *_environment(report), *_candidate_tables(report), ("plots", None),
            *_steps(report), *_rest(report)]


# ---------------------------------------------------------------------------------------------- output


def report_plots(report: Report) -> list[str]:
    """The four SVG plots: latency distribution, quality vs latency, size, operator time of the chosen one."""
    rows = []
    for c in report.candidates:
        b = c.latency
        if b is None:
            note = "failed" if c.status == "failed" else (c.latency_note or "not measured")
            rows.append(plots.LatencyRow(c.name, note=note))
        else:
            rows.append(plots.LatencyRow(c.name, tuple(b.samples_ms), (b.min, b.p50, b.p90, b.max)))
    key, label = quality_metric(report)
    points = [plots.Point(c.name, c.latency.p50 if c.latency else None, getattr(c.fidelity, key),
                          c.name == report.chosen)
              for c in report.candidates if c.fidelity and getattr(c.fidelity, key) is not None]
    mb = lambda n: n / 2**20 if n else None
    cands = list(report.candidates)
    size = plots.bar_plot("Model size per candidate", [c.name for c in cands],
                          [("file size", [mb(c.size_bytes) for c in cands], plots.PALETTE[0]),
                           ("compressed (zip)", [mb(c.compressed_bytes) for c in cands], plots.PALETTE[1])],
                          "MB", plot_id="plot-size",
                          notes={i: "failed" for i, c in enumerate(cands) if not c.size_bytes})
    rows_ops, flagged = _op_rows(report)
    ops = [r for r in rows_ops if r[2] != NA]
    op_ms = [float(r[2]) for r in ops]
    colors = [plots.FLAG_COLOR if f else plots.INT_COLOR if r[4] == "int" else "#aaa" if r[4] == NA else plots.FLOAT_COLOR
              for r, f in zip(ops, flagged)]
    op_plot = plots.bar_plot(f"Operator time of {report.chosen or 'the chosen candidate'}",
                             [r[0] for r in ops] or ["no operator profile"], [("time", op_ms or [None], "#999")],
                             "ms per run", plot_id="plot-ops", bar_colors=colors or None,
                             notes={} if ops else {0: "no operator profile recorded"},
                             legend=[("integer kernel", plots.INT_COLOR), ("float kernel", plots.FLOAT_COLOR),
                                     ("flagged (float fallback / other device)", plots.FLAG_COLOR)])
    return [plots.latency_plot(rows), plots.scatter_plot(points, label), size, op_plot]


def write_reports(report: Report, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and report.html (self-contained, inline SVG) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(report)
    title = blocks[0][2]
    files = {"report.json": json.dumps(report_to_dict(report), indent=2) + "\n",
             "report.md": render_markdown(blocks),
             "report.html": render_html(blocks, title, report_plots(report))}
    paths = []
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        paths.append(out_dir / name)
    return paths
