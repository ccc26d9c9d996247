"""The Python API that the CLI calls one to one: pack, profile, verify, inspect, distill, doctor."""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import BudgetError, EdgepackError, ModelError
from .host import host_info, physical_cores
from .recipe import Plan, Recipe, plan as make_plan
from .steps import Context
from .target import Target, load_target
from .types import Artifact, CandidateResult, ModelFormat, Report

log = logging.getLogger(__name__)
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "digits"
SCHEMA_VERSION = 1


def _noop(*_a, **_k) -> None:
    pass


@dataclass(frozen=True)
class PackResult:
    bundle: Path | None  # None for --dry-run
    archive: Path | None
    report: Report | None
    plan: Plan


def default_sample() -> dict[str, Path]:
    """The embedded sample that `edgepack pack` with no model packs."""
    return {"model": SAMPLE / "model.onnx", "calib": SAMPLE / "calib.npz", "eval": SAMPLE / "eval.npz"}


def _threads(recipe: Recipe, target: Target) -> int:
    return recipe.threads or target.bench.threads or physical_cores()


def _load_data(path, specs, kind, *, labels=False, num_classes=None):
    from .data import load_dataset

    if path is None:
        return None
    return load_dataset(Path(path), specs, kind=kind, require_labels=labels, num_classes=num_classes)


def _num_classes(outputs) -> int | None:
    if outputs and len(outputs[0].shape) == 2 and isinstance(outputs[0].shape[1], int):
        return outputs[0].shape[1]
    return None


def pack(
    model: str | Path | None = None,
    *,
    target: str | Path = "cpu-x86",
    out: str | Path | None = None,
    calib: str | Path | None = None,
    eval: str | Path | None = None,
    train: str | Path | None = None,
    weights: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    recipe: Recipe | None = None,
    force: bool = False,
    archive: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    keep_work: bool = False,
    on_event: Callable[..., None] = _noop,
) -> PackResult:
    """Compress `model` for `target`, measure every candidate, write the best one as a verified bundle."""
    from .describe import file_sha256, io_specs
    from .model import load_model

    if model is None:
        sample = default_sample()
        model, calib, eval = sample["model"], calib or sample["calib"], eval or sample["eval"]
    recipe = recipe or Recipe()
    tgt = load_target(target if target else recipe.target)
    recipe = recipe.model_copy(update={"target": tgt.name})
    out = Path(out) if out else default_out(model, tgt.name)

    on_event("phase", name="load")
    source = load_model(model, weights=Path(weights) if weights else None, input_shapes=input_shapes,
                        allow_pickle=allow_pickle)
    if source.format is not ModelFormat.TORCH:
        from .lazy import import_without_torch

        import_without_torch("onnxruntime.tools", "nncf")
    # plan first: a step that needs PyTorch or --train fails before any data is read
    the_plan = make_plan(tgt, recipe, model_format=source.format, has_calib=calib is not None,
                         has_train=train is not None, has_eval=eval is not None)
    in_specs, out_specs = io_specs(source)
    classes = _num_classes(out_specs)
    calib_ds = _load_data(calib, in_specs, "calib")
    eval_ds = _load_data(eval, in_specs, "eval", num_classes=classes)
    train_ds = _load_data(train, in_specs, "train", labels=True, num_classes=classes)
    for w in the_plan.warnings:
        log.warning(w)
    if dry_run:
        return PackResult(None, None, None, the_plan)
    _check_out(out, force)

    work = Path(tempfile.mkdtemp(prefix="edgepack-work-"))
    try:
        report, chosen, scoring, feeds = _build_and_measure(source, the_plan, calib_ds, eval_ds, train_ds, work, on_event)
        if chosen is None:
            failed: dict[str, list[str]] = {}  # reason -> candidates (ov int8 and fp32 often fail alike)
            for c in report.candidates:
                if c.status in ("failed", "skipped"):
                    failed.setdefault(c.error or "unknown error", []).append(c.name)
            raise EdgepackError(f"no candidate could be built or run for target '{tgt.name}'"
                                + (": " + "; ".join(f"{', '.join(n)}: {r}" for r, n in failed.items()) if failed else ""),
                                hint="re-export the model with operators the target's runtime supports, "
                                     "or choose another --target")
        if strict and not chosen.within_budget:
            raise BudgetError(f"no candidate is within the accuracy budget for target '{tgt.name}' (--strict): "
                              + report.reason.split(": ", 1)[-1],
                              hint="raise --max-drop, pass calibration data closer to real inputs, or try --precision fp32")
        on_event("phase", name="write")
        from .bundle import write_bundle
        from .report import write_reports
        from .writer import bundle_manifest, bundle_readme, reference_io

        report_files = write_reports(report, work / "report")
        ref_in, ref_out, tol = reference_io(chosen, scoring)
        manifest = bundle_manifest(report, chosen, the_plan, source, file_sha256(source.files or (source.path,)),
                                   in_specs, out_specs, tol)
        bundle = write_bundle(out, model_files=list(chosen.artifact.files or (chosen.artifact.path,)),
                              manifest=manifest, reference_inputs=ref_in, reference_outputs=ref_out,
                              report_files=report_files, readme=bundle_readme(manifest, report), force=force,
                              archive=archive)
        arch = bundle.with_name(bundle.name + ".tar.gz") if archive else None
        return PackResult(bundle, arch if arch and arch.exists() else None, report, the_plan)
    finally:
        if keep_work:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def default_out(model, target_name: str) -> Path:
    """dist/<model>-<target>; a file named model.* takes its folder's name."""
    p = Path(str(model).split(":")[0])
    stem = p.parent.name if p.stem in ("model", "") else p.stem
    return Path("dist") / f"{stem or 'bundle'}-{target_name}"


def _check_out(out: Path, force: bool) -> None:
    from .bundle import is_bundle

    if out.exists() and not force:
        raise EdgepackError(f"{out} already exists", hint="pass --force to replace a bundle, or choose another --out")
    if out.exists() and force and not is_bundle(out):
        raise EdgepackError(f"{out} exists and is not an edgepack bundle; --force only replaces bundles")


def _scoring_data(eval_ds, calib_ds, in_specs, seed):
    from .data import dataset_from_arrays, synthetic_inputs

    if eval_ds is not None:
        return eval_ds
    if calib_ds is not None:
        return calib_ds
    return dataset_from_arrays(synthetic_inputs(in_specs, 64, seed), None, source="random inputs")


def _build_and_measure(source: Artifact, the_plan: Plan, calib_ds, eval_ds, train_ds, work: Path, on_event):
    from . import pipeline as pl
    from .fidelity import compare, run_dataset
    from .describe import io_specs
    from .export import export_onnx
    from .runtimes import open_session
    from .target import RuntimeSpec
    from .types import RuntimeName

    tgt, recipe = the_plan.target, the_plan.recipe
    threads = _threads(recipe, tgt)
    ctx = Context(workdir=work / "shared", target=tgt, calib=calib_ds, eval=eval_ds, train=train_ds, seed=recipe.seed,
                  progress=lambda m, f=None: on_event("progress", message=m, fraction=f), events=on_event)
    # The fp32 reference: the unmodified source model as ONNX, run by ONNX Runtime on the CPU.
    opset = next((s.params.get("opset", 17) for s in the_plan.shared if s.kind == "export-onnx"), 17)
    reference = source if source.format is ModelFormat.ONNX else export_onnx(source, work / "reference", opset=opset)
    in_specs, out_specs = io_specs(reference)
    cpu = RuntimeSpec(runtime=RuntimeName.ONNXRUNTIME, provider="CPUExecutionProvider")
    on_event("phase", name="reference")
    try:
        ref_session = open_session(reference, cpu, threads=threads)
    except ModelError as e:
        op = _unsupported_op(str(e))
        if op is None:
            raise
        raise ModelError(f"operator {op} is not supported by onnxruntime (CPUExecutionProvider), which target "
                         f"'{tgt.name}' needs for the fp32 reference",
                         hint="re-export the model with standard ONNX operators") from e
    data = _scoring_data(eval_ds, calib_ds, in_specs, recipe.seed)
    ref_out = run_dataset(ref_session, data, pl.eval_batch(ref_session))
    labels = getattr(data, "labels", None)
    ref_fid = compare(ref_out, ref_out, labels)
    scoring = pl.Scoring(data, ref_out, labels, ref_fid.accuracy, recipe.max_drop,
                         tgt.fidelity.min_top1_agreement, tgt.fidelity.min_cosine)

    on_event("phase", name="shared steps")
    shared_steps = tuple(s for s in the_plan.shared if not (s.kind == "export-onnx" and source.format is not ModelFormat.TORCH))
    has_torch_steps = any(s.kind not in ("export-onnx", "fix-shapes") for s in shared_steps)
    if source.format is ModelFormat.TORCH and not has_torch_steps:
        shared_steps = tuple(s for s in shared_steps if s.kind != "export-onnx")
        base, shared_records = pl.run_steps(reference, shared_steps, ctx, on_event)
    else:
        base, shared_records = pl.run_steps(source, shared_steps, ctx, on_event)

    def make_ctx(cp):
        return Context(workdir=work / cp.name, target=tgt, runtime=cp.runtime, calib=calib_ds, eval=eval_ds,
                       train=train_ds, seed=recipe.seed, progress=ctx.progress, events=on_event)

    built = pl.build_candidates(base, the_plan.candidates, make_ctx, on_event)
    for b in built:
        b.records = shared_records + b.records
        pl.score(b, scoring, threads, on_event)
    if recipe.guard:
        for b in list(built):
            if pl.needs_guard(b) and b.plan.runtime.runtime is RuntimeName.ONNXRUNTIME:
                on_event("candidate", name=b.plan.name + "-guarded", phase="guard")
                g = pl.ort_guard(b, base, scoring, make_ctx(b.plan), threads)
                g.records = shared_records + g.records
                pl.score(g, scoring, threads, on_event)
                built.append(g)
    feeds = {k: v[:1] for k, v in next(iter(data.batches(1))).items()}
    pl.time_candidates(built, feeds, tgt, threads, recipe.bench_time_s, on_event)
    chosen, reason = pl.choose(built, tgt, scoring)
    for b in built:  # only the chosen one's timing session is still needed (batch sweep)
        if b is not chosen:
            b.session = None
    warnings = list(the_plan.warnings)  # noise warnings are derived from the numbers by report.py
    if chosen is not None and not chosen.within_budget:
        warnings.append(reason + " (pack --strict exits 3 instead)")
    for b in built:
        why = pl.over_budgets(b, tgt) if b.ok else None
        if why:
            b.notes.append(f"over the profile's budget: {why}")
            if b is chosen:
                warnings.append(f"{b.plan.name} is over the profile's budget: {why}")
    report = _report(source, reference, the_plan, built, chosen, reason, scoring, threads, warnings, in_specs, out_specs)
    if chosen is not None:
        report = _add_profiles(report, chosen, feeds, recipe, tgt)
    return report, chosen, scoring, feeds


def _unsupported_op(message: str) -> str | None:
    """The operator named by ONNX Runtime's "not a registered function/op" / "no implementation" errors."""
    import re

    m = (re.search(r"([\w.]+:)?(\w+)\(-?\d+\) is not a registered function/op", message)
         or re.search(r"Could not find an implementation for (\w+)\(", message))
    return None if m is None else "".join(g for g in m.groups() if g)


def _report(source, reference, the_plan, built, chosen, reason, scoring, threads, warnings, in_specs, out_specs) -> Report:
    from . import pipeline as pl
    from .describe import count_parameters, file_sha256

    tgt = the_plan.target
    cands = tuple(pl.freeze(b) for b in built)
    skipped = tuple(CandidateResult(name=n, runtime="", device="", precision="", status="skipped", error=r)
                    for n, r in the_plan.skipped)
    base = next((c for c in cands if c.precision == "fp32" and c.status == "ok"), None)
    extra = {}
    for c in cands:
        for s in c.steps:
            if s.kind in ("prune", "structured-prune") and s.details and s.kind not in extra:
                extra[s.kind] = s.details
    from .steps.guard import guard_costs

    if guard_costs(cands):
        extra["guard"] = guard_costs(cands)
    return Report(
        schema_version=SCHEMA_VERSION,
        edgepack_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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


def _add_profiles(report: Report, chosen, feeds, recipe: Recipe, tgt: Target) -> Report:
    """The chosen candidate's op profile (taken while timing) and, when asked, its batch sweep."""
    from dataclasses import replace

    if chosen.latency is None:
        return report
    sweep = ()
    if recipe.batch_sizes != (1,):
        from .bench import batch_sweep
        from .profiling import tile

        try:
            sweep = tuple(batch_sweep(chosen.session, lambda b: tile(feeds, b), list(recipe.batch_sizes),
                                      tgt.bench, name=chosen.plan.name))
        except EdgepackError as e:
            report = replace(report, warnings=report.warnings + (f"batch sweep: {e}",))
    return replace(report, op_profile=tuple(chosen.op_profile), batch_sweep=sweep)


def verify(bundle: str | Path, *, selftest: bool = True, provider: str | None = None) -> dict:
    """Check a bundle's hashes and run its self-test; raises BundleError naming the first bad file."""
    from .bundle import verify_bundle

    return verify_bundle(Path(bundle), selftest=selftest, provider=provider)


def doctor() -> dict:
    """This host's CPU, runtimes and devices, and which targets can be measured here."""
    from .host import availability
    from .target import list_targets

    targets = {}
    for t in list_targets():
        reasons = [availability(r.runtime, r.provider or r.device, t.arch) for r in t.runtimes]
        ok = any(r is None for r in reasons)
        targets[t.name] = {"measurable": ok, "reason": None if ok else "; ".join(r for r in reasons if r)}
    return {"host": host_info().to_dict(), "targets": targets}


def profile(bundle: str | Path, *, batches: list[int] | None = None, time_s: float = 3.0, warmup: int = 10,
            threads: int | None = None, provider: str | None = None, out: Path | None = None) -> dict:
    """Latency of a bundle on this host, in the same JSON schema as the bundle's `run.py --benchmark`."""
    from .profiling import profile_bundle

    return profile_bundle(Path(bundle), batches=batches or [1], time_s=time_s, warmup=warmup,
                          threads=threads or physical_cores(), provider=provider, out=out)


def distill(teacher: str, *, teacher_weights=None, student=None, student_weights=None, width=None, train, eval,
            out: Path, temperature=4.0, alpha=0.5, train_opts: dict | None = None, seed=0, input_shapes=None,
            force=False, on_event: Callable[..., None] = _noop) -> dict:
    """Teacher → student by knowledge distillation; writes student.pt2 and student.onnx under `out`."""
    from .distillation import run_distill

    return run_distill(teacher, teacher_weights=teacher_weights, student=student, student_weights=student_weights,
                       width=width, train=train, eval=eval, out=Path(out), temperature=temperature, alpha=alpha,
                       train_opts=train_opts or {}, seed=seed, input_shapes=input_shapes, force=force, emit=on_event)
