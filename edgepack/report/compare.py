"""`edgepack compare`: side-by-side latency of report.json files and profile JSONs → compare.md, compare.html."""
from __future__ import annotations

from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.report import plots
from edgepack.report.json import SCHEMA_VERSION, read_json, report_from_dict
from edgepack.report.render import NA, fmt_ms, render_html, render_markdown


def _number(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EdgepackError(f"{where}: latency.{key} is missing or not a number",
                            hint="give a report.json or the JSON of `run.py --benchmark` / `edgepack profile`")
    return float(v)


def _run_row(path: Path) -> dict:
    """One compare row from a report.json (its chosen candidate) or a profile JSON."""
    d = read_json(path)
    kind = d.get("kind") if isinstance(d, dict) else None
    if isinstance(d, dict) and "candidates" in d and kind in (None, "report"):
        r = report_from_dict(d, str(path))
        c = next((c for c in r.candidates if c.name == r.chosen), None) or \
            next((c for c in r.candidates if c.latency), None)
        if c is None:
            raise EdgepackError(f"{path}: the report has no chosen or measured candidate to compare")
        lat = c.latency.to_dict() if c.latency else None
        return {"file": path, "cpu": r.host.get("cpu", "?"), "what": c.name,
                "device": c.latency.device if c.latency else c.device, "latency": lat, "note": c.latency_note}
    if kind != "profile":
        raise EdgepackError(f"{path}: neither an edgepack report.json nor a profile JSON (kind={kind!r})",
                            hint="give files written by `edgepack pack`, `edgepack profile` or `run.py --benchmark`")
    version = d.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise EdgepackError(f"{path}: schema_version {version!r} is not supported (this edgepack reads "
                            f"{SCHEMA_VERSION})", hint="upgrade edgepack")
    lat = d.get("latency")
    if not isinstance(lat, dict):
        raise EdgepackError(f"{path}: profile has no 'latency' object", hint="run the benchmark again")
    bundle, host = d.get("bundle") or {}, d.get("host") or {}
    what = "/".join(str(bundle[k]) for k in ("name", "precision") if bundle.get(k)) or "profile"
    return {"file": path, "cpu": host.get("cpu", "?"), "what": what,
            "device": d.get("device_used") or lat.get("device", "?"), "latency": lat, "note": None}


def compare_reports(paths: list[Path], out_dir: Path) -> list[Path]:
    """Side-by-side latency of several runs → compare.md and compare.html; ratios are p50 / p50 of the first."""
    if not paths:
        raise EdgepackError("compare needs at least one report.json or profile JSON")
    runs = [_run_row(Path(p)) for p in paths]
    names = [r["file"].name for r in runs]
    for r in runs:  # same file name in two folders: say which folder
        r["label"] = (f"{r['file'].parent.name}/{r['file'].name}" if names.count(r["file"].name) > 1
                      else r["file"].name) + f" · {r['what']} · {r['cpu']} · {r['device']}"
        if r["latency"]:
            for k in ("p50", "p90", "p99", "throughput"):
                r[k] = _number(r["latency"], k, str(r["file"]))
    ref = next((r for r in runs if r["latency"]), None)
    rows = []
    for r in runs:
        if r["latency"]:
            ratio = f"{r['p50'] / ref['p50']:.2f}×" if ref["p50"] > 0 else NA
            rows.append([r["label"], fmt_ms(r["p50"]), fmt_ms(r["p90"]), fmt_ms(r["p99"]), f"{r['throughput']:.1f}", ratio])
        else:
            rows.append([r["label"], r["note"] or "not measured", NA, NA, NA, NA])
    ref_note = "" if ref is runs[0] else f" (the first run has no latency; reference: {ref['label']})" if ref else ""
    blocks = [("h", 1, "edgepack compare"),
              ("p", f"Latency in ms; ratio = p50 / p50 of the first run{ref_note} (below 1.00× is faster)."),
              ("table", ["run", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "p50 ratio"], rows, []),
              ("plots", None)]
    labels = [r["label"] for r in runs]
    bars = plots.whisker_plot("Latency per run (p50, whisker to p90)", labels,
                              [(r["p50"], r["p90"]) if r["latency"] else None for r in runs], "ms",
                              plot_id="plot-compare",
                              notes={i: r["note"] or "not measured" for i, r in enumerate(runs) if not r["latency"]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, html = out_dir / "compare.md", out_dir / "compare.html"
    md.write_text(render_markdown(blocks), encoding="utf-8")
    html.write_text(render_html(blocks, "edgepack compare", [bars]), encoding="utf-8")
    return [md, html]
