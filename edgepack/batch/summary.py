"""One leaderboard row from `edgepack pack --json`: chosen candidate, p50, speed-up, fidelity, size, warnings."""
from __future__ import annotations

from typing import Any

# Same thresholds as the pack report's noise warnings (report: NOISY_CV, NOISY_SPREAD).
NOISY_CV = 0.15
NOISY_SPREAD = 0.25


def summarize(pack: dict[str, Any]) -> dict[str, Any]:
    r = pack["report"]
    cands = {c["name"]: c for c in r.get("candidates", [])}
    ch = cands.get(pack.get("chosen")) or {}
    base = cands.get(r.get("baseline")) or {}
    lat, blat, fid = ch.get("latency") or {}, base.get("latency") or {}, ch.get("fidelity") or {}
    p50, bp50 = lat.get("p50"), blat.get("p50")
    budget = r.get("budget") or {}
    return {
        "chosen": pack.get("chosen"),
        "runtime": ch.get("runtime"),
        "device": ch.get("device"),
        "precision": ch.get("precision"),
        "p50_ms": p50,
        "p50_ci95": lat.get("p50_ci95"),
        "cv": lat.get("cv"),
        "latency_note": ch.get("latency_note"),
        "baseline": r.get("baseline"),
        "baseline_p50_ms": bp50,
        "speedup": round(bp50 / p50, 4) if p50 and bp50 else None,
        "metric": budget.get("metric"),
        "accuracy": fid.get("accuracy"),
        "reference_accuracy": budget.get("reference_accuracy"),
        "top1_agreement": fid.get("top1_agreement"),
        "cosine": fid.get("cosine"),
        "within_budget": ch.get("within_budget"),
        "size_bytes": ch.get("size_bytes"),
        "baseline_size_bytes": base.get("size_bytes"),
        "reason": pack.get("reason"),
        "threads": (r.get("host") or {}).get("threads"),
        "warnings": list(r.get("warnings") or []),
        "noise": noise_warnings(r),
        "candidates": [{"name": c["name"], "status": c.get("status"), "precision": c.get("precision"),
                        "p50_ms": (c.get("latency") or {}).get("p50"), "within_budget": c.get("within_budget")}
                       for c in r.get("candidates", [])],
    }


def noise_warnings(r: dict[str, Any]) -> list[str]:
    """Noisy latencies, and a chosen candidate whose p50 is not distinguishable from another's."""
    measured = [c for c in r.get("candidates", []) if c.get("latency") and c.get("status") == "ok"]
    out = []
    noisy = [c for c in measured if c["latency"].get("cv", 0) > NOISY_CV and _spread(c["latency"]) > NOISY_SPREAD]
    if noisy:
        worst = max(noisy, key=lambda c: _spread(c["latency"]))
        out.append(f"latency is noisy on {len(noisy)} of {len(measured)} candidates (p90 up to "
                   f"{_spread(worst['latency']):.0%} above p50 on {worst['name']})")
    chosen = next((c for c in measured if c["name"] == r.get("chosen")), None)
    if chosen and chosen["latency"].get("p50_ci95"):
        from edgepack.choice import tie_note, within_noise
        from edgepack.report.json import bench_result

        mine = bench_result(chosen["latency"], chosen["name"])
        for c in measured:
            other = bench_result(c["latency"], c["name"]) if c["latency"].get("p50_ci95") else None
            if c is not chosen and other and within_noise(mine, other):
                out.append(f"{chosen['name']} and {c['name']}: {tie_note(mine, other)}; the difference is within noise")
    return out


def _spread(lat: dict) -> float:
    p50, p90 = lat.get("p50") or 0, lat.get("p90") or 0
    return (p90 - p50) / p50 if p50 > 0 else 0.0
