"""The choice: the fastest candidate within budget, ties to the simpler, never slower than the original."""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgepack.target import Target
from edgepack.types import BenchResult, Precision

if TYPE_CHECKING:
    from edgepack.pipeline import Built
    from edgepack.recipe import Plan
    from edgepack.scoring import Scoring


MARGIN = 0.03  # a candidate beats a simpler one only when faster by more than this too (drift is ~1-3%)
LEAN = 0.05  # a tie whose median ratio is beyond this gets more rounds (pipeline.separate: EXTRA_ROUNDS)
MIN_PAIRS = 3  # blocks timed side by side from which their ratios decide (fewer: the p50 CIs must not overlap)
_SIMPLE = {Precision.FP32: 0, Precision.FP16: 1, Precision.INT8_DYNAMIC: 2, Precision.INT8: 3, Precision.INT4: 3}


def simplicity(b: Built, target: Target) -> tuple:
    """Lower is simpler: the original, then the target's first runtime, then fp32 over quantized, unguarded,
    default runtime settings."""
    return (0 if b.plan.original else 1, runtime_rank(b, target), _SIMPLE.get(b.plan.precision, 4),
            "-guarded" in b.plan.name, len(b.plan.runtime.disabled_optimizers))


def runtime_rank(b: Built, target: Target) -> int:
    """The position of the candidate's runtime in the target's list (an unlisted one last)."""
    runtimes = [r.runtime for r in target.runtimes]
    return runtimes.index(b.plan.runtime.runtime) if b.plan.runtime.runtime in runtimes else len(runtimes)


def overlap(a: BenchResult, b: BenchResult) -> bool:
    return a.p50_ci95[0] <= b.p50_ci95[1] and b.p50_ci95[0] <= a.p50_ci95[1]


def within_noise(a: BenchResult, b: BenchResult) -> bool:
    """Whether a's and b's p50 cannot be told apart. From their blocks timed side by side where there are
    MIN_PAIRS: apart only when every ratio (six pairs or more: the 95% CI of the median ratio) is beyond
    MARGIN on the same side; host drift between rounds then cancels out, where it stretches each p50's own CI.
    Otherwise: their p50 95% CIs overlap."""
    p = _decisive(a, b)
    if p is None:
        return overlap(a, b)
    lo, hi, _ = p
    return not (lo > 1 + MARGIN or hi < 1 / (1 + MARGIN))


def leans(a: BenchResult, b: BenchResult) -> bool:
    """A tie whose blocks side by side (MIN_PAIRS or more) put the median ratio beyond LEAN: more blocks would
    likely tell them apart (with under a dozen pairs one disturbed block spans the CI over 1)."""
    from edgepack.bench import ratios

    rs = ratios(a, b)
    if len(rs) < MIN_PAIRS:
        return False
    m = rs[len(rs) // 2]
    return m > 1 + LEAN or m < 1 / (1 + LEAN)


def pairs(a: BenchResult, b: BenchResult) -> int:
    """How many of a's and b's blocks were timed side by side."""
    from edgepack.bench import paired

    p = paired(a, b)
    return 0 if p is None else p[2]


def tie_note(a: BenchResult, b: BenchResult) -> str:
    """How a and b were found within noise, for the report."""
    from edgepack.report.render import fmt_ms

    p = _decisive(a, b)
    if p is None:
        return (f"their p50 95% CIs overlap ({fmt_ms(a.p50_ci95[0])}–{fmt_ms(a.p50_ci95[1])} vs "
                f"{fmt_ms(b.p50_ci95[0])}–{fmt_ms(b.p50_ci95[1])} ms)")
    return f"their p50 ratio over {p[2]} blocks timed side by side spans {p[0]:.2f}–{p[1]:.2f}"


def _decisive(a: BenchResult, b: BenchResult) -> tuple[float, float, int] | None:
    """bench.paired(a, b) where at least MIN_PAIRS blocks pair up, else None."""
    from edgepack.bench import paired

    p = paired(a, b)
    return p if p is not None and p[2] >= MIN_PAIRS else None


def choose(built: list[Built], target: Target, scoring: Scoring) -> tuple[Built | None, str]:
    """Fastest measured candidate within budget; a candidate within noise of the fastest (within_noise) is a tie and the
    simplest of the tied wins (the original first). Without measurements, the profile's precision order."""
    ok = [b for b in built if b.ok and b.within_budget and b.plan.eligible]
    base = next((b for b in built if b.ok and b.plan.original and b.latency), None)
    measured = [b for b in ok if b.latency is not None]
    if measured:
        fits = [b for b in measured if not over_budgets(b, target)]
        pool = fits or measured
        fastest = min(pool, key=lambda b: b.latency.p50)
        tied = sorted((b for b in pool if b.latency.p50 <= fastest.latency.p50 * (1 + MARGIN)
                       or within_noise(b.latency, fastest.latency)), key=lambda b: simplicity(b, target))
        # the simplest of the tied that beats the original itself: a tie with the fastest is not a win over the
        # original (swift-f0: OpenVINO fp32 tied OpenVINO int8, which beat the original, but was within noise of
        # the original, and ran 1.15x it outside)
        beats = [b for b in tied if base is None or base not in pool or b is base or beats_original(b, base)]
        best = beats[0] if beats else base if base in pool else fastest
        passed = [b.plan.name for b in tied[:tied.index(best)] if b is not base] if best in tied else []
        if best is fastest:
            why = f"fastest candidate within the accuracy budget: p50 {best.latency.p50:.4f} ms"
        else:
            how = (f"p50s within {MARGIN:.0%}" if best.latency.p50 <= fastest.latency.p50 * (1 + MARGIN)
                   else tie_note(best.latency, fastest.latency))
            why = (f"tie: {best.plan.name} (p50 {best.latency.p50:.4f} ms) and the fastest, {fastest.plan.name} "
                   f"(p50 {fastest.latency.p50:.4f} ms), are within noise ({how}); chose the simpler")
        if passed:
            why += f"; {', '.join(passed)}: within noise of the original"
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


def beats_original(b: Built, base: Built) -> bool:
    """Faster than the original beyond noise (and by more than MARGIN)."""
    return (b.latency.p50 * (1 + MARGIN) < base.latency.p50 and not within_noise(b.latency, base.latency))


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
    worst = r.get("worst_threshold")
    mark = "≥" if (r["value"] >= r["threshold"] if worst is not None else r["passed"]) else "<"
    text = f"{r['output']} {r['metric']} {r['value']:.4g} {mark} {r['threshold']:.4g}"
    if worst is not None:
        text += f", worst {r['worst_db']:.3g} {'≥' if r['worst_db'] >= worst else '<'} {worst:.3g}"
    return text


def plan_warnings(the_plan: Plan, built: list[Built], chosen: Built | None, reason: str, tgt: Target,
                  scoring: Scoring | None = None) -> list[str]:
    warnings = list(the_plan.warnings)  # noise warnings are derived from the numbers by report/build.py
    if scoring is not None and (coarse := scoring.coarse_budget()):
        warnings.append(coarse)
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
