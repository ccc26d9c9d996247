"""Every pack stage in order: reference → shared steps → candidates → score → guard → time → choose → report.

``run(source, plan, calib=..., eval=..., train=..., work=..., emit=...)`` is the whole middle of
`edgepack pack`; api.pack loads the model and data before it and writes the bundle after it. Each
stage's wall time is recorded (report.json `extra.stages`, shown with -v).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError, ModelError, first_line
from edgepack.recipe import ORIGINAL, CandidatePlan, Plan, StepSpec
from edgepack.steps import Context, get_step, make_config
from edgepack.target import RuntimeSpec, Target
from edgepack.types import (
    SCHEMA_VERSION,
    Artifact,
    BenchResult,
    CandidateResult,
    Fidelity,
    ModelFormat,
    Precision,
    Report,
    StepRecord,
)

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
    settings: dict[str, Any] = field(default_factory=dict)  # the runner settings it is timed and shipped with
    outputs: list[np.ndarray] | None = None  # on the scoring data
    batch: int = 32  # batch the scoring ran at (a static model's fixed batch)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.artifact is not None


@dataclass(frozen=True)
class Scoring:
    """The data every candidate is judged on, the reference's answers on it, and how each output is judged."""

    data: Any  # Dataset
    reference: list[np.ndarray]
    labels: np.ndarray | None
    reference_accuracy: float | None
    max_drop: float
    thresholds: Any  # target.FidelityThresholds
    names: list[str] = field(default_factory=list)  # output names
    kinds: list[str] = field(default_factory=list)  # metric kind per output (fidelity.KINDS)
    axes: list[int | None] = field(default_factory=list)  # batch axis per output
    metric_fn: Callable[[dict, dict], float] | None = None  # the user's own score (--metric-fn)
    reference_metric: float | None = None  # metric_fn on the reference outputs

    @property
    def min_top1(self) -> float:
        return self.thresholds.min_top1_agreement

    @property
    def min_cosine(self) -> float:
        return self.thresholds.min_cosine

    def compare(self, outputs: list[np.ndarray]) -> Fidelity:
        from edgepack.fidelity import compare

        fid = compare(self.reference, outputs, self.labels, names=self.names, kinds=self.kinds, axes=self.axes,
                      thresholds=self.thresholds)
        if self.metric_fn is not None:
            value = _call_metric(self.metric_fn, self.data, self.names, outputs)
            row = {"output": "*", "kind": "user", "metric": "--metric-fn", "value": value,
                   "threshold": self.reference_metric - self.max_drop,
                   "passed": value >= self.reference_metric - self.max_drop - 1e-12}
            fid = replace(fid, outputs=fid.outputs + (row,))
        return fid

    def judge(self, fid: Fidelity) -> bool:
        if self.labels is not None and fid.accuracy is not None and self.reference_accuracy is not None:
            return fid.accuracy >= self.reference_accuracy - self.max_drop - 1e-9
        if fid.outputs:
            return all(r["passed"] for r in fid.outputs)
        top1_ok = fid.top1_agreement is None or fid.top1_agreement >= self.min_top1
        return top1_ok and fid.cosine >= self.min_cosine

    def score(self, fid: Fidelity) -> float:
        """One number, higher is better, for the accuracy guard: accuracy with labels, else the worst output's
        value as a fraction of its pass mark (1.0 when every output passes)."""
        if self.labels is not None and fid.accuracy is not None:
            return fid.accuracy
        if not fid.outputs:
            return fid.top1_agreement if fid.top1_agreement is not None else fid.cosine
        worst = 1.0
        for r in fid.outputs:
            if r.get("value") is None or not r.get("threshold"):
                continue
            ratios = [r["value"] / r["threshold"]]
            for key, mark in (("box_iou", "min_box_iou"), ("nn_agreement", "min_nn_agreement")):
                if r.get(key) is not None:
                    ratios.append(r[key] / getattr(self.thresholds, mark))
            ratio = min(1.0, *ratios)
            worst = min(worst, ratio if r["passed"] else min(ratio, 0.999))
        return worst

    def budget(self) -> tuple[float, float]:
        """(reference score, allowed drop) in the units of score()."""
        if self.labels is not None and self.reference_accuracy is not None:
            return self.reference_accuracy, self.max_drop
        return 1.0, 1e-9

    def describe(self) -> dict[str, Any]:
        if self.labels is not None:
            return {"metric": "accuracy", "max_drop": self.max_drop, "reference_accuracy": self.reference_accuracy,
                    "samples": len(self.labels)}
        outputs = [{"output": n, "kind": k, "threshold": _mark(k, self.thresholds)} for n, k in zip(self.names, self.kinds)]
        return {"metric": "fidelity", "outputs": outputs, "samples": len(self.data),
                **({"metric_fn_reference": self.reference_metric, "max_drop": self.max_drop}
                   if self.metric_fn is not None else {})}


def _mark(kind: str, thresholds) -> float | None:
    from edgepack.fidelity import thresholds_for

    return thresholds_for(kind, thresholds) if kind not in ("ignore", "boxes") else None


def _call_metric(fn, data, names: list[str], outputs: list[np.ndarray]) -> float:
    try:
        value = float(fn(dict(data.inputs), dict(zip(names, outputs))))
    except Exception as e:  # the user's code: say so, in one line
        raise EdgepackError(f"--metric-fn raised {type(e).__name__}: {first_line(e)}") from e
    if not np.isfinite(value):
        raise EdgepackError(f"--metric-fn returned {value}; it must return a finite number (higher is better)")
    return value


def load_metric_fn(spec: str) -> Callable[[dict, dict], float]:
    """module:function, importable from the current directory (code the user named on the command line)."""
    import importlib
    import sys

    module, _, name = spec.partition(":")
    if not module or not name.isidentifier():
        raise EdgepackError(f"--metric-fn {spec!r}: expected module:function")
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as e:
        raise EdgepackError(f"--metric-fn {spec!r}: importing {module} failed: {first_line(e)}") from e
    finally:
        sys.path.pop(0)
    if not callable(fn):
        raise EdgepackError(f"--metric-fn {spec!r}: {module} has no function {name}")
    return fn


@dataclass(frozen=True)
class Outcome:
    report: Report
    chosen: Built | None
    scoring: Scoring


class Stages:
    """Wall time of each pack stage, in order."""

    def __init__(self, emit: Event):
        self.seconds: dict[str, float] = {}
        self._emit = emit

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._emit("phase", name=name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
            log.debug("stage %s: %.2f s", name, self.seconds[name])


# ---------------------------------------------------------------- the stages

def run(source: Artifact, the_plan: Plan, *, calib, eval, train, work: Path, emit: Event,
        in_specs=None, remote=None) -> Outcome:
    """Build, score, time and choose; returns the report and the chosen candidate (None when none works)."""
    tgt, recipe = the_plan.target, the_plan.recipe
    threads = recipe.threads or tgt.bench.threads or 0
    stages = Stages(emit)

    with stages.stage("reference"):
        reference = _reference(source, the_plan, work)
        scoring = _scoring(reference, the_plan, calib, eval, threads, in_specs)

    def progress(message: str, fraction: float | None = None) -> None:
        emit("progress", message=message, fraction=fraction)

    def make_ctx(name: str, runtime: RuntimeSpec | None = None, **extra) -> Context:
        return Context(workdir=work / name, target=tgt, runtime=runtime, calib=calib, eval=eval, train=train,
                       seed=recipe.seed, progress=progress, events=emit, **extra)

    with stages.stage("shared steps"):
        base, shared_records = _shared(source, reference, the_plan, make_ctx("shared"), emit)
    with stages.stage("candidates"):
        built = [_original(p, reference, the_plan) if p.original else build(base, p, make_ctx(p.name, p.runtime), emit)
                 for p in the_plan.candidates]
    with stages.stage("score"):
        for b in built:
            if not b.plan.original:
                b.records = shared_records + b.records
            score(b, scoring, threads, emit)
    if recipe.guard:
        with stages.stage("guard"):
            built += _guarded(built, base, scoring, shared_records, make_ctx, threads, emit)
    measured_on = None
    with stages.stage("time"):
        feeds = next(iter(scoring.data.batches(1)))
        if remote is not None:  # pack --on: timed on the user's devices, interleaved there
            from edgepack.devices.candidates import time_remote

            measured_on = time_remote(built, feeds, scoring.data.axes, tgt, recipe.bench_time_s or tgt.bench.time_budget_s,
                                      tgt.bench.warmup, threads, remote, work, emit)
        else:
            time_candidates(built, feeds, tgt, threads, recipe.bench_time_s, emit)
            separate(built, feeds, tgt, recipe.bench_time_s, emit)
    with stages.stage("choose"):
        chosen, reason = choose(built, tgt, scoring)
        if measured_on is not None:
            reason += f" (measured on {measured_on['device']})"
        elif chosen is not None:
            profile_ops(chosen, feeds)
        for b in built:  # only the chosen one's timing session is still needed (batch sweep)
            if b is not chosen:
                b.session = None
        warnings = _warnings(the_plan, built, chosen, reason, tgt)
        report = build_report(source, reference, the_plan, built, chosen, reason, scoring, threads, warnings)
        if chosen is not None:
            report = _add_profiles(report, chosen, feeds, recipe, tgt)
    report = replace(report, extra={**report.extra, "stages": dict(stages.seconds),
                                    **({"measured_on": measured_on} if measured_on else {})})
    return Outcome(report, chosen, scoring)


def _reference(source: Artifact, the_plan: Plan, work: Path) -> Artifact:
    """The fp32 reference: the unmodified source model as ONNX."""
    from edgepack.model.torch import export_onnx

    if source.format is ModelFormat.ONNX:
        return source
    opset = next((s.params.get("opset", 17) for s in the_plan.shared if s.kind == "export-onnx"), 17)
    return export_onnx(source, work / "reference", opset=opset)


def _scoring(reference: Artifact, the_plan: Plan, calib, eval, threads: int, in_specs=None) -> Scoring:
    """Run the reference on the scoring data (eval, else calib, else random inputs) through ONNX Runtime and
    decide how each output is judged."""
    from edgepack.data import batch_axes, dataset_from_arrays, output_axes, synthetic_inputs
    from edgepack.fidelity import compare, guess_kinds, run_dataset
    from edgepack.model.describe import io_specs
    from edgepack.runtimes import open_session, reference_spec

    tgt, recipe = the_plan.target, the_plan.recipe
    spec = reference_spec()
    try:
        session = open_session(reference, spec, threads=threads)
    except ModelError as e:
        op = _unsupported_op(str(e))
        if op is None:
            raise
        raise ModelError(f"operator {op} is not supported by {spec.runtime} ({spec.provider or spec.device}), which "
                         f"target '{tgt.name}' needs for "
                         "the fp32 reference", hint="re-export the model with standard ONNX operators") from e
    ins, outs = io_specs(reference)
    ins = in_specs or ins
    data = eval if eval is not None else calib
    if data is None:
        axes = batch_axes(ins, recipe.batch_axes)
        data = dataset_from_arrays(synthetic_inputs(ins, 64, recipe.seed, axes), None, source="random inputs",
                                   axes=axes)
    oaxes = output_axes(outs, ins)
    axes_list = [oaxes[o.name] for o in outs]
    ref_out = run_dataset(session, data, eval_batch(session, data.axes), dict(enumerate(axes_list)))
    labels = getattr(data, "labels", None)
    names = [o.name for o in outs]
    kinds = guess_kinds(names, ref_out, axes_list, reference.metadata, recipe.metrics)
    ref_fid = compare(ref_out, ref_out, labels, axes=axes_list)
    fn = load_metric_fn(recipe.metric_fn) if recipe.metric_fn else None
    ref_metric = _call_metric(fn, data, names, ref_out) if fn is not None else None
    return Scoring(data, ref_out, labels, ref_fid.accuracy, recipe.max_drop, tgt.fidelity, names, kinds, axes_list,
                   fn, ref_metric)


def _unsupported_op(message: str) -> str | None:
    """The operator named by ONNX Runtime's "not a registered function/op" / "no implementation" errors."""
    import re

    m = (re.search(r"([\w.]+:)?(\w+)\(-?\d+\) is not a registered function/op", message)
         or re.search(r"Could not find an implementation for (\w+)\(", message))
    return None if m is None else "".join(g for g in m.groups() if g)


def _shared(source: Artifact, reference: Artifact, the_plan: Plan, ctx: Context, emit: Event):
    """Steps that run once on the source (pruning, distillation, export, static shapes) before candidates."""
    steps = the_plan.shared
    if source.format is ModelFormat.TORCH and not any(s.kind not in ("export-onnx", "fix-shapes") for s in steps):
        # nothing to do in torch: start from the exported reference
        return run_steps(reference, tuple(s for s in steps if s.kind != "export-onnx"), ctx, emit)
    return run_steps(source, steps, ctx, emit)


def _original(p: CandidatePlan, reference: Artifact, the_plan: Plan) -> Built:
    b = Built(p, artifact=reference)
    b.notes.append("the model as given, run plainly: the row every other candidate is judged and timed against")
    if not p.eligible:
        b.notes.append("measured for comparison only: you asked for "
                       + ", ".join(s.kind for s in the_plan.recipe.steps) + ", so it is not shipped")
    return b


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
            log.info("%s: %s", spec.kind, rec.summary)
        records.append(rec)
    return artifact, records


def build(base: Artifact, p: CandidatePlan, ctx: Context, emit: Event) -> Built:
    """Run one candidate's steps; a failure is recorded on the candidate and never sinks the others."""
    emit("candidate", name=p.name, phase="build")
    b = Built(p)
    try:
        b.artifact, b.records = run_steps(base, p.steps, ctx, emit)
    except EdgepackError as e:
        b.error = str(e)
    except Exception as e:  # a runtime/quantizer bug must not sink the other candidates
        log.debug("candidate %s failed", p.name, exc_info=True)
        b.error = f"{type(e).__name__}: {first_line(e)}"
    if b.error:
        log.info("candidate %s failed: %s", p.name, b.error)
    elif p.precision is not Precision.FP32 and b.records and not b.records[-1].changed:
        b.skipped = f"{b.records[-1].kind}: {b.records[-1].summary}"
        log.info("candidate %s dropped: %s", p.name, b.skipped)
    return b


def open_for(artifact: Artifact, spec: RuntimeSpec, threads: int, arch: str = "any"):
    """(session, measurable, note): the real provider when present, else the CPU fallback for fidelity only."""
    from edgepack.runtimes import availability, open_session

    reason = availability(spec, arch)
    if reason is None:
        return open_session(artifact, spec, threads=threads), True, None
    if reason.startswith("this host is"):  # another CPU: fidelity here (on the fallback if the provider is absent)
        return open_session(artifact, spec, threads=threads, fallback=True), False, f"not measured: {reason}"
    return open_session(artifact, spec, threads=threads, fallback=True), False, f"not measured: {reason}"


def eval_batch(session, axes: dict | None = None) -> int:
    from edgepack.fidelity import fixed_batch

    return fixed_batch(session.inputs, axes or {}) or 32


def score(b: Built, scoring: Scoring, threads: int, emit: Event) -> None:
    """Fidelity (and accuracy) of one candidate; latency is measured later, interleaved."""
    from edgepack.fidelity import run_dataset

    if not b.ok:
        return
    emit("candidate", name=b.plan.name, phase="score")
    try:
        session, measurable, note = open_for(b.artifact, b.plan.runtime, threads, b.plan.arch)
        b.device_used = session.device_used
        b.batch = eval_batch(session, scoring.data.axes)
        b.outputs = run_dataset(session, scoring.data, b.batch, dict(enumerate(scoring.axes)))
        b.fidelity = scoring.compare(b.outputs)
        b.within_budget = scoring.judge(b.fidelity)
        if not measurable:
            b.latency_note = note
            b.notes.append(f"fidelity checked on {session.device_used} (target provider absent)")
        else:
            b.session = session  # timed later: its load time, first run and memory were measured here
    except EdgepackError as e:
        b.error = str(e)
    except Exception as e:
        log.debug("scoring %s failed", b.plan.name, exc_info=True)
        b.error = f"{b.plan.runtime.runtime} could not run it: {first_line(e)}"


def needs_guard(b: Built) -> bool:
    return b.ok and b.within_budget is False and b.plan.precision is Precision.INT8


def _guarded(built: list[Built], base: Artifact, scoring: Scoring, shared_records, make_ctx, threads: int,
             emit: Event) -> list[Built]:
    """For each int8 candidate outside the budget, the runtime's guard steps (layers kept in float)."""
    from edgepack.fidelity import run_dataset
    from edgepack.runtimes import get_backend, open_session, reference_spec

    def evaluate(path: Path) -> float:
        art = Artifact(path=Path(path), format=base.format, files=(Path(path),))
        s = open_session(art, reference_spec(), threads=threads)
        return scoring.score(scoring.compare(run_dataset(s, scoring.data, eval_batch(s, scoring.data.axes), dict(enumerate(scoring.axes)))))

    ref, drop = scoring.budget()
    out = []
    for b in built:
        steps = get_backend(b.plan.runtime.runtime).guard_steps(b.plan.runtime) if needs_guard(b) else None
        if not steps:
            continue
        plan = replace(b.plan, name=b.plan.name + "-guarded", steps=steps)
        ctx = make_ctx(plan.name, plan.runtime, evaluate=evaluate, reference_score=ref, max_drop=drop,
                       score_outputs=lambda outs: scoring.score(scoring.compare(outs)), scoring_data=scoring.data,
                       output_axes=tuple(scoring.axes))
        g = build(base, plan, ctx, emit)
        g.records = shared_records + g.records
        score(g, scoring, threads, emit)
        out.append(g)
    return out


def time_candidates(built: list[Built], feeds: dict[str, np.ndarray], target: Target, threads: int,
                    time_budget: float | None, emit: Event) -> None:
    """Time every measurable candidate interleaved, on the session scoring opened with its runner settings
    (load time, first inference and memory were measured there). Candidates whose provider is absent already
    carry a latency_note from score().
    """
    from edgepack.bench import measure
    from edgepack.runtimes import get_backend

    sessions, owners = {}, {}
    for b in built:
        if not b.ok:
            continue
        b.settings = get_backend(b.plan.runtime.runtime).settings(b.plan.runtime, threads)
        if b.latency_note:
            continue
        try:
            s = b.session or open_for(b.artifact, b.plan.runtime, threads)[0]
            sessions[b.plan.name], owners[b.plan.name] = s, b
        except (EdgepackError, RuntimeError) as e:
            b.error = str(e).splitlines()[0]
    if not sessions:
        return
    budget = target.bench.time_budget_s if time_budget is None else time_budget
    # a first short round for everyone; separate() then spends the budget on the candidates still in the race
    settings = target.bench.model_copy(update={"time_budget_s": min(FIRST_ROUND_S, budget)})
    emit("measure", names=list(sessions))
    results = measure(sessions, feeds, settings, batch=1)
    for name, res in results.items():
        b = owners[name]
        b.latency, b.session = res, sessions[name]


def profile_ops(b: Built, feeds) -> None:
    """The operator profile of one timed candidate (the chosen one: the report draws only its ops)."""
    from edgepack.runtimes import PROFILE_RUNS, kernel_summary

    if b.session is None or b.latency is None:
        return
    try:
        runs = max(5, min(PROFILE_RUNS, int(500.0 / max(b.latency.p50, 0.01))))  # about half a second
        b.op_profile = b.session.op_profile(feeds, iterations=runs)
        b.kernels = kernel_summary(b.op_profile)
    except Exception as e:  # profiling is a diagnostic; never fail pack for it
        log.debug("op profile of %s failed: %s", b.plan.name, e)


# ---------------------------------------------------------------- the choice

_SIMPLE = {Precision.FP32: 0, Precision.FP16: 1, Precision.INT8_DYNAMIC: 2, Precision.INT8: 3, Precision.INT4: 3}


def simplicity(b: Built, target: Target) -> tuple:
    """Lower is simpler: the original, then the target's first runtime, then fp32 over quantized, unguarded."""
    runtimes = [r.runtime for r in target.runtimes]
    rt = runtimes.index(b.plan.runtime.runtime) if b.plan.runtime.runtime in runtimes else len(runtimes)
    return (0 if b.plan.original else 1, rt, _SIMPLE.get(b.plan.precision, 4), b.plan.name.endswith("-guarded"))


def _overlap(a: BenchResult, b: BenchResult) -> bool:
    return a.p50_ci95[0] <= b.p50_ci95[1] and b.p50_ci95[0] <= a.p50_ci95[1]


FIRST_ROUND_S = 0.3  # seconds per candidate in the first timing round


def separate(built: list[Built], feeds, target: Target, time_budget: float | None, emit: Event, rounds: int = 3) -> None:
    """Time the fastest candidate and those whose p50 95% CI overlaps it again, until the CIs separate or the
    time budget (per candidate, over `rounds` rounds) is spent; the new runs join the old ones."""
    from edgepack.bench import measure, merge

    budget = target.bench.time_budget_s if time_budget is None else time_budget
    settings = target.bench.model_copy(update={"time_budget_s": budget / rounds})
    for _ in range(rounds):
        timed = [b for b in built if b.ok and b.within_budget and b.latency is not None and b.session is not None]
        if len(timed) < 2:
            return
        best = min(timed, key=lambda b: b.latency.p50)
        close = [b for b in timed if b is not best and _overlap(b.latency, best.latency)]
        if not close:
            return
        group = [best, *close]
        emit("measure", names=[b.plan.name for b in group])
        again = measure({b.plan.name: b.session for b in group}, feeds, settings, batch=1)
        for b in group:
            b.latency = merge(b.latency, again[b.plan.name])


def choose(built: list[Built], target: Target, scoring: Scoring) -> tuple[Built | None, str]:
    """Fastest measured candidate within budget; a candidate whose p50 CI overlaps the fastest's is a tie and the
    simplest of the tied wins (the original first). Without measurements, the profile's precision order."""
    ok = [b for b in built if b.ok and b.within_budget and b.plan.eligible]
    base = next((b for b in built if b.ok and b.plan.original and b.latency), None)
    measured = [b for b in ok if b.latency is not None]
    if measured:
        fits = [b for b in measured if not over_budgets(b, target)]
        pool = fits or measured
        fastest = min(pool, key=lambda b: b.latency.p50)
        tied = [b for b in pool if _overlap(b.latency, fastest.latency)]
        best = min(tied, key=lambda b: simplicity(b, target))
        if best is fastest:
            why = f"fastest candidate within the accuracy budget: p50 {best.latency.p50:.4f} ms"
        else:
            why = (f"tie: {best.plan.name} (p50 {best.latency.p50:.4f} ms) and the fastest, {fastest.plan.name} "
                   f"(p50 {fastest.latency.p50:.4f} ms), are within noise (95% CIs of p50 overlap); "
                   f"chose the simpler")
        if best.plan.original:
            why = "nothing beat the original model beyond noise: shipping it as given; " + why
        if not fits:
            why = f"no candidate meets the profile's latency/memory budget ({over_budgets(best, target)}); " + why
        if base is not None and base is not best:
            why += f" vs the original {base.latency.p50:.4f} ms ({best.latency.p50 / base.latency.p50:.2f}x)"
        return best, why + "; " + _quality(best, scoring)
    if ok:
        order = {p: i for i, p in enumerate(target.precisions)}
        best = min(ok, key=lambda b: (b.plan.original, order.get(b.plan.precision, 99)))
        note = best.latency_note or "latency not measured"
        return best, (f"{note}; chose by the profile's precision order ({', '.join(p.value for p in target.precisions)}) "
                      f"among candidates within the accuracy budget; " + _quality(best, scoring))
    ran = [b for b in built if b.ok and b.fidelity is not None and b.plan.eligible]
    if ran:  # nothing met the budget: the most faithful one, flagged (pack --strict refuses it)
        best = max(ran, key=lambda b: (b.fidelity.accuracy if b.fidelity.accuracy is not None else -1,
                                       scoring.score(b.fidelity), b.fidelity.cosine))
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
        return (f"accuracy {f.accuracy:.4f} vs the original {scoring.reference_accuracy:.4f} "
                f"(drop {100 * (scoring.reference_accuracy - f.accuracy):+.2f} points, budget "
                f"{100 * scoring.max_drop:g} point{'' if 100 * scoring.max_drop == 1 else 's'})")
    if f.outputs:
        return "; ".join(_row_text(r) for r in f.outputs if r.get("value") is not None) + " (vs the original)"
    top1 = f"top-1 agreement {f.top1_agreement:.4f}, " if f.top1_agreement is not None else ""
    return f"{top1}cosine {f.cosine:.5f} to the original"


def _row_text(r: dict) -> str:
    mark = "≥" if r["passed"] else "<"
    return f"{r['output']} {r['metric']} {r['value']:.4g} {mark} {r['threshold']:.4g}"


def _warnings(the_plan: Plan, built: list[Built], chosen: Built | None, reason: str, tgt: Target) -> list[str]:
    warnings = list(the_plan.warnings)  # noise warnings are derived from the numbers by report/build.py
    if chosen is not None and not chosen.within_budget:
        warnings.append(reason + " (pack --strict exits 3 instead)")
    for b in built:
        why = over_budgets(b, tgt) if b.ok else None
        if why:
            b.notes.append(f"over the profile's budget: {why}")
            if b is chosen:
                warnings.append(f"{b.plan.name} is over the profile's budget: {why}")
    return warnings


# ---------------------------------------------------------------- the report

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
        name=b.plan.name, runtime=spec.runtime, device=b.device_used or spec.provider or spec.device or "",
        precision=b.plan.precision.value, status=status, steps=tuple(b.records), error=b.error or b.skipped,
        size_bytes=size, compressed_bytes=packed, fidelity=b.fidelity, latency=b.latency,
        latency_note=b.latency_note if b.latency is None else None, kernels=b.kernels,
        within_budget=b.within_budget, notes=tuple(b.notes), files=tuple(Path(f).name for f in files),
    )


def build_report(source: Artifact, reference: Artifact, the_plan: Plan, built: list[Built], chosen: Built | None,
                 reason: str, scoring: Scoring, threads: int, warnings: list[str]) -> Report:
    from edgepack import __version__
    from edgepack.host import host_info
    from edgepack.model.describe import count_parameters, file_sha256, io_specs
    from edgepack.steps.guard import guard_costs

    tgt = the_plan.target
    in_specs, out_specs = io_specs(reference)
    cands = tuple(freeze(b) for b in built)
    skipped = tuple(CandidateResult(name=n, runtime="", device="", precision="", status="skipped", error=r)
                    for n, r in the_plan.skipped)
    base = next((c for c in cands if c.name == ORIGINAL and c.status == "ok"), None) or \
        next((c for c in cands if c.precision == "fp32" and c.status == "ok"), None)
    extra: dict[str, Any] = {}
    for c in cands:
        for s in c.steps:
            if s.kind in ("prune", "structured-prune") and s.details and s.kind not in extra:
                extra[s.kind] = s.details
    if guard_costs(cands):
        extra["guard"] = guard_costs(cands)
    return Report(
        schema_version=SCHEMA_VERSION,
        edgepack_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        target={"name": tgt.name, "description": tgt.description, "source": tgt.source,
                "runtimes": [r.model_dump(mode="json") for r in tgt.runtimes]},
        host={**host_info().to_dict(), "threads": threads},
        model={"source": str(source.path), "format": source.format.value,
               "sha256": file_sha256(source.files or (source.path,)),
               "inputs": [s.to_dict() for s in in_specs], "outputs": [s.to_dict() for s in out_specs],
               "parameters": count_parameters(reference), "metadata": dict(source.metadata)},
        budget=scoring.describe(),
        candidates=cands + skipped,
        baseline=base.name if base else None,
        chosen=chosen.plan.name if chosen else None,
        reason=reason,
        warnings=tuple(warnings),
        extra=extra,
    )


def _add_profiles(report: Report, chosen: Built, feeds, recipe, tgt: Target) -> Report:
    """The chosen candidate's op profile (taken while timing) and, when asked, its batch sweep."""
    if chosen.latency is None:
        return report
    sweep: tuple = ()
    if recipe.batch_sizes != (1,):
        from edgepack.bench import batch_sweep
        from edgepack.bundle.profile import tile

        try:
            sweep = tuple(batch_sweep(chosen.session, lambda b: tile(feeds, b), list(recipe.batch_sizes),
                                      tgt.bench, name=chosen.plan.name))
        except EdgepackError as e:
            report = replace(report, warnings=report.warnings + (f"batch sweep: {e}",))
    extra = dict(report.extra)
    if chosen.op_profile:
        total = sum(o["ms"] for o in chosen.op_profile)
        extra["op_profile_check"] = {"ops_total_ms": round(total, 6), "p50_ms": round(chosen.latency.p50, 6),
                                     "ratio": round(total / chosen.latency.p50, 4) if chosen.latency.p50 else None}
    return replace(report, op_profile=tuple(chosen.op_profile), batch_sweep=sweep, extra=extra)
