"""What a pack found, as a Report: candidates, the choice, warnings derived from the numbers."""
from __future__ import annotations

import datetime as _dt
import zlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.choice import tie_note, within_noise
from edgepack.errors import EdgepackError
from edgepack.recipe import ORIGINAL, Plan
from edgepack.report.render import fmt_ms
from edgepack.target import Target
from edgepack.types import SCHEMA_VERSION, Artifact, CandidateResult, Report

if TYPE_CHECKING:
    from edgepack.pipeline import Built
    from edgepack.scoring import Scoring

NOISY_CV = 0.15  # above this coefficient of variation a latency may be noisy...
NOISY_SPREAD = 0.25  # ...when its p90 is also this far above its p50


def _spread(lat) -> float:
    return (lat.p90 - lat.p50) / lat.p50 if lat.p50 > 0 else 0.0


def noise_warnings(report: Report) -> list[str]:
    """Latencies that are noisy (cv high) or not distinguishable from the chosen one (choice.within_noise)."""
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
        out += [f"{chosen.name} and {c.name} (p50 {fmt_ms(chosen.latency.p50)} vs {fmt_ms(c.latency.p50)} ms): "
                f"{tie_note(chosen.latency, c.latency)}; their latency difference is within noise"
                for c in measured if c is not chosen and within_noise(chosen.latency, c.latency)]
    return out


# ---------------------------------------------------------------- from the pipeline's candidates

CHUNK = 1 << 20  # a file over EXACT_BYTES gets its zip size estimated from SAMPLES chunks of this size
EXACT_BYTES, SAMPLES = 16 * CHUNK, 8


def _size(paths) -> tuple[int, int]:
    """(bytes, zlib level-6 bytes) of the files; compressing every candidate's weights whole took 8-18 s of
    a pack on 30-70 MB models, so big files are sampled (weights compress alike throughout a file)."""
    total, packed = 0, 0
    for p in paths:
        data = Path(p).read_bytes()
        total += len(data)
        packed += _packed(data)
    return total, packed


def _packed(data: bytes) -> int:
    if len(data) <= EXACT_BYTES:
        return len(zlib.compress(data, 6))
    starts = [i * (len(data) - CHUNK) // (SAMPLES - 1) for i in range(SAMPLES)]
    ratio = sum(len(zlib.compress(data[s:s + CHUNK], 6)) for s in starts) / (SAMPLES * CHUNK)
    return int(len(data) * ratio)


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


def add_profiles(report: Report, chosen: Built, feeds, recipe, tgt: Target) -> Report:
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
