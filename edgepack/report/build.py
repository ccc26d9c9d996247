"""What a pack found, as a Report: candidates, the choice, warnings derived from the numbers."""
from __future__ import annotations

from edgepack.report.render import fmt_ms
from edgepack.types import Report

NOISY_CV = 0.15  # above this coefficient of variation a latency may be noisy...
NOISY_SPREAD = 0.25  # ...when its p90 is also this far above its p50


def _spread(lat) -> float:
    return (lat.p90 - lat.p50) / lat.p50 if lat.p50 > 0 else 0.0


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
                out.append(f"{chosen.name} and {c.name}: p50 95% CIs overlap ({fmt_ms(lo)}–{fmt_ms(hi)} vs "
                           f"{fmt_ms(o_lo)}–{fmt_ms(o_hi)} ms); their latency difference is within noise")
    return out
