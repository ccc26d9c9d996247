"""Accuracy guard for int8 (static, and dynamic): keep the Conv/MatMul/Gemm nodes that lose most in float until within budget.

Nodes are ranked in one pass: the fully quantized model and the float model run side by side on a few
calibration samples with every intermediate tensor as an output (onnxruntime.quantization.qdq_loss_debug).
The signal-to-quantization-noise ratio (dB, float model vs quantized model) of each node's input minus that
of its output is what the node loses. Then the k worst are kept float for k = 1, 2, 4, ... until the
caller's own metric is within budget, and a bisection finds the smallest such k: about 2·log2(n) quantize
+ evaluate trials, not one per node.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgepack.errors import StepError, first_line
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.steps.quantize import (
    CalibReader,
    QuantizeDynamicConfig,
    dynamic_input,
    dynamic_quantize,
    front_end,
    kept_notes,
    quantizer_cwd,
    record,
    remove_model,
    start_static,
    static_quantize,
)
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)
NOISE_SAMPLES = 4  # calibration samples the ranking runs on


def guard_quantize(artifact: Artifact, ctx: Context, evaluate: Callable[[Path], float], reference_score: float,
                   max_drop: float, max_excluded: int | None = None,
                   max_seconds: float = 120.0) -> tuple[Artifact, StepRecord]:
    """Static int8 that stays within ``max_drop`` of ``reference_score`` (higher scores are better).

    ``evaluate(model_path)`` scores a quantized model. At most ``max_excluded`` nodes (default: a quarter of
    them, at least 8) stay float; the search stops after ``max_seconds`` with the best model found. Never
    raises for a missed budget: the summary says the budget was not met.
    """
    t0 = time.perf_counter()
    src, d, pre, notes, pre_model = start_static(artifact, ctx)
    cache = d / "calibration.json"
    reader = CalibReader(ctx.calib, pre_model, ctx.target.quantization.calibration_samples)
    front = set(front_end(pre_model))  # float in every trial already
    nodes = [n.name for n in pre_model.graph.node if n.op_type in onnxutil.QUANTIZABLE and n.name not in front]

    def quantize(exclude: list[str], path: Path) -> None:
        static_quantize(pre, path, ctx, cache=cache, reader=reader, exclude=exclude)

    found = _search(nodes, quantize, evaluate, lambda path: rank_by_noise(pre, path, pre_model, ctx, notes),
                    reference_score, max_drop, max_excluded, t0 + max_seconds, d / "trials", ctx, notes)
    out = d / "model.onnx"
    after = followers(pre_model, found.excluded) if found.within else []  # int8 starts once, at the next node
    kept = static_quantize(pre, out, ctx, cache=cache, reader=reader, exclude=[*found.excluded, *after])
    if after and found.reference_score - evaluate(out) > max_drop:  # the wider float set misses: the guard's own
        kept = static_quantize(pre, out, ctx, cache=cache, reader=reader, exclude=found.excluded)
    elif after:
        notes.append(f"{len(after)} op(s) after the float nodes stay float too, up to the next quantized one: "
                     + ", ".join(after[:8]) + (" ..." if len(after) > 8 else ""))
    notes += kept_notes(kept, pre_model)
    remove_model(pre)
    return _finish("quantize-static", found, artifact, out, src, t0, notes)


PASS_THROUGH = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "MaxPool",
                "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Transpose", "Reshape", "Flatten", "Squeeze",
                "Unsqueeze")


def followers(model, kept: list[str]) -> list[str]:
    """The single-input ops (activations, pooling, reshapes) downstream of the nodes kept float, up to the
    next node of another kind. Quantized, they would switch the graph to int8 before the next quantized node,
    and ORT runs some of them slower in int8 than in float there (aecmos: a uint8 MaxPool in NCHW after a
    float Conv took 7 of 14 ms; in float it is folded into the Conv's blocked layout)."""
    readers = _readers(model)
    by_name = {n.name: n for n in model.graph.node}
    out: list[str] = []
    todo = [t for k in kept if k in by_name for t in by_name[k].output]
    while todo:
        for n in readers.get(todo.pop(), []):
            if n.op_type in PASS_THROUGH and n.name and n.name not in out and n.name not in kept:
                out.append(n.name)
                todo += list(n.output)
    return out


def guard_dynamic(artifact: Artifact, ctx: Context, evaluate: Callable[[Path], float], reference_score: float,
                  max_drop: float, op_types, max_excluded: int | None = None,
                  max_seconds: float = 120.0) -> tuple[Artifact, StepRecord]:
    """Dynamic int8 that stays within budget the same way: the MatMul/Gemm nodes that lose most stay float.
    The ranking runs the float and the dynamic int8 model side by side; their tensors keep the same names."""
    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "quantize-dynamic")
    src = onnxutil.load(artifact.path)
    d = ctx.step_dir("quantize-dynamic")
    inp, front, notes = dynamic_input(artifact, d)
    model = onnxutil.load(inp, with_data=False)
    kept = set(front)
    nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in kept]
    quant_notes: list[str] = []

    def quantize(exclude: list[str], path: Path) -> None:
        quant_notes[:] = dynamic_quantize(inp, path, ctx, op_types, src, exclude=[*front, *exclude])

    def rank(path: Path) -> dict[str, float]:
        return rank_by_noise(inp, path, model, ctx, notes, same_names=True)

    found = _search(nodes, quantize, evaluate, rank, reference_score, max_drop, max_excluded, t0 + max_seconds,
                    d / "trials", ctx, notes)
    out = d / "model.onnx"
    quantize(found.excluded, out)
    remove_model(inp)
    return _finish("quantize-dynamic", found, artifact, out, src, t0, quant_notes + notes)


@dataclass
class _Found:
    excluded: list[str]
    tried: dict[int, float]
    noise: dict[str, float]
    reference_score: float
    max_drop: float
    max_excluded: int

    @property
    def score(self) -> float:
        return self.tried[len(self.excluded)]

    @property
    def within(self) -> bool:
        return self.reference_score - self.score <= self.max_drop


def _search(nodes: list[str], quantize: Callable[[list[str], Path], None], evaluate: Callable[[Path], float],
            rank: Callable[[Path], dict[str, float]], reference_score: float, max_drop: float,
            max_excluded: int | None, deadline: float, trials: Path, ctx: Context, notes: list[str]) -> _Found:
    """The fewest of ``nodes`` to keep float: rank them by the noise they add in the fully quantized model, then
    k = 1, 2, 4, ... of the worst until within budget, and a bisection for the smallest such k."""
    trials.mkdir(exist_ok=True)
    tried: dict[int, float] = {}
    noise: dict[str, float] = {}  # dB each node loses; the largest loss first
    ranked: list[str] = []
    max_excluded = min(len(nodes), max(8, len(nodes) // 4) if max_excluded is None else max_excluded)

    def within(s: float) -> bool:
        return reference_score - s <= max_drop

    def score(k: int) -> float:
        if k not in tried:
            path = trials / f"exclude-{k}.onnx"
            quantize(ranked[:k], path)
            tried[k] = float(evaluate(path))
            ctx.progress(f"int8 with {k} node(s) float: score {tried[k]:.4f}", None)
            if k == 0 and not within(tried[0]):
                noise.update(rank(path))
            remove_model(path)
        return tried[k]

    best_k = 0
    if not within(score(0)) and max_excluded > 0:
        order = {n: i for i, n in enumerate(nodes)}  # without a ranking: the output side first
        ranked = sorted(nodes, key=lambda n: (-noise.get(n, -np.inf), -order[n]))
        lo, hi, k = 0, None, 1
        while hi is None and time.perf_counter() < deadline:  # k = 1, 2, 4, ... until within budget
            if within(score(k)):
                hi = k
            elif k >= max_excluded:
                break
            else:
                lo, k = k, min(2 * k, max_excluded)
        while hi is not None and hi - lo > 1 and time.perf_counter() < deadline:  # the smallest k that holds
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if within(score(mid)) else (mid, hi)
        if time.perf_counter() >= deadline:
            notes.append(f"search stopped at its time limit ({len(tried)} trials)")
        passing = [k for k in tried if within(tried[k])]
        best_k = min(passing) if passing else max(tried, key=lambda k: tried[k])
    shutil.rmtree(trials, ignore_errors=True)
    return _Found(ranked[:best_k], tried, noise, reference_score, max_drop, max_excluded)


def _finish(kind: str, found: _Found, artifact: Artifact, out: Path, src, t0: float,
            notes: list[str]) -> tuple[Artifact, StepRecord]:
    extra = {"excluded": found.excluded, "scores": [found.tried[k] for k in sorted(found.tried)],
             "trials": {str(k): v for k, v in sorted(found.tried.items())}, "reference_score": found.reference_score,
             "score": found.score, "max_drop": found.max_drop, "within_budget": found.within,
             "noise_db": {n: round(v, 2) for n, v in sorted(found.noise.items(), key=lambda kv: -kv[1])},
             "notes": notes}
    new_art, rec = record(kind, {"max_drop": found.max_drop, "max_excluded": found.max_excluded}, artifact, out, src,
                          t0, extra)
    drop = found.reference_score - found.score
    if found.within:
        tail = (f"; kept {len(found.excluded)} node(s) float to stay within budget: {', '.join(found.excluded)}"
                if found.excluded else "")
        summary = f"{rec.summary}; score drop {drop:.4f} <= {found.max_drop}{tail}"
    else:
        summary = (f"{rec.summary}; budget NOT met: best score drop {drop:.4f} > {found.max_drop} "
                   f"with {len(found.excluded)} of at most {found.max_excluded} nodes kept float")
    return new_art, replace(rec, summary=summary, seconds=time.perf_counter() - t0)


def rank_by_noise(pre: Path, qdq: Path, pre_model, ctx: Context, notes: list[str],
                  same_names: bool = False) -> dict[str, float]:
    """{node: dB of signal-to-quantization-noise ratio the node loses}, from ``NOISE_SAMPLES`` calibration samples
    run through the float and the fully quantized model: SQNR (float vs quantized model) of the node's input
    activation minus that of its output. Higher loses more. Empty (with a note) when the debug models cannot run."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    try:
        sqnr = _tensor_sqnr(pre, qdq, pre_model, ctx, dbg, same_names)
    except Exception as e:  # a graph the debug tools cannot augment: rank by position instead
        log.info("ranking nodes by quantization noise failed: %s", first_line(e))
        notes.append(f"nodes ranked by position (output side first): the noise ranking failed ({first_line(e)})")
        return {}
    readers = _readers(pre_model)
    out = {}
    for n in pre_model.graph.node:
        after = _next_measured(n.output[0], readers, sqnr) if n.op_type in onnxutil.QUANTIZABLE and n.output else None
        if after is not None:
            before = sqnr.get(n.input[0], _CAP) if n.input else _CAP
            out[n.name] = min(before, _CAP) - min(after, _CAP)
    return out


def _readers(model) -> dict[str, list]:
    """{tensor: the nodes that read it}."""
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    return readers


def _next_measured(t: str, readers: dict[str, list], sqnr: dict[str, float], hops: int = 4) -> float | None:
    """SQNR of ``t``, or of the first measured tensor after it through a chain of single float ops (Relu, Clip,
    BatchNormalization...: the quantizer puts QDQ after them, not between)."""
    for _ in range(hops):
        if t in sqnr:
            return sqnr[t]
        nxt = readers.get(t, [])
        if len(nxt) != 1 or nxt[0].op_type in onnxutil.QUANTIZABLE or len(nxt[0].output) != 1:
            return None
        t = nxt[0].output[0]
    return sqnr.get(t)


_CAP = 120.0  # dB: a tensor quantization leaves exact (a constant) counts as this clean


def _tensor_sqnr(pre: Path, qdq: Path, pre_model, ctx: Context, dbg, same_names: bool = False) -> dict[str, float]:
    """Mean SQNR (dB) of each quantized activation, float model vs quantized model (ORT's debug helpers).
    ``same_names``: match the tensors by name (dynamic int8 has no QDQ pairs to match)."""
    folder = qdq.parent
    feeds = CalibReader(ctx.calib or ctx.scoring_data, pre_model, NOISE_SAMPLES).feeds
    acts = []
    try:
        for path, name in ((qdq, "qdq-debug.onnx"), (pre, "float-debug.onnx")):
            aug = folder / name
            with quantizer_cwd(folder):
                dbg.modify_model_output_intermediate_tensors(
                    str(path), str(aug), save_as_external_data=path.with_name(path.name + ".data").exists())
            acts.append(dbg.collect_activations(str(aug), feeds))
    finally:
        for name in ("float-debug.onnx", "qdq-debug.onnx"):
            remove_model(folder / name)
    if same_names:
        quant, fp = acts
        return {t: float(dbg.compute_signal_to_quantization_noice_ratio(fp[t], quant[t])) for t in quant.keys() & fp}
    errors = dbg.compute_activation_error(dbg.create_activation_matching(*acts))
    return {t: float(e["xmodel_err"]) for t, e in errors.items() if "xmodel_err" in e}


class GuardConfig(StepConfig):
    max_excluded: int | None = None  # at most this many Conv/MatMul/Gemm nodes kept in float (None: a quarter)
    max_seconds: float = 120.0  # time for the search (the best model found so far after that)


@register("quantize-guarded", GuardConfig, needs=("calib",))
def quantize_guarded(artifact: Artifact, cfg: GuardConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Static int8 that keeps the most sensitive layers in float until the accuracy budget holds."""
    if ctx.evaluate is None:
        raise StepError("quantize-guarded runs inside pack, which scores each trial against the fp32 reference",
                        hint="use quantize-static in a recipe of your own")
    return guard_quantize(artifact, ctx, ctx.evaluate, ctx.reference_score, ctx.max_drop, cfg.max_excluded,
                          cfg.max_seconds)


class DynamicGuardConfig(GuardConfig):
    op_types: list[str] = QuantizeDynamicConfig().op_types


@register("quantize-dynamic-guarded", DynamicGuardConfig)
def quantize_dynamic_guarded(artifact: Artifact, cfg: DynamicGuardConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Dynamic int8 that keeps the most sensitive MatMul/Gemm nodes in float until the accuracy budget holds."""
    if ctx.evaluate is None:
        raise StepError("quantize-dynamic-guarded runs inside pack, which scores each trial against the fp32 "
                        "reference", hint="use quantize-dynamic in a recipe of your own")
    return guard_dynamic(artifact, ctx, ctx.evaluate, ctx.reference_score, ctx.max_drop, cfg.op_types,
                         cfg.max_excluded, cfg.max_seconds)


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
                    "noise_db": d.get("noise_db", {}), "p50_ms": p50, "int8_p50_ms": base,
                    "latency_cost_ms": None if p50 is None or base is None else round(p50 - base, 6),
                    "latency_ratio": None if p50 is None or not base else round(p50 / base, 4),
                    "accuracy": c.fidelity.accuracy if c.fidelity else None,
                    "int8_accuracy": plain.fidelity.accuracy if plain.fidelity else None})
    return out
