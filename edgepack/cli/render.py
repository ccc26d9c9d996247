"""Rich rendering of command results for the terminal (the --json forms bypass this)."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgepack.report.render import ORIGINAL, choice_text, ordered, points, reference


def runtimes_text(target) -> str:
    """'onnxruntime: XnnpackExecutionProvider, CPUExecutionProvider; openvino: CPU' (names never cut)."""
    groups: dict[str, list[str]] = {}
    for r in target.runtimes:
        groups.setdefault(r.runtime, []).append(r.provider or r.device or "default")
    return "; ".join(f"{rt}: {', '.join(devs)}" for rt, devs in groups.items())


def target_lines(targets, width: int) -> list[str]:
    """One line per target, at most `width` characters: only the description is shortened (or left out)."""
    rows = [(t.name, runtimes_text(t), ", ".join(p.value for p in t.precisions),
             t.description.split(". ")[0].rstrip(".")) for t in targets]
    head = ("target", "runtimes", "precisions", "hardware")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    room = width - sum(widths) - 6
    lines = []
    for r in [head, *rows]:
        fixed = "  ".join(c.ljust(w) for c, w in zip(r, widths))
        desc = r[3] if len(r[3]) <= room else r[3][: max(room - 1, 0)] + "…"
        lines.append((fixed + "  " + desc).rstrip() if room >= 12 else fixed.rstrip())
    return lines


def render_targets(out, targets) -> None:
    lines = target_lines(targets, out.width)
    out.print(Text(lines[0], style="bold"), soft_wrap=True)
    for line in lines[1:]:
        out.print(Text(line), soft_wrap=True)


def render_target(out, target, plan: dict) -> None:
    out.print(f"[bold]{escape(target.name)}[/]  ({escape(str(target.source))})")
    out.print(target.description, highlight=False)
    q = target.quantization
    out.print(f"runtimes: {', '.join(r.label + (f' [{r.inference_precision}]' if r.inference_precision else '') for r in target.runtimes)}")
    out.print(f"precisions: {', '.join(p.value for p in target.precisions)}")
    out.print(f"quantization: {q.format} activations {q.activation_type}{' sym' if q.symmetric_activations else ''}, "
              f"weights {q.weight_type}{' sym' if q.symmetric_weights else ''}{' per-channel' if q.per_channel else ''}, "
              f"calibration {q.calibration_method}")
    out.print(f"shapes: {target.shapes.policy}" + (f" (batch {target.shapes.batch})" if target.shapes.policy == "static" else ""))
    out.print(f"opset: {target.opset.min}-{target.opset.max}; bench: {target.bench.threads or 'all'} threads, "
              f"warm-up {target.bench.warmup}, {target.bench.time_budget_s}s of timing after a short round per candidate")
    render_plan(out, plan)


def render_plan(out, plan: dict) -> None:
    if plan.get("model"):  # pack --dry-run: what the plan is for
        out.print(f"model: {plan['model']}", highlight=False)
        for k, v in plan.get("data", {}).items():
            out.print(f"{k}: {v}", highlight=False)
        out.print(f"budget: {points(plan['max_drop'])} of accuracy (with labelled --eval data)", highlight=False)
    t = Table(title=f"plan for {plan['target']}", box=None, header_style="bold")
    for col in ("candidate", "runtime", "precision", "steps"):
        t.add_column(col)
    shared = " → ".join(s["kind"] for s in plan["shared_steps"])
    for c in plan["candidates"]:
        steps = " → ".join(s["kind"] + (f"({_params(s['params'])})" if s["params"] else "") for s in c["steps"])
        t.add_row(c["name"], c["runtime"], c["precision"], (shared + " → " if shared else "") + steps)
    out.print(t)
    for s in plan["skipped"]:
        out.print(f"skipped {s['name']}: {s['reason']}", highlight=False)
    for w in plan.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(str(w))}", highlight=False)


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def render_doctor(out, d: dict) -> None:
    h = d["host"]
    out.print(f"[bold]CPU[/]: {h['cpu']} ({h['arch']}, {h['cores']} physical cores)")
    out.print(f"[bold]features[/]: {', '.join(h['features']) or 'none detected'}")
    out.print(f"[bold]OS[/]: {h['os']}, Python {h['python']}")
    for name, rt in h["runtimes"].items():
        out.print(f"[bold]{name}[/] {rt['version'] or 'not installed'}: {', '.join(rt['devices'])}", highlight=False)
    t = Table(box=None, header_style="bold")
    t.add_column("target")
    t.add_column("measurable here")
    t.add_column("why not")
    for name, info in d["targets"].items():
        t.add_row(name, "yes" if info["measurable"] else "no", escape(info["reason"] or ""))  # (pip extras in [])
    out.print(t)


def render_inspect(out, info: dict) -> None:
    out.print(f"[bold]{escape(str(info.get('path', '')))}[/] format {info.get('format')} size {info.get('size_bytes', 0):,} bytes, "
              f"{info.get('parameters', 0):,} parameters", highlight=False)
    for kind in ("inputs", "outputs"):
        for s in info.get(kind, []):
            out.print(f"  {kind[:-1]} {s['name']}: {s['dtype']} {s['shape']}", highlight=False)
    ops = info.get("ops") or info.get("op_histogram") or {}
    items = ops.items() if isinstance(ops, dict) else [(o["op"], o["count"]) for o in ops]
    out.print("  ops: " + ", ".join(f"{k}×{v}" for k, v in items), highlight=False)
    if info.get("metadata"):
        out.print(f"  metadata: {info['metadata']}", highlight=False)


def render_profile(out, d: dict) -> None:
    t = Table(title=f"{d['bundle'].get('name', '')} on {d['device_used']} ({d['runtime']} {d.get('runtime_version', '')})",
              box=None, header_style="bold")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "mean±std ms", "throughput/s", "iters"):
        t.add_column(col, justify="right")
    for r in d.get("batch_sweep") or [dict(d["latency"], batch=d.get("batch", 1))]:
        t.add_row(str(r.get("batch", 1)), f"{r['p50']:.4f}", f"{r['p90']:.4f}", f"{r['p99']:.4f}",
                  f"{r['mean']:.4f}±{r['std']:.4f}", f"{r['throughput']:.1f}", str(r["iterations"]))
    out.print(t)
    lat = d["latency"]
    out.print(f"load {lat.get('load_ms', 0):.1f} ms, first inference {lat.get('first_ms', 0):.3f} ms, "
              f"peak memory {lat.get('peak_memory_mb', 0):.1f} MB, p50 95% CI {lat['p50_ci95']}", highlight=False)
    inside = d.get("runtime_latency")
    if inside:
        out.print(f"inside the runtime (OpenVINO's own timer, no Python call cost): p50 {inside['p50']:.4f} ms, "
                  f"p90 {inside['p90']:.4f} ms", highlight=False)
    if d.get("written"):
        out.print(f"profile: {d['written']}")


def render_distill(out, d: dict) -> None:
    t = Table(box=None, header_style="bold")
    for col in ("model", "parameters", "accuracy", "p50 ms"):
        t.add_column(col, justify="right")
    for role in ("teacher", "student"):
        r = d[role]
        t.add_row(role, f"{r['parameters']:,}", f"{r['accuracy']:.4f}", f"{r.get('p50_ms') or float('nan'):.4f}")
    out.print(t)
    out.print(f"student: {d['student_pt2']}\nonnx: {d['student_onnx']}")


def chosen_line(report) -> str:
    """'chosen: X — why' (Rich markup)."""
    if report.chosen is None:
        return f"chosen: none — {escape(report.reason)}"
    return f"chosen: [bold]{escape(report.chosen)}[/] — {escape(choice_text(report))}"


def next_steps(bundle) -> list[str]:
    """Three things to do after a pack, with the bundle's path as it is on this machine."""
    import shlex
    from pathlib import Path

    b = Path(bundle)
    q = shlex.quote(str(b))
    name = shlex.quote(b.name)
    return [f"open the report in a browser: {shlex.quote(str(b / 'report.html'))}",
            f"run the self-test here: python {shlex.quote(str(b / 'run.py'))} --selftest",
            f"copy it to the device and test it there: scp -r {q} user@device: && ssh user@device "
            f"'cd {name} && python -m pip install -r requirements.txt && python run.py --selftest'"]


def candidates_table(report):
    """A compact Rich table of the candidates for the terminal (report.md has every column)."""
    from edgepack.report.document import quality_metric
    from edgepack.report.render import NA, fmt_ms, fmt_size

    quality, label = quality_metric(report)
    base = reference(report)
    has_original = any(c.name == ORIGINAL for c in report.candidates)
    vs = "vs original" if (base is None and has_original) or (base is not None and base.name == ORIGINAL) else "vs fp32"
    t = Table(title=f"{report.target.get('name', '')}: chosen {report.chosen or 'none'}", title_justify="left")
    for col, just in (("candidate", "left"), ("precision", "left"), ("size", "right"), ("p50 ms", "right"),
                      (vs, "right"), (label, "right"), ("ok", "center")):
        t.add_column(col, justify=just, no_wrap=True)
    for c in ordered(report):
        if c.status == "skipped":
            continue
        b, f = c.latency, c.fidelity
        q = quality(f) if f else None
        style = "bold green" if c.name == report.chosen else "red" if c.status == "failed" else None
        p50 = fmt_ms(b.p50) if b else ("failed" if c.status == "failed" else "not measured")
        ratio = f"{b.p50 / base.latency.p50:.2f}×" if b and base else NA
        t.add_row(c.name + (" ★" if c.name == report.chosen else ""), c.precision, fmt_size(c.size_bytes), p50,
                  ratio, NA if q is None else f"{q:.4f}", {True: "✓", False: "✗"}.get(c.within_budget, NA),
                  style=style)
    notes = sorted({c.latency_note for c in report.candidates if c.latency is None and c.latency_note})
    skipped = [c.name for c in report.candidates if c.status == "skipped"]
    if skipped:
        notes.append(f"skipped: {', '.join(skipped)} (see report.md)")
    if notes:
        t.caption = "; ".join(notes)
    return t
