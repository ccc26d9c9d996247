#!/usr/bin/env python3
"""Standalone runner for an edgepack bundle. Needs only numpy and the bundle's runtime.

    python run.py --input x.npz --output y.npz
    python run.py --selftest
    python run.py --benchmark [--json out.json]
"""
from __future__ import annotations

import math


def summarize(times_ms: list[float], batch: int = 1) -> dict:
    """Latency statistics of per-iteration times (ms): percentiles, spread, a 95% CI for p50."""
    xs = sorted(float(t) for t in times_ms)
    n = len(xs)
    if n == 0:
        raise ValueError("no timings")

    def pct(q: float) -> float:
        pos = (n - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    # Distribution-free CI of the median: order statistics at n/2 -+ 1.96*sqrt(n)/2.
    half = 1.96 * math.sqrt(n) / 2
    lo_i, hi_i = max(0, int(math.floor(n / 2 - half))), min(n - 1, int(math.ceil(n / 2 + half)))
    return {
        "iterations": n,
        "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
        "mean": mean, "std": std, "min": xs[0], "max": xs[-1],
        "p50_ci95": [xs[lo_i], xs[hi_i]],
        "cv": std / mean if mean > 0 else 0.0,
        "throughput": batch * 1000.0 / mean if mean > 0 else 0.0,
    }
