"""Every pack stage in order: reference → shared steps → candidates → score → guard → time → choose → report.

``run(source, plan, calib=..., eval=..., train=..., work=..., emit=...)`` is the whole middle of
`edgepack pack`; api.pack loads the model and data before it and writes the bundle after it. Each
stage's wall time is recorded (report.json `extra.stages`, shown with -v).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.choice import MIN_PAIRS, choose, leans, pairs, plan_warnings, runtime_rank, within_noise
from edgepack.errors import EdgepackError, first_line
from edgepack.forked import Forked, usable_cores
from edgepack.isolated import Worker, close_all, start_server
from edgepack.recipe import CandidatePlan, Plan, StepSpec
from edgepack.report.build import add_profiles, build_report
from edgepack.scoring import Scoring, eval_batch, make_scoring
from edgepack.steps import Context, get_step, make_config
from edgepack.target import RuntimeSpec, Target
from edgepack.types import (
    Artifact,
    BenchResult,
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
    session: Any = None  # the scoring session (kept for the chosen one's op profile and batch sweep)
    timer: Any = None  # what times the candidate: its isolated.Worker while pack times (a session in tests)
    device_used: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the runner settings it is timed and shipped with
    outputs: list[np.ndarray] | None = None  # on the scoring data
    batch: int = 32  # batch the scoring ran at (a static model's fixed batch)
    score_s: float = 0.0  # seconds its scoring took, session opening included (what a guard's validation costs)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.artifact is not None


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
        scoring = make_scoring(reference, the_plan, calib, eval, threads, in_specs)

    def progress(message: str, fraction: float | None = None) -> None:
        emit("progress", message=message, fraction=fraction)

    def make_ctx(name: str, runtime: RuntimeSpec | None = None, **extra) -> Context:
        return Context(workdir=work / name, target=tgt, runtime=runtime, calib=calib, eval=eval, train=train,
                       seed=recipe.seed, progress=progress, events=emit, **extra)

    with stages.stage("shared steps"):
        base, shared_records = _shared(source, reference, the_plan, make_ctx("shared"), emit)
    scored: set[int] = set()  # id() of the candidates scored already

    feeds = next(iter(scoring.data.batches(1)))  # the timing input: one sample of the scoring data

    def score_all(bs: list[Built]) -> None:
        for b in bs:
            if not b.plan.original:
                b.records = shared_records + b.records
            score(b, scoring, threads, emit)
            scored.add(id(b))
            if remote is None and b.session is not None:
                start_timer(b, feeds, threads)

    from edgepack.runtimes import availability

    built: list[Built] = []
    early: list[tuple[Built, Forked]] = []  # the guard started while the other process builds (start_early_guard)

    def while_waiting(local: list[Built]) -> None:
        if recipe.guard is not False and remote is None:
            early.extend(start_early_guard(local, base, scoring, shared_records, make_ctx, threads, work))

    if remote is None and any(availability(p.runtime) is None for p in the_plan.candidates):
        start_server()  # the timing workers' fork server: its imports overlap the builds
    try:
        with stages.stage("candidates"):  # (this process scores its own candidates while the other one builds)
            built = build_all(base, reference, the_plan, make_ctx, emit, on_local=score_all,
                              while_waiting=while_waiting)
        with stages.stage("score"):
            score_all([b for b in built if id(b) not in scored])
            early_base, early_out = finish_early_guard(early, work, emit)
            built += early_out
            for g in early_out:  # timed in the first round with the others
                start_timer(g, feeds, threads)
        measured_on = None
        if remote is None:
            with stages.stage("time"):
                time_candidates(built, feeds, tgt, threads, recipe.bench_time_s, emit)
        if recipe.guard is not False:
            with stages.stage("guard"):
                # chosen as if no guard had run early (its candidates are extra ones until then)
                pool = [b for b in built if all(b is not g for g in early_out)]
                wanted = [b for b in pool if needs_guard(b) and (recipe.guard or could_win(b, pool)
                                                                 or too_young_to_rule_out(b, pool))]
                if not recipe.guard and remote is None:  # a guard costs seconds to minutes: a second look first
                    # (not at one guarded early: its guard costs nothing more)
                    wanted = (look_again([b for b in wanted if b is not early_base], pool, feeds, tgt, emit)
                              + [b for b in wanted if b is early_base])
                if not recipe.guard:  # by default one int8 of each runtime, the simplest runtime first; the
                    # next one only when that guard does not win (see MAX_GUARDS)
                    wanted = first_guards(wanted, tgt, scoring)[:MAX_GUARDS]

            def guard_one(b: Built) -> list[Built]:
                if b is early_base:  # built, scored and timed already
                    return early_out
                with stages.stage("guard"):
                    new = _guarded([b], base, scoring, shared_records, make_ctx, threads, emit)
                if new and remote is None:
                    with stages.stage("time"):  # timed beside the best candidate so far, interleaved
                        best = best_within(built)
                        time_candidates(new + ([best] if best is not None and best not in new else []), feeds, tgt,
                                        threads, recipe.bench_time_s, emit)
                return new

            guard_in_turn(wanted, built, bool(recipe.guard), guard_one, len(scoring.data))
        with stages.stage("time"):
            if remote is not None:  # pack --on: timed on the user's devices, interleaved there
                from edgepack.devices.candidates import time_remote

                measured_on = time_remote(built, feeds, scoring.data.axes, tgt, recipe.bench_time_s or tgt.bench.time_budget_s,
                                          tgt.bench.warmup, threads, remote, work, emit)
            else:
                separate(built, feeds, tgt, recipe.bench_time_s, emit)
        with stages.stage("choose"):
            chosen, reason = choose(built, tgt, scoring)
            if chosen is not None and chosen.session is None and chosen.latency is not None:
                reopen(chosen, threads)  # (scored in the early guard's process)
            if measured_on is not None:
                reason += f" (measured on {measured_on['device']})"
            close_all(b.timer for b in built)
            for b in built:  # only the chosen one's session is still needed (op profile, batch sweep), alone
                b.timer = None
                if b is not chosen:
                    b.session = None
            if measured_on is None and chosen is not None:
                profile_ops(chosen, feeds)
            warnings = plan_warnings(the_plan, built, chosen, reason, tgt, scoring)
            report = build_report(source, reference, the_plan, built, chosen, reason, scoring, threads, warnings)
            if chosen is not None:
                report = add_profiles(report, chosen, feeds, recipe, tgt)
        report = replace(report, extra={**report.extra, "stages": dict(stages.seconds),
                                        **({"measured_on": measured_on} if measured_on else {})})
        return Outcome(report, chosen, scoring)
    finally:
        close_all(b.timer for b in built)
        for _, proc in early:  # (a no-op once finished)
            proc.close()


def _reference(source: Artifact, the_plan: Plan, work: Path) -> Artifact:
    """The fp32 reference: the unmodified source model as ONNX."""
    from edgepack.model.torch import export_onnx

    if source.format is ModelFormat.ONNX:
        return source
    opset = next((s.params.get("opset", 17) for s in the_plan.shared if s.kind == "export-onnx"), 17)
    return export_onnx(source, work / "reference", opset=opset)


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


def build_all(base: Artifact, reference: Artifact, the_plan: Plan, make_ctx, emit: Event,
              on_local: Callable[[list[Built]], None] | None = None,
              while_waiting: Callable[[list[Built]], None] | None = None) -> list[Built]:
    """Every candidate, in plan order. Where this host has two cores or more, the candidates of the target's
    other runtimes build in a forked process beside this one (their steps share nothing; that process has
    never opened those runtimes): building takes about as long as the slower runtime's candidates.
    ``on_local`` gets this process's candidates (the original first) while the other process still works;
    ``while_waiting`` then gets them too if it still does (work that would otherwise wait on it)."""
    todo = [p for p in the_plan.candidates if not p.original]
    first = todo[0].runtime.runtime if todo else None
    side = [p for p in todo if p.runtime.runtime != first]
    if not side or len(side) == len(todo) or usable_cores() < 2 or base.format is not ModelFormat.ONNX:
        side = []
    quiet: dict[str, Any] = {"progress": _no_progress, "events": _no_emit}
    forked = None
    if side:
        log.debug("building %s in a second process", ", ".join(p.name for p in side))
        forked = Forked(lambda: {p.name: build(base, p, replace(make_ctx(p.name, p.runtime), **quiet), _no_emit)
                                 for p in side})
    done = {p.name: _original(p, reference, the_plan) for p in the_plan.candidates if p.original}
    try:
        done.update({p.name: build(base, p, make_ctx(p.name, p.runtime), emit) for p in todo if p not in side})
        if forked is not None:
            local = [done[p.name] for p in the_plan.candidates if p.name in done]
            if on_local is not None:
                on_local(local)
            if while_waiting is not None and not forked.done():
                while_waiting(local)
            try:
                done.update(forked.result())
            except RuntimeError as e:  # the second process died: those candidates fail, the others stand
                done.update({p.name: Built(p, error=str(e)) for p in side})
    finally:
        if forked is not None:
            forked.close()
    return [done[p.name] for p in the_plan.candidates]


def _no_emit(event: str, **data) -> None:
    pass


def _no_progress(message: str, fraction: float | None = None) -> None:
    pass


def open_for(artifact: Artifact, spec: RuntimeSpec, threads: int, arch: str = "any"):
    """(session, measurable, note): the real provider when present, else the CPU fallback for fidelity only."""
    from edgepack.runtimes import availability, open_session

    reason = availability(spec, arch)
    if reason is None:
        return open_session(artifact, spec, threads=threads), True, None
    if reason.startswith("this host is"):  # another CPU: fidelity here (on the fallback if the provider is absent)
        return open_session(artifact, spec, threads=threads, fallback=True), False, f"not measured: {reason}"
    return open_session(artifact, spec, threads=threads, fallback=True), False, f"not measured: {reason}"




def score(b: Built, scoring: Scoring, threads: int, emit: Event) -> None:
    """Fidelity (and accuracy) of one candidate; latency is measured later, interleaved."""
    from edgepack.fidelity import run_dataset

    if not b.ok:
        return
    emit("candidate", name=b.plan.name, phase="score")
    t0 = time.perf_counter()
    try:
        session, measurable, note = open_for(b.artifact, b.plan.runtime, threads, b.plan.arch)
        b.device_used = session.device_used
        b.batch = eval_batch(session, scoring.data.axes)
        b.outputs = run_dataset(session, scoring.data, b.batch, dict(enumerate(scoring.axes)))
        b.fidelity = scoring.compare(b.outputs)
        b.within_budget = scoring.judge(b.fidelity)
        b.score_s = time.perf_counter() - t0
        if not measurable:
            b.latency_note = note
            b.notes.append(f"fidelity checked on {session.device_used} (target provider absent)")
        else:
            b.session = session  # kept for the op profile and batch sweep, should it be chosen
    except EdgepackError as e:
        b.error = str(e)
    except Exception as e:
        log.debug("scoring %s failed", b.plan.name, exc_info=True)
        b.error = f"{b.plan.runtime.runtime} could not run it: {first_line(e)}"


def needs_guard(b: Built) -> bool:
    return b.ok and b.within_budget is False and b.plan.precision in (Precision.INT8, Precision.INT8_DYNAMIC)


MAX_GUARDS = 2  # by default: a second int8 (the next runtime's) is guarded only when the first guard did not win


def first_guards(wanted: list[Built], target: Target, scoring: Scoring) -> list[Built]:
    """One int8 to guard per runtime, the simplest runtime first (ONNX Runtime's guard is bounded, NNCF's
    accuracy control grows with the layer count): its fastest int8, or, of those within noise of it, the one
    nearest its budget: fewer layers must stay float there, and which of two tied ones read faster is noise
    (MiniLM-L3: static int8 at cosine 0.62, dynamic at 0.982 against 0.99; guarding the static one shipped the
    original)."""
    groups: dict[str, list[Built]] = {}
    for b in sorted(wanted, key=lambda b: (runtime_rank(b, target), b.latency.p50 if b.latency else float("inf"))):
        groups.setdefault(b.plan.runtime.runtime, []).append(b)
    out = []
    for fastest, *others in groups.values():
        tied = [fastest] + [b for b in others if fastest.latency is not None and b.latency is not None
                            and within_noise(fastest.latency, b.latency)]
        out.append(max(tied, key=lambda b: nearness(b, scoring)))
    return out


def nearness(b: Built, scoring: Scoring) -> float:
    """How near its budget a candidate's accuracy is (Scoring.score: higher is nearer); -inf when unscored."""
    return scoring.score(b.fidelity) if b.fidelity is not None else float("-inf")


def best_within(built: list[Built], timed: bool = False) -> Built | None:
    """The fastest measured candidate within budget (with ``timed``: one whose timing process still runs)."""
    within = [c for c in built if c.ok and c.within_budget and c.latency is not None
              and (c.timer is not None or not timed)]
    return min(within, key=lambda c: c.latency.p50) if within else None


def guard_won(guarded: list[Built], built: list[Built]) -> bool:
    """Whether the (last) guarded candidate ended within budget and the fastest of those within budget."""
    return bool(guarded) and best_within(built) is guarded[-1]


SECOND_GUARD_S = 60.0  # the most a second guard's validation runs may cost, estimated (see guard_cost)
GUARD_VALIDATIONS = 15  # runs over the scoring data a guard makes: NNCF's 12 reverts and 3 more; ORT's ~2·log2(n)


def guard_cost(b: Built, built: list[Built], samples: int) -> float:
    """Seconds a guard on ``b`` would spend running the scoring data, at the original's speed (layers reverted to
    float run at about that speed; a dnsmos guard spent 338 s so)."""
    original = next((c for c in built if c.plan.original and c.latency is not None), None)
    ms = max(b.latency.p50 if b.latency else 0.0, original.latency.p50 if original else 0.0)
    return GUARD_VALIDATIONS * samples * ms / 1000 if ms > 0 else float("inf")  # untimed (pack --on): unknown


def guard_in_turn(wanted: list[Built], built: list[Built], always: bool,
                  guard_one: Callable[[Built], list[Built]], samples: int = 0) -> list[Built]:
    """Guard ``wanted`` in order (``guard_one`` builds, scores and times one; its candidates join ``built``,
    unless there already: a guard run early): all of them when ``always``, else the next only while the last
    guard did not win, the next could, and its validations over ``samples`` scoring samples would cost at most
    SECOND_GUARD_S."""
    out: list[Built] = []
    for i, b in enumerate(wanted):
        if i and not always:
            if guard_won(out[-1:], built) or not could_win(b, built):
                break
            if (cost := guard_cost(b, built, samples)) > SECOND_GUARD_S:
                why = (f"its validations would take about {cost:.0f} s (over {SECOND_GUARD_S:.0f} s)"
                       if cost < float("inf") else "nothing was timed here to tell its cost or whether the first won")
                b.notes.append(f"a second accuracy guard was not run on it: {why}; --guard runs it")
                break
        new = guard_one(b)
        built += [g for g in new if all(g is not x for x in built)]
        out += new
    return out


def could_win(b: Built, built: list[Built]) -> bool:
    """Whether an int8 candidate outside the budget is worth the guard: untimed (nothing to compare), or
    possibly faster than every candidate already within budget: the low end of its p50's CI below their best
    p50 (keeping layers in float only slows it; the first timing round is short, so noise is given the benefit)."""
    if not needs_guard(b) or b.latency is None:
        return needs_guard(b)
    best = best_within(built)
    return best is None or b.latency.p50_ci95[0] < best.latency.p50


def too_young_to_rule_out(b: Built, built: list[Built]) -> bool:
    """An int8 within NEAR of the best p50 on fewer than MIN_BLOCKS blocks: one disturbed first block must not
    rule its guard out (aecmos: ONNX Runtime's int8 read 12.1 ms in one block, 8.2-8.7 ms in other packs), so
    look_again times it beside the best before could_win decides."""
    from edgepack.runner.run import MIN_BLOCKS

    best = best_within(built)
    return (needs_guard(b) and b.latency is not None and best is not None and best.latency is not None
            and len(b.latency.block_sizes) < MIN_BLOCKS and b.latency.p50 <= best.latency.p50 * (1 + NEAR))


def look_again(wanted: list[Built], built: list[Built], feeds, target: Target, emit: Event) -> list[Built]:
    """The int8 candidates not surely faster than the best candidate within budget (their p50 CIs apart) are
    timed a short round more beside it (a first round of ~10 runs of a 5 ms model can put int8 ahead), and so
    are those only too young to rule out (too_young_to_rule_out); those that then cannot win are not guarded,
    and their notes say why."""
    best = best_within(built, timed=True)
    if best is None:
        return wanted
    unsure = [b for b in wanted if b.latency is not None and b.timer is not None
              and (b.latency.p50_ci95[1] >= best.latency.p50_ci95[0] or not could_win(b, built))]
    if not unsure:
        return wanted
    time_more([best, *unsure], feeds, short_round(target, SHORT_ROUND_S), emit)
    out = []
    for b in wanted:
        if could_win(b, built):
            out.append(b)
        else:
            b.notes.append(f"accuracy guard not run: its p50 ({b.latency.p50:.3f} ms, 95% CI from "
                           f"{b.latency.p50_ci95[0]:.3f}) is not below {best.plan.name}'s ({best.latency.p50:.3f} ms) "
                           "after a second timing round, and layers kept float only slow it")
    return out


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
        steps = get_backend(b.plan.runtime.runtime).guard_steps(b.plan.runtime, b.plan.precision) if needs_guard(b) else None
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
        if g.ok and g.within_budget:  # the same model under other runtime settings, timed beside it
            for suffix, spec, note in get_backend(plan.runtime.runtime).mixed_variants(g.artifact, plan.runtime,
                                                                                      plan.precision):
                twin = Built(plan=replace(plan, name=f"{plan.name}-{suffix}", runtime=spec), artifact=g.artifact,
                             records=list(g.records), notes=[note])
                score(twin, scoring, threads, emit)
                out.append(twin)
    return out


EARLY_GUARD_S = 10.0  # the most an early guard's validations may cost, estimated from one scoring of the int8


def start_early_guard(local: list[Built], base: Artifact, scoring: Scoring, shared_records, make_ctx,
                      threads: int, work: Path) -> list[tuple[Built, Forked]]:
    """The one of this process's int8 candidates outside the budget that lost the least accuracy (see
    first_guards), guarded in a forked process while the other runtime's candidates still build (a core would
    idle meanwhile), if the guard looks cheap: its validations estimated at most EARLY_GUARD_S (it then takes a
    core from that build for at most so long). Whether its guard is worth running depends on timing that has not
    happened yet, so its result is used only if it is ready by the time everything else is built and scored
    (finish_early_guard); otherwise the guard runs in turn, as before."""
    from edgepack.runtimes import get_backend

    able = [b for b in local if needs_guard(b)
            and get_backend(b.plan.runtime.runtime).guard_steps(b.plan.runtime, b.plan.precision)]
    if not able:
        return []
    b = max(able, key=lambda b: nearness(b, scoring))
    if (cost := GUARD_VALIDATIONS * b.score_s) > EARLY_GUARD_S:
        log.debug("%s not guarded early: its validations would take about %.0f s", b.plan.name, cost)
        return []

    def quiet_ctx(name: str, runtime: RuntimeSpec | None = None, **extra) -> Context:
        return replace(make_ctx(name, runtime, **extra), progress=_no_progress, events=_no_emit)

    def guard() -> list[Built]:
        import tempfile

        tmp = work / f"{b.plan.name}-guarded" / "tmp"  # the quantizer's temp files too go where a stop removes them
        tmp.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(tmp)
        out = _guarded([b], base, scoring, shared_records, quiet_ctx, threads, _no_emit)
        for g in out:  # (sessions stay in this process)
            g.session = g.timer = None
        return out

    log.debug("guarding %s while the other process builds (validations estimated at %.1f s)", b.plan.name, cost)
    return [(b, Forked(guard))]


def finish_early_guard(early: list[tuple[Built, Forked]], work: Path, emit: Event) -> tuple[Built | None, list[Built]]:
    """(the int8 guarded early, its guarded candidates) if that guard is done; else it is stopped, its files
    removed, and (None, [])."""
    if not early:
        return None, []
    b, proc = early[0]
    if not proc.done():
        proc.close()
        shutil.rmtree(work / f"{b.plan.name}-guarded", ignore_errors=True)
        log.debug("early guard of %s stopped: not done when the candidates were", b.plan.name)
        return None, []
    try:
        out = proc.result()
    except RuntimeError as e:
        log.debug("early guard of %s failed: %s", b.plan.name, e)
        return None, []
    for g in out:
        emit("candidate", name=g.plan.name, phase="score")
    log.debug("early guard of %s: %s", b.plan.name, ", ".join(g.plan.name for g in out))
    return b, out


def reopen(b: Built, threads: int) -> None:
    """The scoring session of a candidate scored in another process (the op profile, batch sweep and the
    bundle's reference outputs use it)."""
    try:
        b.session = open_for(b.artifact, b.plan.runtime, threads, b.plan.arch)[0]
    except Exception as e:
        log.debug("could not reopen %s: %s", b.plan.name, e)


def time_candidates(built: list[Built], feeds: dict[str, np.ndarray], target: Target, threads: int,
                    time_budget: float | None, emit: Event) -> None:
    """Time every measurable candidate interleaved, each in a process of its own with its runner settings
    (isolated.Worker: load time, first inference and memory are measured there too). Candidates whose provider
    is absent already carry a latency_note from score().
    """
    from edgepack.bench import measure
    from edgepack.forked import unpin
    from edgepack.runtimes import get_backend

    unpin()  # this thread too (it reopens the chosen candidate for its op profile), should a runtime have pinned it
    for b in built:
        if b.ok:
            b.settings = get_backend(b.plan.runtime.runtime).settings(b.plan.runtime, threads)
    timed = [b for b in built if b.timer is not None or (b.ok and not b.latency_note and b.session is not None)]
    for b in timed:  # (most started as they were scored: see start_timer)
        start_timer(b, feeds, threads)
    t0, sessions = time.perf_counter(), {}
    for b in timed:
        try:
            sessions[b.plan.name] = b.timer.ready()
        except EdgepackError as e:
            b.timer.close()
            b.timer, b.error = None, first_line(e)
    log.debug("%d timing process(es) ready %.2f s later", len(timed), time.perf_counter() - t0)
    if not sessions:
        return
    budget = target.bench.time_budget_s if time_budget is None else time_budget
    # a first short round for everyone; separate() then spends the budget on the candidates still in the race
    # (the sessions ran the scoring data already: a few warm-up runs do; 10 runs give a first CI)
    emit("measure", names=list(sessions))
    results = measure(sessions, feeds, short_round(target, min(FIRST_ROUND_S, budget)), batch=1)
    for b in timed:
        if b.plan.name in results:
            b.latency = results[b.plan.name]


def start_timer(b: Built, feeds, threads: int) -> None:
    """Start the candidate's timing process (isolated.Worker) unless it has one: it loads its session while
    pack goes on."""
    if b.timer is None and b.ok and not b.latency_note and b.artifact is not None:
        b.timer = Worker(b.artifact, b.plan.runtime, threads, feeds)


def profile_ops(b: Built, feeds) -> None:
    """The operator profile of one timed candidate (the chosen one: the report draws only its ops)."""
    from edgepack.runtimes import PROFILE_RUNS, kernel_summary

    if b.session is None or b.latency is None:
        return
    try:
        runs = max(5, min(PROFILE_RUNS, int(500.0 / max(b.latency.p50, 0.01)),  # about half a second,
                          PROFILE_EVENTS // max(1, _node_count(b.artifact))))  # and a trace that parses fast
        b.op_profile = b.session.op_profile(feeds, iterations=runs)
        b.kernels = kernel_summary(b.op_profile)
    except Exception as e:  # profiling is a diagnostic; never fail pack for it
        log.debug("op profile of %s failed: %s", b.plan.name, e)


PROFILE_EVENTS = 20000  # profiled node runs: an unrolled LSTM has thousands of nodes per inference


def _node_count(artifact: Artifact) -> int:
    if artifact.format is not ModelFormat.ONNX:
        return 1
    from edgepack.model import onnx as onnxutil

    return len(onnxutil.load(artifact.path, with_data=False).graph.node)


# ---------------------------------------------------------------- the choice

FIRST_ROUND_S = 0.1  # seconds per candidate in the first timing round
NEAR = 1.0  # a candidate this close to the fastest (p50 ratio - 1) is not ruled out on fewer than MIN_BLOCKS blocks
# (2x: what a burst that takes one of two cores from a block costs; opennsfw's OpenVINO int8 read 1.55x ONNX
# Runtime's int8 over its first two blocks, both in one such burst, and 0.85x it over the rest of the pack)
SHORT_ROUND_S = 0.3  # per candidate, a round that only adds blocks (a sub-ms model gets several 50 ms blocks)
FLOOR_S = 1.0  # per candidate, the most a tied round's min_iterations floor may cost
EXTRA_ROUNDS = 4  # rounds past `rounds` for a tie that leans one way (choice.leans), each a round's share
# (two left opennsfw's OpenVINO and ONNX Runtime int8, ~1.1x apart, tied in 2 of 5 packs on a noisy host)
SURE_PAIRS = 12  # ... aiming at this many blocks side by side (the median's CI then drops the extreme two)


def short_round(target: Target, seconds: float, min_iterations: int | None = None):
    """Bench settings for a short round on sessions already warm: a few warm-up runs, at least one block."""
    from edgepack.runner.run import BLOCK

    runs = min(BLOCK, target.bench.min_iterations) if min_iterations is None else min_iterations
    return target.bench.model_copy(update={"time_budget_s": seconds, "warmup": min(3, target.bench.warmup),
                                           "min_iterations": runs})


def blocks_round(target: Target, blocks: int, slowest_ms: float, share: float, floor: int):
    """Bench settings for a round of ``blocks`` interleaved blocks each (runner.interleave: a block is BLOCK
    runs, or BLOCK_S of them for a faster model), for the slowest model of the group; never over ``share``
    seconds nor ``floor`` runs each, as a tied round (many tied sub-ms candidates, or a slow model, then add
    fewer blocks per round)."""
    from edgepack.runner.run import BLOCK, BLOCK_S

    return short_round(target, min(share, blocks * max(BLOCK * slowest_ms / 1000, BLOCK_S)), min(blocks * BLOCK, floor))


def time_more(group: list[Built], feeds, settings, emit: Event) -> None:
    """One more round of ``group``, interleaved; the new runs join each candidate's latency."""
    from edgepack.bench import measure, merge

    emit("measure", names=[b.plan.name for b in group])
    again = measure({b.plan.name: b.timer for b in group}, feeds, settings, batch=1)
    for b in group:
        b.latency = merge(b.latency, again[b.plan.name])


def separate(built: list[Built], feeds, target: Target, time_budget: float | None, emit: Event, rounds: int = 3) -> None:
    """Time the fastest candidate and those within noise of it (choice.within_noise) again, until they separate or the
    time budget is spent (over `rounds` rounds, each round's share split among the candidates it times, so
    the pack's timing grows with the model, not with the candidate count); the new runs join the old ones.

    The original, and every candidate within NEAR of the fastest, is timed beside the fastest until both have
    MIN_BLOCKS interleaved blocks, whatever the budget: one short block each can look apart on a host that
    drifts between them (a pick 0.81x the original in the pack once ran 1.31x it outside).

    A tie whose blocks side by side lean one way (choice.leans) gets up to EXTRA_ROUNDS more rounds, just it and
    the fastest: with under a dozen pairs one disturbed block decides, and repeated packs then split between
    the two (opennsfw shipped the original once in five packs as a tie with a 2.5x faster int8)."""
    from edgepack.runner.run import BLOCK, MIN_BLOCKS

    budget = target.bench.time_budget_s if time_budget is None else time_budget
    settings = target.bench.model_copy(update={"warmup": min(3, target.bench.warmup)})

    def young(b: Built) -> bool:
        return len(b.latency.block_sizes) < MIN_BLOCKS

    for spent in range(rounds + MIN_BLOCKS + EXTRA_ROUNDS):
        timed = [b for b in built if b.ok and b.within_budget and b.latency is not None and b.timer is not None]
        if len(timed) < 2:
            return
        best = min(timed, key=lambda b: b.latency.p50)
        others = [b for b in timed if b is not best]
        tied = [b for b in others if within_noise(b.latency, best.latency)]
        side_by_side = {b.plan.name: pairs(b.latency, best.latency) for b in tied}
        # unsure: too few blocks to rule out, or tied only by the p50 CIs (too few blocks side by side with the
        # fastest for their ratio to decide: one disturbed block of the fastest stretches its CI over a 1.7x gap)
        unsure = [b for b in others if (b.plan.original or b.latency.p50 <= best.latency.p50 * (1 + NEAR))
                  and (young(b) or young(best)) or side_by_side.get(b.plan.name, MIN_PAIRS) < MIN_PAIRS]
        close = [b for b in others if b in tied or b in unsure]
        if not close:
            return
        extra = spent >= rounds and not unsure  # past the rounds: only ties that lean one way, EXTRA_ROUNDS more
        if extra:
            close = [b for b in tied if leans(b.latency, best.latency)]
            if not close or spent >= rounds + EXTRA_ROUNDS:
                return
        group = [best, *close]
        # a tie the paired test has judged (MIN_PAIRS blocks side by side, ratio within 3%) gets a share of the
        # budget; one it has not yet judged lacks only blocks side by side: a round of just those blocks
        judged = [b for b in tied if side_by_side[b.plan.name] >= MIN_PAIRS]
        missing = MIN_PAIRS - min(side_by_side.values(), default=MIN_PAIRS - 1)
        log.debug("timing round %d: %s beside %s (%s)", spent + 1, ", ".join(b.plan.name for b in close),
                  best.plan.name, "a tie that leans one way" if extra else "within noise" if judged
                  else f"{missing} more block(s) side by side" if tied else "too few blocks")
        # per candidate: a share of the round, but never under the target's min_iterations while they fit
        # FLOOR_S (a slow model's round then still adds several blocks: with fewer than six the CI is the block
        # medians' range, which one disturbed block stretches); without a judged tie only blocks are missing
        share = budget / rounds / len(group)
        slowest = max(b.latency.p50 for b in group)  # ms; the floor stops at FLOOR_S of runs (a 0.5 s model: 10)
        floor = max(BLOCK, min(settings.min_iterations, int(FLOOR_S * 1000 / max(slowest, 1e-3))))
        if extra:  # the blocks side by side that one disturbed block no longer decides (at least four more)
            lacking = max(4, SURE_PAIRS - min(side_by_side[b.plan.name] for b in close))
            round_settings = blocks_round(target, lacking, slowest, share, max(floor, lacking * BLOCK))
        elif judged:
            round_settings = settings.model_copy(update={"time_budget_s": share, "min_iterations": floor})
        elif tied:
            round_settings = blocks_round(target, missing, slowest, share, floor)
        else:  # only too young to rule out: the blocks they lack (a sub-ms model: one 50 ms block each)
            lacking = MIN_BLOCKS - min(len(b.latency.block_sizes) for b in group)
            round_settings = blocks_round(target, lacking, slowest, min(share, SHORT_ROUND_S), floor)
        time_more(group, feeds, round_settings, emit)


