"""Latency measurement through the bundle runner's own timing loop (runner.run.interleave): warm-up, then
candidates interleaved in blocks with settle runs, so host drift hits every candidate alike and each
runtime's spinning threads do not land on another's time. Statistics come from runner.run.summarize.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from edgepack.errors import DataError
from edgepack.isolated import Worker
from edgepack.runner import run as runner
from edgepack.types import BenchResult

log = logging.getLogger(__name__)
BLOCK, SETTLE = runner.BLOCK, runner.SETTLE
_ROUNDS = itertools.count(1)  # timing rounds of this process: blocks pair up within one


def measure(sessions: dict[str, Any], feeds: dict[str, Any], settings, *, batch: int) -> dict[str, BenchResult]:
    """Time every session on the same feeds; returns {name: BenchResult}. A session may be an isolated.Worker
    (a candidate in its own process, given its feeds when it started).

    Each session is warmed up (settings.warmup runs), its iteration count set from the warm-up speed and
    settings.time_budget_s within [min_iterations, max_iterations], then runs are interleaved in blocks.
    The timed call is the runner's Model.run, exactly what `run.py --benchmark` times.
    """
    if not sessions:
        return {}
    units = {name: s if hasattr(s, "block") else runner.Timed(s.model, s.check(feeds)) for name, s in sessions.items()}
    t0, waited = time.perf_counter(), Worker.waited_s
    timed = runner.interleave(units, warmup=max(1, settings.warmup), time_s=settings.time_budget_s,
                              min_iterations=settings.min_iterations, max_iterations=settings.max_iterations)
    results, round_id = {}, next(_ROUNDS)
    log.debug("timing round %d took %.2f s (%.2f s planned per session; %.2f s waiting for idle workers): %s", round_id,
              time.perf_counter() - t0, settings.time_budget_s, Worker.waited_s - waited,
              ", ".join(f"{n} {len(t['times'])} runs in {len(t['blocks'])} blocks" for n, t in timed.items()))
    for name, s in sessions.items():
        times, blocks = timed[name]["times"], timed[name]["blocks"]
        st = runner.summarize(times, batch, blocks)
        results[name] = BenchResult(
            runtime=s.runtime, device=s.device_used, batch=batch, threads=s.threads,
            warmup=max(1, settings.warmup), iterations=st["iterations"],
            p50=st["p50"], p90=st["p90"], p99=st["p99"], mean=st["mean"], std=st["std"],
            min=st["min"], max=st["max"], p50_ci95=tuple(st["p50_ci95"]), throughput=st["throughput"],
            load_ms=s.load_ms, first_ms=s.first_ms if s.first_ms is not None else timed[name]["first_ms"],
            peak_memory_mb=getattr(s, "memory_mb", 0.0), cv=st["cv"], samples_ms=tuple(times),
            block_sizes=tuple(blocks), block_rounds=(round_id,) * len(blocks),
        )
        log.debug("%s: p50 %.3f ms over %d runs", name, st["p50"], st["iterations"])
    return results


def merge(a: BenchResult, b: BenchResult) -> BenchResult:
    """One result from two timings of the same session (their runs pooled; load/first/memory from the first)."""
    from dataclasses import replace

    times = tuple(a.samples_ms) + tuple(b.samples_ms)
    blocks = tuple(a.block_sizes) + tuple(b.block_sizes)
    st = runner.summarize(list(times), a.batch, list(blocks))  # (block sizes that do not add up are ignored)
    return replace(a, iterations=st["iterations"], p50=st["p50"], p90=st["p90"], p99=st["p99"], mean=st["mean"],
                   std=st["std"], min=st["min"], max=st["max"], p50_ci95=tuple(st["p50_ci95"]),
                   throughput=st["throughput"], cv=st["cv"], samples_ms=times, block_sizes=blocks,
                   block_rounds=tuple(a.block_rounds) + tuple(b.block_rounds))


def turns(r: BenchResult) -> dict[tuple[int, int], float]:
    """Each timing block's median, keyed by (round, turn): in one round the j-th blocks of the models ran side
    by side, one after another. Empty when the blocks are not known."""
    if not r.block_sizes or len(r.block_rounds) != len(r.block_sizes) or sum(r.block_sizes) != len(r.samples_ms):
        return {}
    out: dict[tuple[int, int], float] = {}
    start, seen = 0, dict[int, int]()  # seen: the last turn of each round
    for size, rnd in zip(r.block_sizes, r.block_rounds):
        part = sorted(r.samples_ms[start:start + size])
        start += size
        turn = seen[rnd] = seen.get(rnd, -1) + 1
        out[(rnd, turn)] = part[len(part) // 2]
    return out


def paired(a: BenchResult, b: BenchResult) -> tuple[float, float, int] | None:
    """A's p50 over B's from their blocks timed side by side, so that host drift cancels out: the 95% CI of
    the median ratio (below six pairs: the range of the ratios) and the pair count; None without pairs."""
    rs = ratios(a, b)
    if not rs:
        return None
    lo, hi = runner.median_ci(rs) if len(rs) >= 6 else (rs[0], rs[-1])
    return lo, hi, len(rs)


def paired_median(a: BenchResult, b: BenchResult) -> float | None:
    """The median of A's over B's block medians timed side by side; None without pairs."""
    rs = ratios(a, b)
    return rs[len(rs) // 2] if rs else None


def ratios(a: BenchResult, b: BenchResult) -> list[float]:
    """A's over B's block medians, turn by turn where they were timed side by side, sorted."""
    ta, tb = turns(a), turns(b)
    return sorted(ta[k] / tb[k] for k in ta.keys() & tb.keys() if tb[k] > 0)


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
