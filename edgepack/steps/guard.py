"""Accuracy guard for static int8: keep the most sensitive Conv/MatMul/Gemm nodes in float until within budget.

Sensitivity of a node = how much the score drops when that node alone is quantized (same calibration ranges,
computed once and cached). It uses the caller's own metric, so the ranking is honest; the cost is one
quantize + evaluate per candidate node. Nodes are then excluded greedily, most sensitive first.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edgepack.errors import StepError
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.steps.quantize import CalibReader, record, remove_model, start_static, static_quantize
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)


def guard_quantize(artifact: Artifact, ctx: Context, evaluate: Callable[[Path], float], reference_score: float,
                   max_drop: float, max_excluded: int | None = None,
                   max_seconds: float = 120.0) -> tuple[Artifact, StepRecord]:
    """Static int8 that stays within ``max_drop`` of ``reference_score`` (higher scores are better).

    ``evaluate(model_path)`` scores a quantized model. Nodes are ranked by sensitivity (output side first, within
    ``max_seconds``; nodes not reached in time rank last), then kept in float one by one, at most
    ``max_excluded`` (default: a quarter of them, at least 8). Never raises for a missed budget: returns the
    best model found, and the summary says the budget was not met.
    """
    t0 = time.perf_counter()
    src, d, pre, notes, pre_model = start_static(artifact, ctx)
    cache = d / "calibration.json"
    reader = CalibReader(ctx.calib, pre_model, ctx.target.quantization.calibration_samples)
    trials = d / "trials"
    trials.mkdir(exist_ok=True)

    def score(name: str, **kw) -> float:
        path = trials / f"{name}.onnx"
        static_quantize(pre, path, ctx, cache=cache, reader=reader, **kw)
        return float(evaluate(path))

    def within(s: float) -> bool:
        return reference_score - s <= max_drop

    scores = [score("all")]
    excluded: list[str] = []
    best: tuple[float, list[str]] = (scores[0], [])
    sensitivity: dict[str, float] = {}
    nodes = [n.name for n in pre_model.graph.node if n.op_type in onnxutil.QUANTIZABLE]
    max_excluded = max(8, len(nodes) // 4) if max_excluded is None else max_excluded
    if not within(scores[0]) and max_excluded > 0:
        deadline = time.perf_counter() + max_seconds
        for i, name in enumerate(reversed(nodes)):  # the output side first: its errors reach the outputs unfiltered
            if time.perf_counter() > deadline:
                notes.append(f"sensitivity of {len(nodes) - i} of {len(nodes)} nodes not measured (time budget "
                             f"{max_seconds:.0f} s); they rank last")
                break
            ctx.progress(f"sensitivity of {name}", i / max(len(nodes), 1))
            sensitivity[name] = reference_score - score(f"only-{i}", include=[name])
        ranked = sorted(nodes, key=lambda n: sensitivity.get(n, float("-inf")), reverse=True)
        for name in ranked[:max_excluded]:
            excluded.append(name)
            scores.append(score(f"exclude-{len(excluded)}", exclude=excluded))
            if scores[-1] > best[0]:
                best = (scores[-1], list(excluded))
            if within(scores[-1]):
                break
    best_score, best_excluded = best
    out = d / "model.onnx"
    static_quantize(pre, out, ctx, cache=cache, reader=reader, exclude=best_excluded)
    shutil.rmtree(trials, ignore_errors=True)
    remove_model(pre)
    extra = {"excluded": best_excluded, "scores": scores, "reference_score": reference_score,
             "score": best_score, "max_drop": max_drop, "within_budget": within(best_score),
             "sensitivity": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])), "notes": notes}
    new_art, rec = record("quantize-static", {"max_drop": max_drop, "max_excluded": max_excluded},
                          artifact, out, src, t0, extra)
    drop = reference_score - best_score
    if within(best_score):
        tail = (f"; kept {len(best_excluded)} node(s) float to stay within budget: {', '.join(best_excluded)}"
                if best_excluded else "")
        summary = f"{rec.summary}; score drop {drop:.4f} <= {max_drop}{tail}"
    else:
        summary = (f"{rec.summary}; budget NOT met: best score drop {drop:.4f} > {max_drop} "
                   f"with {len(best_excluded)} of at most {max_excluded} nodes kept float")
    return new_art, replace(rec, summary=summary, seconds=time.perf_counter() - t0)


class GuardConfig(StepConfig):
    max_excluded: int | None = None  # at most this many Conv/MatMul/Gemm nodes kept in float (None: a quarter)
    max_seconds: float = 120.0  # time for ranking nodes by sensitivity


@register("quantize-guarded", GuardConfig, needs=("calib",))
def quantize_guarded(artifact: Artifact, cfg: GuardConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Static int8 that keeps the most sensitive layers in float until the accuracy budget holds."""
    if ctx.evaluate is None:
        raise StepError("quantize-guarded runs inside pack, which scores each trial against the fp32 reference",
                        hint="use quantize-static in a recipe of your own")
    return guard_quantize(artifact, ctx, ctx.evaluate, ctx.reference_score, ctx.max_drop, cfg.max_excluded,
                          cfg.max_seconds)


def guard_costs(candidates) -> list[dict]:
    """For each ``<name>-guarded`` candidate: the nodes kept float and their latency cost against plain int8."""
    by_name = {c.name: c for c in candidates}
    out = []
    for c in candidates:
        plain = by_name.get(c.name.removesuffix("-guarded"))
        if not c.name.endswith("-guarded") or plain is None or c.status != "ok":
            continue
        d = c.steps[-1].details if c.steps else {}
        p50, base = (c.latency.p50 if c.latency else None), (plain.latency.p50 if plain.latency else None)
        out.append({"candidate": c.name, "kept_float": list(d.get("excluded", [])),
                    "sensitivity": d.get("sensitivity", {}), "p50_ms": p50, "int8_p50_ms": base,
                    "latency_cost_ms": None if p50 is None or base is None else round(p50 - base, 6),
                    "latency_ratio": None if p50 is None or not base else round(p50 / base, 4),
                    "accuracy": c.fidelity.accuracy if c.fidelity else None,
                    "int8_accuracy": plain.fidelity.accuracy if plain.fidelity else None})
    return out
