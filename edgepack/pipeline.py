"""The pack pipeline's middle: run steps, build candidates, measure them, choose one.

api.pack() calls these in order: ``run_steps`` (shared), ``build_candidates``, ``score_candidates``,
``guard_candidates``, ``time_candidates``, ``choose``.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import EdgepackError
from .host import availability
from .recipe import CandidatePlan, StepSpec
from .steps import Context, get_step, make_config
from .target import RuntimeSpec, Target
from .types import Artifact, BenchResult, CandidateResult, Fidelity, Precision, RuntimeName, StepRecord

log = logging.getLogger(__name__)
Event = Callable[..., None]


@dataclass
class Built:
    """A candidate while pack works on it (mutable; frozen into CandidateResult at the end)."""

    plan: CandidatePlan
    artifact: Artifact | None = None
    records: list[StepRecord] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # the precision's step found nothing to change: not a real candidate
    fidelity: Fidelity | None = None
    within_budget: bool | None = None
    latency: BenchResult | None = None
    latency_note: str | None = None
    kernels: dict[str, Any] | None = None
    op_profile: list[dict] = field(default_factory=list)  # per-op time on the timing session
    session: Any = None  # the timing session (kept for the chosen one's batch sweep)
    device_used: str | None = None
    outputs: list[np.ndarray] | None = None  # on the scoring data
    batch: int = 32  # batch the scoring ran at (a static model's fixed batch)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.artifact is not None


def run_steps(artifact: Artifact, steps: tuple[StepSpec, ...], ctx: Context, emit: Event) -> tuple[Artifact, list[StepRecord]]:
    records = []
    for spec in steps:
        step = get_step(spec.kind)
        cfg = make_config(spec.kind, spec.params)
        emit("step", name=spec.kind)
        t0 = time.perf_counter()
        artifact, rec = step.fn(artifact, cfg, ctx)
        if not rec.seconds:
            rec = replace(rec, seconds=time.perf_counter() - t0)
        if not rec.changed:
            log.warning("%s: %s", spec.kind, rec.summary)
        records.append(rec)
    return artifact, records


def build_candidates(base: Artifact, plans, make_ctx: Callable[[CandidatePlan], Context], emit: Event) -> list[Built]:
    built = []
    for p in plans:
        emit("candidate", name=p.name, phase="build")
        b = Built(p)
        try:
            b.artifact, b.records = run_steps(base, p.steps, make_ctx(p), emit)
        except EdgepackError as e:
            b.error = str(e)
        except Exception as e:  # a runtime/quantizer bug must not sink the other candidates
            log.debug("candidate %s failed", p.name, exc_info=True)
            b.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if b.error:
            log.warning("candidate %s failed: %s", p.name, b.error)
        elif p.precision is not Precision.FP32 and b.records and not b.records[-1].changed:
            b.skipped = f"{b.records[-1].kind}: {b.records[-1].summary}"
            log.warning("candidate %s dropped: %s", p.name, b.skipped)
        built.append(b)
    return built


def _provider(spec: RuntimeSpec) -> str:
    return spec.provider or spec.device or ""


def open_for(artifact: Artifact, spec: RuntimeSpec, threads: int, arch: str = "any"):
    """(session, measurable, note): the real provider when present, else the CPU fallback for fidelity only."""
    from .runtimes import open_session

    reason = availability(spec.runtime, _provider(spec), arch)
    if reason is not None and reason.startswith("this host is"):
        return open_session(artifact, spec, threads=threads), False, f"not measured: {reason}"
    if reason is None:
        return open_session(artifact, spec, threads=threads), True, None
    return open_session(artifact, spec, threads=threads, fallback=True), False, f"not measured: {reason}"


@dataclass(frozen=True)
class Scoring:
    """The data every candidate is judged on and the fp32 reference's answers on it."""

    data: Any  # Dataset
    reference: list[np.ndarray]
    labels: np.ndarray | None
    reference_accuracy: float | None
    max_drop: float
    min_top1: float
    min_cosine: float

    def judge(self, fid: Fidelity) -> bool:
        if self.labels is not None and fid.accuracy is not None and self.reference_accuracy is not None:
            return fid.accuracy >= self.reference_accuracy - self.max_drop - 1e-9
        top1_ok = fid.top1_agreement is None or fid.top1_agreement >= self.min_top1
        return top1_ok and fid.cosine >= self.min_cosine

    def describe(self) -> dict[str, Any]:
        if self.labels is not None:
            return {"metric": "accuracy", "max_drop": self.max_drop, "reference_accuracy": self.reference_accuracy,
                    "samples": len(self.labels)}
        return {"metric": "fidelity", "min_top1_agreement": self.min_top1, "min_cosine": self.min_cosine,
                "samples": len(self.data)}


def eval_batch(session) -> int:
    dim = session.inputs[0].shape[0] if session.inputs and session.inputs[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else 32


def score(b: Built, scoring: Scoring, threads: int, emit: Event) -> None:
    """Fidelity (and accuracy) of one candidate; latency is measured later, interleaved."""
    from .fidelity import compare, run_dataset

    if not b.ok:
        return
    emit("candidate", name=b.plan.name, phase="score")
    try:
        session, measurable, note = open_for(b.artifact, b.plan.runtime, threads, b.plan.arch)
        b.device_used = session.device_used
        b.batch = eval_batch(session)
        b.outputs = run_dataset(session, scoring.data, b.batch)
        b.fidelity = compare(scoring.reference, b.outputs, scoring.labels)
        b.within_budget = scoring.judge(b.fidelity)
        if not measurable:
            b.latency_note = note
            b.notes.append(f"fidelity checked on {session.device_used} (target provider absent)")
    except EdgepackError as e:
        b.error = str(e)
    except Exception as e:
        log.debug("scoring %s failed", b.plan.name, exc_info=True)
        b.error = f"{b.plan.runtime.runtime.value} could not run it: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"


def time_candidates(built: list[Built], feeds: dict[str, np.ndarray], target: Target, threads: int,
                    time_budget: float | None, emit: Event) -> None:
    """Open every measurable candidate and time them interleaved (noise is judged by report.py).

    Fresh sessions, not the scoring ones: load time, first-inference time and memory are measured at open.
    Candidates whose provider is absent already carry a latency_note from score().
    """
    from .bench import measure
    from .runtimes import kernel_summary

    sessions, owners = {}, {}
    for b in built:
        if not b.ok or b.latency_note:
            continue
        try:
            s, _, _ = open_for(b.artifact, b.plan.runtime, threads)
            sessions[b.plan.name], owners[b.plan.name] = s, b
        except (EdgepackError, RuntimeError) as e:
            b.error = str(e).splitlines()[0]
    if not sessions:
        return
    settings = target.bench if time_budget is None else target.bench.model_copy(update={"time_budget_s": time_budget})
    emit("measure", names=list(sessions))
    results = measure(sessions, feeds, settings, batch=_batch_of(feeds))
    for name, res in results.items():
        b = owners[name]
        b.latency, b.session = res, sessions[name]
        try:
            b.op_profile = sessions[name].op_profile(feeds, iterations=20)
            b.kernels = kernel_summary(b.op_profile)
        except Exception as e:  # profiling is a diagnostic; never fail pack for it
            log.debug("op profile of %s failed: %s", name, e)


def _batch_of(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _size(paths) -> tuple[int, int]:
    total, packed = 0, 0
    for p in paths:
        data = Path(p).read_bytes()
        total += len(data)
        packed += len(zlib.compress(data, 6))
    return total, packed


def freeze(b: Built) -> CandidateResult:
    files = b.artifact.files if b.artifact is not None and b.artifact.files else ((b.artifact.path,) if b.artifact else ())
    size, packed = _size(files) if b.ok else (0, 0)
    spec = b.plan.runtime
    status = "ok" if b.ok else ("skipped" if b.skipped else "failed")
    return CandidateResult(
        name=b.plan.name, runtime=spec.runtime.value, device=b.device_used or _provider(spec),
        precision=b.plan.precision.value, status=status, steps=tuple(b.records), error=b.error or b.skipped,
        size_bytes=size, compressed_bytes=packed, fidelity=b.fidelity, latency=b.latency,
        latency_note=b.latency_note if b.latency is None else None, kernels=b.kernels,
        within_budget=b.within_budget, notes=tuple(b.notes), files=tuple(Path(f).name for f in files),
    )


def choose(built: list[Built], target: Target, scoring: Scoring) -> tuple[Built | None, str]:
    """Fastest measured candidate within budget; without measurements, the profile's precision order."""
    ok = [b for b in built if b.ok and b.within_budget]
    base = next((b for b in built if b.ok and b.plan.precision is Precision.FP32 and b.latency), None)
    measured = [b for b in ok if b.latency is not None]
    if measured:
        fits = [b for b in measured if not over_budgets(b, target)]
        best = min(fits or measured, key=lambda b: b.latency.p50)
        why = f"fastest candidate within the accuracy budget: p50 {best.latency.p50:.4f} ms"
        if not fits:
            why = f"no candidate meets the profile's latency/memory budget ({over_budgets(best, target)}); " + why
        if base is not None and base is not best:
            why += f" vs fp32 {base.latency.p50:.4f} ms ({best.latency.p50 / base.latency.p50:.2f}x)"
        return best, why + "; " + _quality(best, scoring)
    if ok:
        order = {p: i for i, p in enumerate(target.precisions)}
        best = min(ok, key=lambda b: order.get(b.plan.precision, 99))
        note = best.latency_note or "latency not measured"
        return best, (f"{note}; chose by the profile's precision order ({', '.join(p.value for p in target.precisions)}) "
                      f"among candidates within the accuracy budget; " + _quality(best, scoring))
    ran = [b for b in built if b.ok and b.fidelity is not None]
    if ran:  # nothing met the budget: the most faithful one, flagged (pack --strict refuses it)
        best = max(ran, key=lambda b: (b.fidelity.accuracy if b.fidelity.accuracy is not None else -1,
                                       b.fidelity.cosine))
        return best, ("no candidate met the accuracy budget; chose the most accurate one: " + _quality(best, scoring))
    return None, "no candidate could be built or run"


def over_budgets(b: Built, target: Target) -> str | None:
    """Why a measured candidate breaks the profile's optional latency/memory budgets, or None."""
    lat, bud = b.latency, target.budgets
    if lat is None:
        return None
    if bud.max_latency_ms is not None and lat.p50 > bud.max_latency_ms:
        return f"p50 {lat.p50:.3f} ms > max_latency_ms {bud.max_latency_ms}"
    if bud.max_memory_mb is not None and lat.peak_memory_mb > bud.max_memory_mb:
        return f"peak memory {lat.peak_memory_mb:.1f} MB > max_memory_mb {bud.max_memory_mb}"
    return None


def _quality(b: Built, scoring: Scoring) -> str:
    f = b.fidelity
    if f is None:
        return ""
    if f.accuracy is not None and scoring.reference_accuracy is not None:
        return (f"accuracy {f.accuracy:.4f} vs fp32 {scoring.reference_accuracy:.4f} "
                f"(drop {scoring.reference_accuracy - f.accuracy:+.4f}, budget {scoring.max_drop:.4f})")
    top1 = f"top-1 agreement {f.top1_agreement:.4f}, " if f.top1_agreement is not None else ""
    return f"{top1}cosine {f.cosine:.5f} to fp32"


def needs_guard(b: Built) -> bool:
    return b.ok and b.within_budget is False and b.plan.precision is Precision.INT8


def ort_guard(b: Built, base: Artifact, scoring: Scoring, ctx: Context, threads: int) -> Built:
    """Keep the most quantization-sensitive layers in float until int8 is back within budget."""
    from .fidelity import compare, run_dataset
    from .runtimes import open_session
    from .steps.guard import guard_quantize

    cpu = RuntimeSpec(runtime=RuntimeName.ONNXRUNTIME, provider="CPUExecutionProvider")

    def evaluate(path: Path) -> float:
        s = open_session(Artifact(path=Path(path), format=base.format, files=(Path(path),)), cpu, threads=threads)
        f = compare(scoring.reference, run_dataset(s, scoring.data, eval_batch(s)), scoring.labels)
        return f.accuracy if f.accuracy is not None else (f.top1_agreement if f.top1_agreement is not None else f.cosine)

    ref = scoring.reference_accuracy if scoring.labels is not None else 1.0
    drop = scoring.max_drop if scoring.labels is not None else 1.0 - scoring.min_top1
    plan = replace(b.plan, name=b.plan.name + "-guarded")
    g = Built(plan, records=list(b.records[:-1]))
    try:
        art, rec = guard_quantize(base, ctx, evaluate, ref, drop)
        g.artifact, g.records = art, g.records + [rec]
    except EdgepackError as e:
        g.error = str(e)
    return g
