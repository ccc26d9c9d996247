"""The leaderboard: batch.json and a self-contained batch.html (inline CSS, no scripts, no external files)."""
from __future__ import annotations

import datetime as dt
from html import escape
from pathlib import Path
from typing import Any

from .store import write_json

SCHEMA_VERSION = 1
SUCCESS = ("ok", "skipped")


def batch_doc(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    good = sum(counts.get(s, 0) for s in SUCCESS)
    status = ("interrupted" if meta.get("interrupted") else "ok" if good == len(rows)
              else "failed" if good == 0 else "partial")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "edgepack-batch",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **{k: v for k, v in meta.items() if k != "interrupted"},
        "status": status,
        "counts": counts,
        "retries": sum(r.get("retries") or 0 for r in rows),
        "models": list(dict.fromkeys(r["model"] for r in rows)),
        "targets": list(dict.fromkeys(r["target"] for r in rows)),
        "jobs": rows,
    }


def write_board(out: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    write_json(out / "batch.json", doc)
    html = out / "batch.html"
    tmp = html.with_name(".batch.html.tmp")
    tmp.write_text(render_html(doc), encoding="utf-8")
    tmp.replace(html)
    return out / "batch.json", html


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ccc;padding:6px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cell div{white-space:nowrap} .muted{color:#777} .err{color:#a00;max-width:28em;white-space:normal}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:12px;color:#fff}
.ok{background:#2a7} .skipped{background:#38a} .failed,.crashed,.lost,.timeout,.budget{background:#c33}
.partial{background:#d80} .interrupted,.missing{background:#999} ul.warn li{color:#8a5a00}
"""


def render_html(doc: dict[str, Any]) -> str:
    rows = {(r["model"], r["target"]): r for r in doc["jobs"]}
    head = "".join(f"<th>{escape(t)}</th>" for t in doc["targets"])
    grid = ""
    for m in doc["models"]:
        cells = "".join(f"<td class='cell'>{_cell(rows.get((m, t)))}</td>" for t in doc["targets"])
        grid += f"<tr><th>{escape(m)}</th>{cells}</tr>"
    counts = ", ".join(f"{v} {k}" for k, v in doc["counts"].items())
    ex = doc.get("executor") or {}
    meta = (f"{len(doc['jobs'])} jobs ({counts}); {doc.get('wall_s', 0):.1f} s wall; executor {ex.get('kind')}, "
            f"{ex.get('jobs') or '-'} at once, {ex.get('threads_per_job')} thread(s) per job; "
            f"{doc['retries']} retried; edgepack {doc.get('edgepack_version')}; {doc['created']}")
    warn = [f"{w}" for w in doc.get("warnings", [])]
    warn += [f"{r['id']}: {w}" for r in doc["jobs"] for w in r.get("warnings") or []]
    warnings = ("<h2>Warnings</h2><ul class='warn'>" + "".join(f"<li>{escape(w)}</li>" for w in warn) + "</ul>"
                if warn else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgepack batch</title><style>{CSS}</style>"
            f"</head><body><h1>edgepack batch: <span class='badge {escape(doc['status'])}'>{escape(doc['status'])}"
            f"</span></h1><p class='muted'>{escape(meta)}</p>"
            f"<h2>Models × targets</h2><table><tr><th></th>{head}</tr>{grid}</table>"
            f"<p class='muted'>p50: batch-1 latency of the chosen candidate on the target's runtime; speed-up against "
            f"the fp32 baseline (the unchanged model on that runtime), timed interleaved in the same job.</p>"
            f"<h2>Jobs</h2>{_table(doc['jobs'])}{warnings}</body></html>\n")


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "<span class='muted'>no job</span>"
    s = r.get("summary") or {}
    chosen = f" <b>{escape(str(s['chosen']))}</b>" if s.get("chosen") else ""
    parts = [f"<div>{_badge(r['status'])}{chosen}</div>"]
    if s:
        parts.append(f"<div>{_ms(s.get('p50_ms'))}" + (f" · {s['speedup']:.2f}× vs fp32" if s.get("speedup")
                                                       else "") + "</div>")
        parts.append(f"<div>{escape(_fidelity(s))}</div><div>{_size(s.get('size_bytes'))}</div>")
    if r.get("error"):
        parts.append(f"<div class='err'>{escape(str(r['error']))}</div>")
    links = [f"<a href='{escape(r['bundle'])}/report.html'>report</a>"] if r.get("bundle") else []
    links += [f"<a href='{escape(r['log'])}'>log</a>"] if r.get("log") else []
    return "".join(parts) + f"<div class='muted'>{' · '.join(links)}</div>"


def _table(jobs: list[dict[str, Any]]) -> str:
    cols = ("job", "status", "chosen", "p50 ms", "fp32 p50 ms", "speed-up", "fidelity", "size", "seconds",
            "attempts", "host")
    out = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    for r in jobs:
        s = r.get("summary") or {}
        vals = (escape(r["id"]), _badge(r["status"]), escape(str(s.get("chosen") or "")), _num(s.get("p50_ms")),
                _num(s.get("baseline_p50_ms")), f"{s['speedup']:.2f}×" if s.get("speedup") else "",
                escape(_fidelity(s)) if s else "", _size(s.get("size_bytes")), f"{r.get('seconds') or 0:.1f}",
                str(r.get("attempts", "")), escape(str(r.get("host") or "")))
        out += "<tr>" + "".join(f"<td class='num'>{v}</td>" if i in (3, 4, 5, 8, 9) else f"<td>{v}</td>"
                                for i, v in enumerate(vals)) + "</tr>"
    return out + "</table>"


def _badge(status: str) -> str:
    return f"<span class='badge {escape(status)}'>{escape(status)}</span>"


def _fidelity(s: dict[str, Any]) -> str:
    if s.get("accuracy") is not None:
        ref = s.get("reference_accuracy")
        return f"accuracy {s['accuracy']:.4f}" + (f" (fp32 {ref:.4f})" if ref is not None else "")
    if s.get("top1_agreement") is not None:
        return f"top-1 agreement {s['top1_agreement']:.4f}, cosine {s.get('cosine') or 0:.4f}"
    return ""


def _ms(v: float | None) -> str:
    return "<span class='muted'>not measured</span>" if v is None else f"p50 {v:.4g} ms"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
