"""Latency measurement: warm-up, then candidates timed interleaved in short blocks (A×10 B×10 A×10 ...)
so that drift in the host (thermal, frequency, other load) hits every candidate alike. Statistics come from
runner.run.summarize, the same code the bundle's runner uses.

Blocks, not single runs: each runtime keeps its idle threads spinning for a moment after a run (ONNX
Runtime's default, as users run it); alternating every run let that spinning steal the next runtime's
cores. Each block starts with untimed settle runs for the same reason.
"""
from __future__ import annotations

import gc
import logging
import statistics
import time
from typing import Any, Callable

from .errors import DataError
from .runner.run import summarize
from .types import BenchResult

log = logging.getLogger(__name__)
BLOCK = 10  # timed runs per turn
SETTLE = 2  # untimed runs at the start of each turn


def _iterations(est_ms: float, settings) -> int:
    """As many runs as fit the per-candidate time budget, clamped to [min_iterations, max_iterations]."""
    fit = int(settings.time_budget_s * 1000.0 / max(est_ms, 1e-3))
    return max(settings.min_iterations, min(settings.max_iterations, fit))


def _time_ms(session, feeds) -> float:
    t0 = time.perf_counter_ns()
    session.run(feeds)
    return (time.perf_counter_ns() - t0) / 1e6


def measure(sessions: dict[str, Any], feeds: dict[str, Any], settings, *, batch: int) -> dict[str, BenchResult]:
    """Time every session on the same feeds; returns {name: BenchResult}.

    Each session is warmed up (settings.warmup runs, at least one so the first run is not timed), its
    iteration count is set from the warm-up times and settings.time_budget_s, then runs are interleaved
    round-robin until every session has its count. first_ms, load_ms and memory come from the session
    (see edgepack.runtimes: memory is RSS growth over loading and the first run).
    """
    if not sessions:
        return {}
    prepared = {name: s.check(feeds) for name, s in sessions.items()}
    counts: dict[str, int] = {}
    for name, s in sessions.items():
        warm = [_time_ms(s, prepared[name]) for _ in range(max(1, settings.warmup))]
        tail = warm[len(warm) // 2:]  # the later warm-up runs are closer to steady state
        counts[name] = _iterations(statistics.median(tail), settings)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    gc_was_on = gc.isenabled()
    gc.disable()
    single = len(sessions) == 1
    try:
        while any(len(times[n]) < counts[n] for n in sessions):
            for name, s in sessions.items():
                left = counts[name] - len(times[name])
                if left <= 0:
                    continue
                for _ in range(0 if single else SETTLE):
                    s.run(prepared[name])
                for _ in range(left if single else min(BLOCK, left)):
                    times[name].append(_time_ms(s, prepared[name]))
    finally:
        if gc_was_on:
            gc.enable()
    results = {}
    for name, s in sessions.items():
        st = summarize(times[name], batch)
        results[name] = BenchResult(
            runtime=s.runtime, device=s.device_used, batch=batch, threads=s.threads,
            warmup=max(1, settings.warmup), iterations=st["iterations"],
            p50=st["p50"], p90=st["p90"], p99=st["p99"], mean=st["mean"], std=st["std"],
            min=st["min"], max=st["max"], p50_ci95=tuple(st["p50_ci95"]), throughput=st["throughput"],
            load_ms=s.load_ms, first_ms=s.first_ms if s.first_ms is not None else times[name][0],
            peak_memory_mb=getattr(s, "memory_mb", 0.0), cv=st["cv"], samples_ms=tuple(times[name]),
        )
        log.debug("%s: p50 %.3f ms over %d runs", name, st["p50"], st["iterations"])
    return results


def batch_sweep(session, feeds_fn: Callable[[int], dict], batches, settings, *, name: str | None = None) -> list[dict]:
    """p50 and throughput of one session at several batch sizes; feeds_fn(b) makes feeds of batch b.

    A model with a fixed batch dim is only measured at that batch (others are skipped and logged).
    Returns [{"candidate"?, "batch", "p50", "p90", "mean", "throughput"}].
    """
    rows = []
    fixed = session.fixed_batch
    for b in batches:
        if fixed is not None and b != fixed:
            log.info("batch %d skipped: the model's batch is fixed to %d", b, fixed)
            continue
        try:
            r = measure({"s": session}, feeds_fn(b), settings, batch=b)["s"]
        except DataError as e:
            log.info("batch %d skipped: %s", b, e)
            continue
        row = {"batch": b, "p50": r.p50, "p90": r.p90, "mean": r.mean, "throughput": r.throughput}
        rows.append({"candidate": name, **row} if name else row)
    return rows
