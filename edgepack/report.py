"""Report → report.md, report.html (inline SVG plots), Rich table; report.json via report_json.py.

Markdown and HTML are rendered from the same list of blocks (render.py) so they always say the same thing.
compare_reports lives in compare.py (importable from here too).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import plots
from .render import NA, render_html, render_markdown
from .report_json import SCHEMA_VERSION, read_report, report_from_dict, report_to_dict  # noqa: F401  (re-exported)
from .types import CandidateResult, Report

NOISY_CV = 0.15  # above this coefficient of variation a latency may be noisy...
NOISY_SPREAD = 0.25  # ...when its p90 is also this far above its p50


def _spread(lat) -> float:
    return (lat.p90 - lat.p50) / lat.p50 if lat.p50 > 0 else 0.0
TOP_OPS = 15
_INT_PRECISIONS = ("int8", "int8-dynamic", "int4")

# ------------------------------------------------------------------------------------------- formatting


def _ms(v: float | None) -> str:
    if v is None:
        return NA
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _size(n: int | None) -> str:
    if not n:
        return NA
    return f"{n / 1024:.1f} KB" if n < 2**20 else f"{n / 2**20:.2f} MB"


def _g(v: Any, digits: int = 4) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_g(x, digits) for x in v) or NA
    if isinstance(v, dict):
        return ", ".join(f"{k}={_g(x, digits)}" for k, x in v.items()) or NA
    return str(v)


def _pct(v: float | None) -> str:
    return NA if v is None else f"{100 * v:.2f}%"


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


def _quality_metric(report: Report) -> tuple[str, str]:
    """The Fidelity field the plots use: accuracy when labels existed, else top-1 agreement, else cosine."""
    fids = [c.fidelity for c in report.candidates if c.fidelity]
    for key, label in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement")):
        if any(getattr(f, key) is not None for f in fids):
            return key, label
    return "cosine", "cosine similarity"


# -------------------------------------------------------------------------------------- the content

# Blocks: ("h", level, text) ("p", text) ("kv", [(k, v)]) ("ul", [text]) ("table", headers, rows, row_classes)
# ("plots", None) marks where HTML puts its plots.


def noise_warnings(report: Report) -> list[str]:
    """Latencies that are noisy (cv high) or not distinguishable from the chosen one (95% CIs overlap)."""
    out = []
    measured = [c for c in report.candidates if c.latency and c.status == "ok"]
    # cv (std/mean) is reported, but a few slow outliers among thousands of runs inflate it; the warning
    # uses the spread of the bulk, (p90 - p50) / p50, which is what can reorder two candidates.
    noisy = [c for c in measured if c.latency.cv > NOISY_CV and _spread(c.latency) > NOISY_SPREAD]
    if noisy:
        worst = max(noisy, key=lambda c: _spread(c.latency))
        out.append(f"latency is noisy on {len(noisy)} of {len(measured)} candidates (p90 up to "
                   f"{_spread(worst.latency):.0%} above p50 on {worst.name}, cv {worst.latency.cv:.2f}): other "
                   "programs may be competing for the CPU; rerun on a quiet machine or raise --bench-time")
    chosen = next((c for c in measured if c.name == report.chosen), None)
    if chosen:
        lo, hi = chosen.latency.p50_ci95
        for c in measured:
            o_lo, o_hi = c.latency.p50_ci95
            if c is not chosen and o_lo <= hi and lo <= o_hi:
                out.append(f"{chosen.name} and {c.name}: p50 95% CIs overlap ({_ms(lo)}–{_ms(hi)} vs "
                           f"{_ms(o_lo)}–{_ms(o_hi)} ms); their latency difference is within noise")
    return out


def _environment(report: Report) -> list:
    h, t = report.host, report.target
    measured = [c for c in report.candidates if c.latency]
    used = sorted({f"{c.latency.runtime}/{c.latency.device}" for c in measured})
    hints = [f"{r.get('runtime')}/{r.get('device') or r.get('provider')}: {r['inference_precision']}"
             for r in t.get("runtimes", []) if isinstance(r, dict) and r.get("inference_precision")]
    hint = h.get("precision_hint") or (", ".join(hints) if hints else "none (runtime default)")
    batches = sorted({c.latency.batch for c in measured})
    threads = h.get("threads", h.get("threads_used"))
    ort = f"{h['ort_version']} (providers: {_g(h.get('ort_providers'))})" if h.get("ort_version") else "not installed"
    ov = f"{h['ov_version']} (devices: {_g(h.get('ov_devices'))})" if h.get("ov_version") else "not installed"
    return [("h", 2, "Environment"), ("kv", [
        ("CPU", f"{h.get('cpu', '?')} ({h.get('arch', '?')})"),
        ("CPU features", _g(h.get("features")) if h.get("features") else "none detected"),
        ("Cores / threads used", f"{h.get('cores', '?')} physical cores / {threads if threads else '?'} threads"),
        ("OS", _g(h.get("os"))), ("Python", _g(h.get("python"))),
        ("ONNX Runtime", ort), ("OpenVINO", ov),
        ("Provider/device used", ", ".join(used) if used else "none (nothing measured)"),
        ("Precision hint", hint),
        ("Batch", ", ".join(map(str, batches)) if batches else NA),
    ])]


def _header(report: Report) -> list:
    m, t = report.model, report.target
    runtimes = [f"{r.get('runtime')}/{r.get('provider') or r.get('device')}" for r in t.get("runtimes", [])
                if isinstance(r, dict)]
    io = lambda specs: "; ".join(f"{s.get('name')} {s.get('dtype')} {s.get('shape')}" for s in specs  # noqa: E731
                                 if isinstance(s, dict)) or NA
    out = [("h", 1, f"edgepack report: {Path(str(m.get('source', 'model'))).name} → {t.get('name', '?')}"),
           ("p", f"Created {report.created} by edgepack {report.edgepack_version} (report schema {SCHEMA_VERSION})."),
           ("h", 2, "Result")]
    if report.chosen:
        out.append(("p", f"Chosen: {report.chosen}. Reason: {report.reason}"))
    else:
        out.append(("p", f"No candidate chosen. Reason: {report.reason}"))
    out += [("h", 2, "Target and model"), ("kv", [
        ("Target", f"{t.get('name', '?')}: {t.get('description', '')}".strip(": ")),
        ("Target file", _g(t.get("source")) or NA), ("Runtimes", ", ".join(runtimes) or NA),
        ("Model", _g(m.get("source"))), ("Format", _g(m.get("format"))), ("SHA-256", _g(m.get("sha256"))),
        ("Parameters", _g(m.get("parameters"))), ("Inputs", io(m.get("inputs", []))),
        ("Outputs", io(m.get("outputs", []))),
        ("Budget", _g(report.budget)), ("Baseline", report.baseline or NA)])]
    return out


def _candidate_tables(report: Report) -> list:
    lat_rows, q_rows, classes = [], [], []
    for c in report.candidates:
        name = c.name + (" ★" if c.name == report.chosen else "")
        b = c.latency
        if b:
            lat = [_ms(b.p50), _ms(b.p90), _ms(b.p99), f"{_ms(b.mean)} ± {_ms(b.std)}",
                   f"{_ms(b.p50_ci95[0])}–{_ms(b.p50_ci95[1])}", f"{b.throughput:.1f}", _ms(b.load_ms),
                   _ms(b.first_ms), f"{b.peak_memory_mb:.1f}"]
        else:  # never a number: say why instead
            why = c.latency_note or ("not measured: failed" if c.status == "failed" else "not measured")
            lat = [why] + [NA] * 8
        lat_rows.append([name, c.runtime, _device(c), c.precision, c.status, _size(c.size_bytes),
                         _size(c.compressed_bytes), *lat])
        f = c.fidelity
        q_rows.append([name, _g(f.n) if f else NA, _pct(f.accuracy) if f else NA,
                       _pct(f.top1_agreement) if f else NA, f"{f.cosine:.6f}" if f else NA,
                       f"{f.max_abs_diff:.3g}" if f else NA, _kernels(c), _g(c.within_budget)])
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
        rows.append([str(o.get("op")), _g(o.get("calls")), _ms(o.get("ms")), _pct(o.get("share")),
                     "int" if o.get("int") else "float", _g(o.get("device")), ", ".join(flags) or ""])
        flagged.append(bool(flags))
    rest = ops[TOP_OPS:]
    if rest:
        rows.append([f"other ({len(rest)} op types)", NA, _ms(sum(o.get("ms", 0.0) for o in rest)),
                     _pct(sum(o.get("share", 0.0) for o in rest)), NA, NA, ""])
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
    return headers, [[_g(r.get(k)) for k in headers] for r in records]


def _value_blocks(title: str, value: Any, level: int) -> list:
    """An extra section: scalars as key/value lines, lists of records and dicts of records as tables."""
    out: list = [("h", level, title.replace("_", " ").capitalize())]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        headers, rows = _records_table(value)
        return out + [("table", headers, rows, [])]
    if not isinstance(value, dict):
        return out + [("p", _g(value))]
    scalars = [(k, _g(v)) for k, v in value.items() if not isinstance(v, (dict, list)) or
               (isinstance(v, list) and not any(isinstance(x, dict) for x in v))]
    nested = {k: v for k, v in value.items() if isinstance(v, dict) or
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
    key, label = _quality_metric(report)
    points = [plots.Point(c.name, c.latency.p50 if c.latency else None, getattr(c.fidelity, key),
                          c.name == report.chosen)
              for c in report.candidates if c.fidelity and getattr(c.fidelity, key) is not None]
    mb = lambda n: n / 2**20 if n else None  # noqa: E731
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


def candidates_table(report: Report):
    """A compact Rich table of the candidates for the terminal (report.md has every column)."""
    from rich.table import Table

    key, label = _quality_metric(report)
    base = next((c for c in report.candidates if c.name == report.baseline), None)
    t = Table(title=f"{report.target.get('name', '')}: chosen {report.chosen or 'none'}", title_justify="left")
    for col, just in (("candidate", "left"), ("precision", "left"), ("size", "right"), ("p50 ms", "right"),
                      ("vs fp32", "right"), (label, "right"), ("ok", "center")):
        t.add_column(col, justify=just, no_wrap=True)
    for c in report.candidates:
        if c.status == "skipped":
            continue
        b, f = c.latency, c.fidelity
        q = getattr(f, key) if f else None
        style = "bold green" if c.name == report.chosen else "red" if c.status == "failed" else None
        p50 = _ms(b.p50) if b else ("failed" if c.status == "failed" else "not measured")
        ratio = f"{b.p50 / base.latency.p50:.2f}×" if b and base and base.latency else NA
        t.add_row(c.name + (" ★" if c.name == report.chosen else ""), c.precision, _size(c.size_bytes), p50,
                  ratio, NA if q is None else f"{q:.4f}", {True: "✓", False: "✗"}.get(c.within_budget, NA),
                  style=style)
    notes = sorted({c.latency_note for c in report.candidates if c.latency is None and c.latency_note})
    if notes:
        t.caption = "; ".join(notes)
    return t


def __getattr__(name: str):
    if name == "compare_reports":  # moved to compare.py, which imports this module: imported on first use
        from .compare import compare_reports

        return compare_reports
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
