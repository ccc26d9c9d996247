"""Report → report.md and report.html (inline SVG plots); report.json is report/json.py.

Markdown and HTML are rendered from the same list of blocks (render.py) so they always say the same thing.
compare_reports lives in compare.py (importable from here too).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.naming import scrub_paths, shipped_path, simplify_dim, simplify_shape
from edgepack.report import plots
from edgepack.report.build import noise_warnings
from edgepack.report.json import SCHEMA_VERSION, report_from_dict, report_to_dict
from edgepack.report.render import (
    NA,
    ORIGINAL,
    budget_text,
    choice_text,
    fmt_ms,
    fmt_pct,
    fmt_size,
    fmt_value,
    in_points,
    ordered,
    render_html,
    render_markdown,
)
from edgepack.target import targets_dir
from edgepack.types import CandidateResult, Report

TOP_OPS = 15
_INT_PRECISIONS = ("int8", "int8-dynamic", "int4")

# ------------------------------------------------------------------------------------------- formatting


def _device(c: CandidateResult) -> str:
    """The device asked for, and the one used when it differs (nothing measured: only the one asked for)."""
    used = c.latency.device if c.latency else None
    if used is None or used == c.device:
        return c.device or NA
    return f"{c.device} → {used}"


def _kernels(c: CandidateResult) -> str:
    k = c.kernels or {}
    if "int_ops" not in k:
        return NA
    n = k.get("int_ops", 0) + k.get("float_ops", 0)
    return f"int {k['int_ops']}/{n} ops, {100 * k.get('int_time_share', 0.0):.0f}% of time"


def quality_metric(report: Report) -> tuple[Callable[[Any], float | None], str]:
    """How the terminal table and the plots read a candidate's quality from its Fidelity: accuracy when labels
    existed, else the first judged output's headline (a pitch's SQNR, not a top-1 over its frames), else top-1
    agreement, else cosine."""
    fids = [c.fidelity for c in report.candidates if c.fidelity]
    if any(f.accuracy is not None for f in fids):
        return (lambda f: f.accuracy), "accuracy"
    rows = [r for f in fids for r in f.outputs
            if r.get("value") is not None and r.get("output") != "*" and r.get("metric") != "finite values"]
    if rows:
        name, metric = rows[0]["output"], rows[0]["metric"]

        def judged(f) -> float | None:
            return next((r["value"] for r in f.outputs if r.get("output") == name and r.get("value") is not None), None)
        return judged, f"{name}: {metric}"
    if any(f.top1_agreement is not None for f in fids):
        return (lambda f: f.top1_agreement), "top-1 agreement"
    return (lambda f: f.cosine), "cosine similarity"


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(simplify_dim(d)) for d in shape) + "]"


def _given(path) -> str:
    """A model or target file as a shipped report shows it: its name, or the relative path it was given as."""
    text = shipped_path(path)
    if not text:
        return NA
    return text if Path(text).name == text else f"{Path(text).name} (given as {text})"


def _target_file(t: dict) -> str:
    if t.get("shipped"):
        return f"{Path(str(t.get('source'))).name} (shipped with edgepack)"
    return _given(t.get("source"))


def _reference_name(report: Report) -> str:
    return "original" if any(c.name == ORIGINAL for c in report.candidates) else "fp32 baseline"


def _parameters(report: Report) -> str:
    """One parameter count: the original's, and after structured pruning the count it leaves."""
    sp = report.extra.get("structured-prune") if isinstance(report.extra, dict) else None
    if isinstance(sp, dict) and sp.get("params_before") is not None and sp.get("params_after") is not None:
        return f"{sp['params_before']:,} before structured pruning, {sp['params_after']:,} after"
    n = report.model.get("parameters")
    return f"{n:,}" if isinstance(n, int) else fmt_value(n)


def _measured(report: Report) -> bool:
    return any(c.latency is not None for c in report.candidates)


def _not_measured(c: CandidateResult) -> str:
    if c.status == "skipped":
        return f"skipped: {c.error}" if c.error else "skipped"
    if c.status == "failed":
        return "not measured: failed"
    return c.latency_note or "not measured"


def _structured(report: Report, d: dict) -> list:
    """The structured-pruning section in words (the step's details, without raw keys)."""
    def num(key, fmt="{:,}"):
        v = d.get(key)
        return NA if v is None else fmt.format(v)

    def ratio(a, b):
        return f" ({d[b] / d[a]:.2f}×)" if d.get(a) and d.get(b) is not None else ""

    rows = [("Channels removed", f"{num('ratio', '{:.0%}')} (by {d.get('importance', 'l1')} importance)"),
            ("Parameters before → after", f"{num('params_before')} → {num('params_after')}"
                                          + ratio("params_before", "params_after")),
            ("FLOPs per sample before → after", f"{num('flops_before')} → {num('flops_after')}"
                                                + ratio("flops_before", "flops_after"))]
    if d.get("accuracy_before") is not None:
        rows.append(("Accuracy: original → pruned → fine-tuned",
                     " → ".join(fmt_pct(d.get(k)) for k in ("accuracy_before", "accuracy_pruned", "accuracy_finetuned"))))
    rows.append(("Fine-tuning", f"{num('epochs_run')} epochs in {num('train_seconds', '{:.1f}')} s"))
    out: list = [("h", 2, "Structured pruning"), ("p", "Channels removed from the original model, then fine-tuned; "
                 "the original is measured as its own candidate (first row above)."), ("kv", rows)]
    history = d.get("history")
    if isinstance(history, list) and history and all(isinstance(h, dict) for h in history):
        headers, table = _records_table(history)
        out += [("h", 3, "Fine-tuning per epoch"), ("table", headers, table, ["wrap"] * len(table))]
    return out


def _pruning(report: Report, d: dict) -> list:
    """Magnitude pruning in words; per-layer numbers as a table."""
    rows = [("Sparsity reached", fmt_pct(d.get("overall_sparsity"))),
            ("Weights set to zero", f"{fmt_value(d.get('zeros'))} of {fmt_value(d.get('size'))}"),
            ("Threshold", fmt_value(d.get("threshold"))), ("Scope", fmt_value(d.get("scope"))),
            ("Layers left dense", fmt_value(d.get("skipped")))]
    if d.get("zlib_bytes_before") and d.get("zlib_bytes_after"):
        rows.append(("Compressed size before → after", f"{fmt_size(d['zlib_bytes_before'])} → "
                     f"{fmt_size(d['zlib_bytes_after'])} ({d['zlib_bytes_after'] / d['zlib_bytes_before']:.2f}×)"))
    out: list = [("h", 2, "Magnitude pruning"), ("kv", rows)]
    if d.get("note"):
        out.append(("p", str(d["note"])))
    layers = d.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(x, dict) for x in layers):
        headers, table = _records_table(layers)
        out += [("h", 3, "Per layer"), ("table", headers, table, ["wrap"] * len(table))]
    return out


_EXTRA_SECTIONS = {"structured-prune": _structured, "prune": _pruning}


def shipped_report(report: Report) -> Report:
    """The report as the bundle ships it: model and target file as given (relative) or by name, and no
    absolute path of this machine in any text."""
    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return scrub_paths(v)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    d = report_to_dict(report)
    source = d["target"].get("source")
    if source and Path(str(source)).is_absolute() and Path(str(source)).parent == targets_dir():
        d["target"]["shipped"] = True  # one of edgepack's own profiles
    d["model"]["source"] = shipped_path(d["model"].get("source"))
    for key in ("inputs", "outputs"):  # symbolic dims as written ('batch', not 'floor(1.0*batch)')
        for spec in d["model"].get(key) or []:
            if isinstance(spec, dict) and isinstance(spec.get("shape"), list):
                spec["shape"] = simplify_shape(spec["shape"])
    d["target"]["source"] = shipped_path(source)
    return report_from_dict(clean(d), "report")


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
        ("Cores / threads used", f"{h.get('cores', '?')} physical cores / "
                                 + (f"{threads} threads" if threads else "the runtime's default threads")),
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
    io = lambda specs: "; ".join(f"{s.get('name')} {s.get('dtype')} {_dims(s.get('shape') or [])}" for s in specs
                                 if isinstance(s, dict)) or NA
    out: list[Any] = [("h", 1, f"edgepack report: {Path(str(m.get('source', 'model'))).name} → {t.get('name', '?')}"),
           ("p", f"Created {report.created} by edgepack {report.edgepack_version} (report schema {SCHEMA_VERSION})."),
           ("h", 2, "Result")]
    if report.chosen:
        out.append(("p", f"Chosen: {report.chosen}: {choice_text(report)}."))
    else:
        out.append(("p", f"No candidate chosen. Reason: {report.reason}"))
    out += [("h", 2, "Target and model"), ("kv", [
        ("Target", f"{t.get('name', '?')}: {t.get('description', '')}".strip(": ")),
        ("Target file", _target_file(t)), ("Runtimes", ", ".join(runtimes) or NA),
        ("Model", _given(m.get("source"))), ("Format", fmt_value(m.get("format"))), ("SHA-256", fmt_value(m.get("sha256"))),
        ("Parameters", _parameters(report)), ("Inputs", io(m.get("inputs", []))),
        ("Outputs", io(m.get("outputs", []))),
        ("Budget", budget_text(report)), ("Reference", _reference_name(report))])]
    return out


def _candidate_tables(report: Report) -> list:
    """Three tables narrow enough for a 1280 px window: the candidates, their latency details, their quality."""
    main_rows, detail_rows, q_rows, classes = [], [], [], []
    for c in ordered(report):
        name = c.name + (" ★" if c.name == report.chosen else "")
        b = c.latency
        if b:
            lat = [fmt_ms(b.p50), fmt_ms(b.p90), fmt_ms(b.p99), f"{b.throughput:.1f}"]
            detail = [f"{fmt_ms(b.mean)} ± {fmt_ms(b.std)}", f"{fmt_ms(b.p50_ci95[0])}–{fmt_ms(b.p50_ci95[1])}",
                      fmt_ms(b.load_ms), fmt_ms(b.first_ms), f"{b.peak_memory_mb:.1f}"]
        else:  # never a number: say why instead
            lat, detail = [_not_measured(c)] + [NA] * 3, [_not_measured(c)] + [NA] * 4
        main_rows.append([name, c.runtime or NA, _device(c), c.precision or NA, c.status, fmt_size(c.size_bytes),
                          fmt_size(c.compressed_bytes), *lat])
        detail_rows.append([name, *detail])
        f = c.fidelity
        q_rows.append([name, fmt_value(f.n) if f else NA, fmt_pct(f.accuracy) if f else NA,
                       fmt_pct(f.top1_agreement) if f else NA, f"{f.cosine:.6f}" if f else NA,
                       f"{f.max_abs_diff:.3g}" if f else NA, _kernels(c), fmt_value(c.within_budget)])
        classes.append("chosen" if c.name == report.chosen else "failed" if c.status == "failed"
                       else "skipped" if c.status == "skipped" else "not-measured" if b is None else "")
    return [("h", 2, "Candidates"), ("p", "Latency in ms per batch, size of the model files, memory in MB (2^20 "
                                     "bytes). ★ marks the chosen candidate."),
            ("table", ["candidate", "runtime", "device (asked → used)", "precision", "status", "size", "compressed",
                       "p50 ms", "p90 ms", "p99 ms", "throughput /s"], main_rows, classes),
            ("h", 3, "Latency details"),
            ("table", ["candidate", "mean ± std ms", "p50 95% CI ms", "load ms", "first inference ms",
                       "peak memory MB"], detail_rows, classes),
            ("h", 3, f"Accuracy and fidelity (vs the {_reference_name(report)})"),
            ("table", ["candidate", "samples", "accuracy", "top-1 agreement", "cosine", "max abs diff",
                       "int vs float kernels", "within budget"], q_rows, classes)]


def _steps(report: Report) -> list:
    out: list = [("h", 2, "Steps per candidate")]
    for c in ordered(report):
        if c.status == "skipped":
            out += [("h", 3, c.name), ("ul", [f"skipped: {c.error or 'no reason recorded'}"])]
            continue
        items = []
        for s in c.steps:
            summary = s.summary
            if not s.changed:  # "nothing to change: no MatMul" → "no change: no MatMul"
                summary = "no change: " + re.sub(r"^(nothing to change|no change)\s*:?\s*", "", summary, flags=re.I)
            items.append(f"{s.kind} ({s.seconds:.2f} s): {summary}")
        items += [f"note: {n}" for n in c.notes]
        empty = ("no step finished (the candidate failed)" if c.status == "failed"
                 else "no steps: the model exactly as given, on the runtime's default settings" if c.name == ORIGINAL
                 else "no steps (the model as loaded)")
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
    return [human(k) for k in headers], [[fmt_value(r.get(k)) for k in headers] for r in records]


def human(key: str) -> str:
    """A data key as words: 'int8_p50_ms' -> 'int8 p50 ms', 'params_after' -> 'parameters after'."""
    words = str(key).replace("_", " ").replace("-", " ").split()
    return " ".join({"params": "parameters", "acc": "accuracy"}.get(w, w) for w in words)


def _value_blocks(title: str, value: Any, level: int) -> list[Any]:
    """An extra section: scalars as key/value lines, lists of records and dicts of records as tables."""
    out: list = [("h", level, human(title).capitalize())]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        headers, rows = _records_table(value)
        return out + [("table", headers, rows, ["wrap"] * len(rows))]
    if not isinstance(value, dict):
        return out + [("p", fmt_value(value))]
    scalars = [(human(k), fmt_value(v)) for k, v in value.items() if not isinstance(v, (dict, list)) or
               (isinstance(v, list) and not any(isinstance(x, dict) for x in v))]
    nested: dict[str, Any] = {k: v for k, v in value.items() if isinstance(v, dict) or
              (isinstance(v, list) and any(isinstance(x, dict) for x in v))}
    if scalars:
        out.append(("kv", scalars))
    if nested and all(isinstance(v, dict) and not any(isinstance(x, (dict, list)) for x in v.values())
                      for v in nested.values()):  # {row: {col: scalar}} → one table
        headers, rows = _records_table([{"name": k, **v} for k, v in nested.items()])
        return out + [("table", headers, rows, ["wrap"] * len(rows))]
    for k, v in nested.items():
        out += _value_blocks(str(k), v, min(level + 1, 4))
    return out


def _rest(report: Report) -> list:
    out = _op_profile(report)
    if report.batch_sweep:
        headers, rows = _records_table(list(report.batch_sweep))
        out += [("h", 2, "Batch sweep"), ("table", headers, rows, [])]
    warnings = list(dict.fromkeys(in_points(w) for w in [*report.warnings, *noise_warnings(report)]))
    if warnings:
        out += [("h", 2, "Warnings"), ("ul", warnings)]
    for key, value in report.extra.items():
        special = _EXTRA_SECTIONS.get(str(key))
        out += special(report, value) if special and isinstance(value, dict) else _value_blocks(str(key), value, 2)
    return out


def _blocks(report: Report) -> list:
    return [*_header(report), *_environment(report), *_candidate_tables(report), ("plots", None),
            *_steps(report), *_rest(report)]


# ---------------------------------------------------------------------------------------------- output


def report_plots(report: Report) -> list[str]:
    """The four SVG plots: latency distribution, quality vs latency, size, operator time of the chosen one."""
    rows = []
    cands = ordered(report)
    for c in cands:
        b = c.latency
        if b is None:
            note = "failed" if c.status == "failed" else _not_measured(c)
            rows.append(plots.LatencyRow(c.name, note=note))
        else:
            rows.append(plots.LatencyRow(c.name, tuple(b.samples_ms), (b.min, b.p50, b.p90, b.max)))
    quality, label = quality_metric(report)
    points = [plots.Point(c.name, c.latency.p50 if c.latency else None, quality(c.fidelity), c.name == report.chosen)
              for c in cands if c.fidelity and quality(c.fidelity) is not None]
    mb = lambda n: n / 2**20 if n else None
    size = plots.bar_plot("Model size per candidate", [c.name for c in cands],
                          [("file size", [mb(c.size_bytes) for c in cands], plots.PALETTE[0]),
                           ("compressed (zip)", [mb(c.compressed_bytes) for c in cands], plots.PALETTE[1])],
                          "MB", plot_id="plot-size",
                          notes={i: c.status if c.status in ("failed", "skipped") else "no size recorded"
                                 for i, c in enumerate(cands) if not c.size_bytes})
    rows_ops, flagged = _op_rows(report)
    ops = [r for r in rows_ops if r[2] != NA]
    op_ms = [float(r[2]) for r in ops]
    colors = [plots.FLAG_COLOR if f else plots.INT_COLOR if r[4] == "int" else "#aaa" if r[4] == NA else plots.FLOAT_COLOR
              for r, f in zip(ops, flagged)]
    op_plot = plots.bar_plot(f"Operator time of {report.chosen or 'the chosen candidate'}",
                             [r[0] for r in ops] or ["no operator profile"], [("time", op_ms or [None], "#999")],
                             "ms per run", plot_id="plot-ops", bar_colors=colors or None,
                             notes={} if ops else {0: "no operator profile recorded" if _measured(report)
                                                   else "operator time " + plots.NOT_MEASURED},
                             legend=[("integer kernel", plots.INT_COLOR), ("float kernel", plots.FLOAT_COLOR),
                                     ("flagged (float fallback / other device)", plots.FLAG_COLOR)])
    return [plots.latency_plot(rows), plots.scatter_plot(points, label), size, op_plot]


def write_reports(report: Report, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and report.html (self-contained, inline SVG) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = shipped_report(report)
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
