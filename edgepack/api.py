"""The Python API that the CLI calls one to one: pack, profile, verify, doctor, distill."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack import pipeline
from edgepack.errors import BudgetError, EdgepackError
from edgepack.recipe import Plan, Recipe
from edgepack.recipe import plan as make_plan
from edgepack.target import load_target
from edgepack.types import ModelFormat, Report

log = logging.getLogger(__name__)


def _noop(*_a, **_k) -> None:
    pass


@dataclass(frozen=True)
class PackResult:
    bundle: Path | None  # None for --dry-run
    archive: Path | None
    report: Report | None
    plan: Plan


def samples_dir() -> Path:
    """The shipped samples (inside the package when installed, else the repository's samples/)."""
    inside = Path(__file__).parent / "samples"
    return inside if inside.is_dir() else Path(__file__).resolve().parent.parent / "samples"


def default_sample() -> dict[str, Path]:
    """The embedded sample that `edgepack pack` with no model packs."""
    d = samples_dir() / "digits"
    return {"model": d / "model.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _load_data(path, specs, kind, axes, *, labels=False, num_classes=None):
    from edgepack.data import load_dataset

    if path is None:
        return None
    return load_dataset(Path(path), specs, kind=kind, require_labels=labels, num_classes=num_classes, axes=axes)


def _with_shapes(specs, shapes: dict[str, tuple[int, ...]] | None):
    """Input specs with the user's --input-shape filled in (for ONNX models with unknown dims)."""
    from dataclasses import replace

    if not shapes:
        return specs
    names = [s.name for s in specs]
    if len(specs) == 1 and list(shapes) == ["input"] and names != ["input"]:
        shapes = {names[0]: shapes["input"]}
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise EdgepackError(f"--input-shape names no input {', '.join(unknown)}", hint=f"the model's inputs: {', '.join(names)}")
    out = []
    for s in specs:
        want = shapes.get(s.name)
        if want is not None and len(want) != len(s.shape):
            raise EdgepackError(f"--input-shape {s.name}={','.join(map(str, want))}: input '{s.name}' has rank {len(s.shape)}")
        out.append(s if want is None else replace(s, shape=tuple(
            d if isinstance(d, int) and d > 0 else w for d, w in zip(s.shape, want))))
    return out


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
    sign_key: str | Path | None = None,
    on: tuple[str, ...] | list[str] = (),
    devices_file: str | Path | None = None,
    choose_by: str | None = None,
    on_event: Callable[..., None] = _noop,
) -> PackResult:
    """Compress `model` for `target`, measure every candidate, write the best one as a verified bundle.

    `sign_key`: an Ed25519 private key file; the bundle gets a signature.json (`verify --trusted-key`)."""
    from edgepack.model.describe import file_sha256, io_specs
    from edgepack.model.load import load_model

    if model is None:
        sample = default_sample()
        model, calib, eval = sample["model"], calib or sample["calib"], eval or sample["eval"]
    recipe = recipe or Recipe()
    tgt = load_target(target if target else recipe.target)
    recipe = recipe.model_copy(update={"target": tgt.name})
    out = Path(out) if out else default_out(model, tgt.name)

    if sign_key is not None:  # a bad key fails now, not after minutes of work
        from edgepack.bundle.sign import load_private_key

        load_private_key(Path(sign_key))
    on_event("phase", name="load")
    if dry_run and _dry_run_factory(model):  # --dry-run never imports a file.py (importing runs it)
        return PackResult(None, None, None, _factory_plan(model, tgt, recipe, calib, train, eval))
    source = load_model(model, weights=Path(weights) if weights else None, input_shapes=input_shapes,
                        allow_pickle=allow_pickle)
    if source.format is not ModelFormat.TORCH:
        from edgepack.lazy import import_without_torch

        import_without_torch("onnxruntime.tools")
    # plan first: a step that needs PyTorch or --train fails before any data is read
    the_plan = make_plan(tgt, recipe, model_format=source.format, has_calib=calib is not None,
                         has_train=train is not None, has_eval=eval is not None)
    from edgepack.data import batch_axes

    in_specs, out_specs = io_specs(source)
    if source.format is not ModelFormat.TORCH:
        in_specs = _with_shapes(in_specs, input_shapes)
    axes = batch_axes(in_specs, recipe.batch_axes)
    classes = _num_classes(out_specs)
    calib_ds = _load_data(calib, in_specs, "calib", axes)
    eval_ds = _load_data(eval, in_specs, "eval", axes, num_classes=classes)
    train_ds = _load_data(train, in_specs, "train", axes, labels=True, num_classes=classes)
    if dry_run:  # the plan's warnings travel with the plan (and with the report below), printed once
        return PackResult(None, None, None, the_plan)
    _check_out(out, force)

    from edgepack.tempdirs import make_temp

    work = make_temp("work")  # edgepack-work-<pid>-*: swept by a later run if this one is killed
    try:
        remote = None
        if on:
            from edgepack.devices.candidates import Remote

            remote = Remote(tuple(on), Path(devices_file) if devices_file else None, choose_by)
        outcome = pipeline.run(source, the_plan, calib=calib_ds, eval=eval_ds, train=train_ds, work=work,
                               emit=on_event, in_specs=in_specs, remote=remote)
        report, chosen = outcome.report, outcome.chosen
        if chosen is None:
            raise EdgepackError(f"no candidate could be built or run for target '{tgt.name}'" + _failures(report),
                                hint="re-export the model with operators the target's runtime supports, "
                                     "or choose another --target")
        if strict and not chosen.within_budget:
            raise BudgetError(f"no candidate is within the accuracy budget for target '{tgt.name}' (--strict): "
                              + report.reason.split(": ", 1)[-1],
                              hint="raise --max-drop, pass calibration data closer to real inputs, or try --precision fp32")
        on_event("phase", name="write")
        from edgepack.bundle.manifest import bundle_manifest, bundle_readme, reference_io
        from edgepack.bundle.write import write_bundle
        from edgepack.report.document import write_reports

        report_files = write_reports(report, work / "report")
        ref_in, ref_out, tol = reference_io(chosen, outcome.scoring)
        manifest = bundle_manifest(report, chosen, the_plan, source, file_sha256(source.files or (source.path,)),
                                   in_specs, out_specs, tol, outcome.scoring)
        bundle = write_bundle(out, model_files=list(chosen.artifact.files or (chosen.artifact.path,)),
                              manifest=manifest, reference_inputs=ref_in, reference_outputs=ref_out,
                              report_files=report_files, readme=bundle_readme(manifest, report), force=force,
                              archive=archive, sign_key=Path(sign_key) if sign_key is not None else None)
        arch = bundle.with_name(bundle.name + ".tar.gz") if archive else None
        return PackResult(bundle, arch if arch and arch.exists() else None, report, the_plan)
    finally:
        if keep_work:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _dry_run_factory(model) -> bool:
    from edgepack.model.load import factory_spec

    return factory_spec(model) is not None


def _factory_plan(model, tgt, recipe: Recipe, calib, train, eval) -> Plan:
    """The plan for a file.py:build model without importing it: its inputs and the data are not checked."""
    from dataclasses import replace

    from edgepack.errors import ModelError
    from edgepack.model.load import factory_spec

    spec = factory_spec(model)
    assert spec is not None
    if not spec[0].is_file():
        raise ModelError(f"model file {spec[0]} not found")
    the_plan = make_plan(tgt, recipe, model_format=ModelFormat.TORCH, has_calib=calib is not None,
                         has_train=train is not None, has_eval=eval is not None)
    note = (f"{spec[0]} was not imported (--dry-run runs no code from it): its inputs and outputs, and the data "
            "files against them, are checked by the real pack")
    return replace(the_plan, warnings=(*the_plan.warnings, note))


def _failures(report: Report) -> str:
    """': name, name: reason; ...' for the candidates that failed or were skipped (grouped by reason)."""
    failed: dict[str, list[str]] = {}
    for c in report.candidates:
        if c.status in ("failed", "skipped"):
            failed.setdefault(c.error or "unknown error", []).append(c.name)
    return (": " + "; ".join(f"{', '.join(n)}: {r}" for r, n in failed.items())) if failed else ""


def default_out(model, target_name: str) -> Path:
    """dist/<model>-<target>; a file named model.* takes its folder's name."""
    p = Path(str(model).split(":")[0])
    stem = p.parent.name if p.stem in ("model", "") else p.stem
    return Path("dist") / f"{stem or 'bundle'}-{target_name}"


def _check_out(out: Path, force: bool) -> None:
    """Fail before any work when --out is taken (bundle/write.py checks again at the end)."""
    from edgepack.bundle.manifest import replace_refusal

    if out.exists() and not force:
        raise EdgepackError(f"{out} already exists", hint="pass --force to replace a bundle, or choose another --out")
    why = replace_refusal(out) if (out.exists() or out.is_symlink()) and force else None
    if why:
        raise EdgepackError(why)


def verify(bundle: str | Path, *, selftest: bool = True, provider: str | None = None,
           trusted_key: str | Path | None = None, allow_custom_runner: bool = False) -> dict:
    """Check a bundle's hashes (and its signature against `trusted_key`) and run edgepack's runner's self-test on
    it; raises BundleError naming the first bad file."""
    from edgepack.bundle.verify import verify_bundle

    return verify_bundle(Path(bundle), selftest=selftest, provider=provider,
                         trusted_key=Path(trusted_key) if trusted_key is not None else None,
                         allow_custom_runner=allow_custom_runner)


def doctor() -> dict:
    """This host's CPU, runtimes and devices, and which targets can be measured here."""
    from edgepack.host import host_info
    from edgepack.runtimes import availability
    from edgepack.target import list_targets

    targets = {}
    for t in list_targets():
        reasons = [availability(r, t.arch) for r in t.runtimes]
        ok = any(r is None for r in reasons)
        targets[t.name] = {"measurable": ok, "reason": None if ok else "; ".join(dict.fromkeys(r for r in reasons if r))}
    return {"host": host_info().to_dict(), "targets": targets}


def profile(bundle: str | Path, *, batches: list[int] | None = None, time_s: float = 3.0, warmup: int = 10,
            threads: int | None = None, provider: str | None = None, out: Path | None = None) -> dict:
    """Latency of a bundle on this host, in the same JSON schema as the bundle's `run.py --benchmark`."""
    from edgepack.bundle.profile import profile_bundle

    return profile_bundle(Path(bundle), batches=batches or [1], time_s=time_s, warmup=warmup,
                          threads=threads, provider=provider, out=out)


def distill(teacher: str, *, teacher_weights=None, student=None, student_weights=None, width=None, train, eval,
            out: Path, temperature=4.0, alpha=0.5, train_opts: dict | None = None, seed=0, input_shapes=None,
            force=False, on_event: Callable[..., None] = _noop) -> dict:
    """Teacher → student by knowledge distillation; writes student.pt2 and student.onnx under `out`."""
    from edgepack.distillation import run_distill

    return run_distill(teacher, teacher_weights=teacher_weights, student=student, student_weights=student_weights,
                       width=width, train=train, eval=eval, out=Path(out), temperature=temperature, alpha=alpha,
                       train_opts=train_opts or {}, seed=seed, input_shapes=input_shapes, force=force, emit=on_event)
