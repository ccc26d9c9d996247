"""Recipes: what pack will do, resolved from a target profile, flags and an optional recipe file.

A recipe names the shared steps (pruning, structured pruning) that run once on the source model, the
precisions to build as candidates, and the accuracy budget. ``plan()`` turns it into candidates, each a
runtime plus its own steps, and checks everything that can be checked before any work starts.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepack.errors import EdgepackError, StepError, TargetError, validation_message
from edgepack.target import RuntimeSpec, Target
from edgepack.types import ModelFormat, Precision

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class StepSpec(BaseModel):
    model_config = _FROZEN
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """What the user asked for; saved with --save-recipe and read back with --recipe."""

    model_config = _FROZEN
    target: str = "cpu-x86"
    precisions: tuple[Precision, ...] = ()  # empty: the target's list
    max_drop: float = 0.01  # accuracy drop allowed, as a fraction (0.01 = 1 point)
    seed: int = 0
    steps: tuple[StepSpec, ...] = ()  # shared steps on the source model (prune, structured-prune)
    guard: bool | None = None  # accuracy guard when int8 breaks the budget: None where it could win, True always
    batch_sizes: tuple[int, ...] = (1,)
    bench_time_s: float | None = None  # per-candidate latency budget; None: the target's
    threads: int | None = None
    metrics: dict[str, str] = Field(default_factory=dict)  # output name -> metric kind (fidelity.KINDS)
    metric_fn: str | None = None  # "module:function" scoring (inputs, outputs) -> float, higher is better
    batch_axes: dict[str, int] = Field(default_factory=dict)  # input name -> its sample axis
    # what the recipe was made with; in the file relative to the file, in memory as given or resolved
    model: str | None = None  # a model file or file.py:fn
    weights: str | None = None
    calib: str | None = None
    eval: str | None = None
    train: str | None = None


PATH_FIELDS = ("model", "weights", "calib", "eval", "train")


def _split_model(text: str) -> tuple[str, str]:
    """'dir/model.py:build' -> ('dir/model.py', ':build'); other paths -> (path, '')."""
    file, sep, fn = text.rpartition(":")
    return (file, sep + fn) if sep and file.endswith(".py") and fn.isidentifier() else (text, "")


def recipe_paths(recipe: Recipe, fn) -> Recipe:
    """The recipe with fn(path) applied to each of its model and data paths (a factory keeps its :fn)."""
    upd = {}
    for key in PATH_FIELDS:
        value = getattr(recipe, key)
        if value:
            file, suffix = _split_model(value) if key == "model" else (value, "")
            upd[key] = fn(file) + suffix
    return recipe.model_copy(update=upd)


def load_recipe(path: Path) -> Recipe:
    from edgepack.safeio import parse_toml, read_text

    try:
        data = parse_toml(read_text(path, "recipe file", StepError))
    except tomllib.TOMLDecodeError as e:
        raise StepError(f"{path}: not valid TOML: {e}") from e
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise StepError(validation_message(e, str(path))) from e
    here = Path(path).parent  # paths in the file are relative to the file
    return recipe_paths(recipe, lambda p: p if Path(p).is_absolute() else os.path.normpath(here / p))


def recipe_to_toml(recipe: Recipe, base: Path | None = None) -> str:
    """TOML text of the recipe; model and data paths relative to `base` (the recipe file's folder)."""
    import tomli_w

    if base is not None:
        recipe = recipe_paths(recipe, lambda p: Path(os.path.relpath(os.path.abspath(p), os.path.abspath(base))).as_posix())
    data = recipe.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


ORIGINAL = "original"


@dataclass(frozen=True)
class CandidatePlan:
    name: str
    runtime: RuntimeSpec
    precision: Precision
    steps: tuple[StepSpec, ...]
    arch: str = "any"  # the target's CPU architecture (latency measured only on a matching host)
    original: bool = False  # the model exactly as given, on the target's first runtime: always measured
    eligible: bool = True  # may be chosen (the original is not when the user asked for pruning/distillation)


@dataclass(frozen=True)
class Plan:
    target: Target
    recipe: Recipe
    shared: tuple[StepSpec, ...]  # run once: prune/structured-prune, export, fix-shapes
    candidates: tuple[CandidatePlan, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (candidate, reason)
    warnings: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "target": self.target.name,
            "max_drop": self.recipe.max_drop,
            "shared_steps": [s.model_dump() for s in self.shared],
            "candidates": [
                {"name": c.name, "runtime": c.runtime.label, "precision": c.precision.value,
                 "steps": [s.model_dump() for s in c.steps]}
                for c in self.candidates
            ],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "warnings": list(self.warnings),
        }


def candidate_name(spec: RuntimeSpec, precision: Precision) -> str:
    """ort-cpu-int8, ov-gpu-fp16, ...: the backend's short name, the device, the precision."""
    from edgepack.runtimes import get_backend

    backend = get_backend(spec.runtime)
    dev = backend.device(spec).replace("ExecutionProvider", "").lower()
    return f"{backend.short}-{dev}-{precision.value}"


def plan(
    target: Target,
    recipe: Recipe,
    *,
    model_format: ModelFormat,
    has_calib: bool,
    has_train: bool,
    has_eval: bool,
    opset: int | None = None,
) -> Plan:
    """Resolve the recipe against the target and check it before any work starts."""
    from edgepack.runtimes import get_backend
    from edgepack.steps import get_step, make_config

    warnings: list[str] = []
    shared: list[StepSpec] = []
    for s in recipe.steps:
        step = get_step(s.kind)
        make_config(s.kind, s.params)  # validate now, fail before work
        if "torch" in step.needs and model_format is not ModelFormat.TORCH:
            raise StepError(
                f"step '{s.kind}' needs a PyTorch model it can rewrite, got {model_format.value}",
                hint="pass a Python factory and its weights: model.py:build --weights weights.pt",
            )
        if "train" in step.needs and not has_train:
            raise StepError(f"step '{s.kind}' fine-tunes on training data", hint="pass --train train.npz")
        shared.append(s)
    if model_format is ModelFormat.TORCH:
        shared.append(StepSpec(kind="export-onnx", params={"opset": opset or min(max(17, target.opset.min), target.opset.max)}))
    if target.shapes.policy == "static":
        shared.append(StepSpec(kind="fix-shapes"))

    precisions = recipe.precisions or target.precisions
    unknown = [p.value for p in recipe.precisions if p not in target.precisions]
    if unknown:
        allowed = ", ".join(p.value for p in target.precisions)
        raise TargetError(f"precision {', '.join(unknown)} is not offered by target '{target.name}'",
                          hint=f"it offers: {allowed}")
    candidates: list[CandidatePlan] = []
    skipped: list[tuple[str, str]] = []
    first = next((r for r in target.runtimes if get_backend(r.runtime).info()[0] is not None), None)
    if first is not None:  # the model as given, plainly run: what every other candidate must beat
        candidates.append(CandidatePlan(ORIGINAL, first, Precision.FP32, (), target.arch, original=True,
                                        eligible=not recipe.steps))
    wanted = list(precisions)
    for spec in target.runtimes:
        backend = get_backend(spec.runtime)
        if backend.info()[0] is None:
            why = f"{backend.name} is not installed" + (f": pip install edgepack[{backend.extra}]" if backend.extra else "")
            skipped += [(candidate_name(spec, p), why) for p in wanted]
            warnings.append(f"{spec.label} candidates skipped: {why}")
            continue
        for p in wanted:
            name = candidate_name(spec, p)
            steps = backend.candidate_steps(spec, p)
            run_spec, why_not = backend.spec_for(spec, p)
            if steps is not None and run_spec is None:
                skipped.append((name, why_not or "not on this host"))
                continue
            if steps is None:
                skipped.append((name, f"{spec.runtime} has no {p.value} path"))
                continue
            if p is Precision.INT8 and not has_calib:
                skipped.append((name, "static int8 needs calibration data: pass --calib calib.npz"))
                warnings.append(f"{name} skipped: static int8 needs calibration data; pass --calib DIR|FILE.npz to enable it")
                continue
            candidates.append(CandidatePlan(name, run_spec, p, steps, target.arch))
    if not any(not c.original for c in candidates):
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
        raise StepError(f"nothing to build for target '{target.name}': {reasons}")
    if not has_eval:
        warnings.append("no --eval data: candidates are judged by fidelity to fp32 on calibration or random inputs")
    return Plan(target, recipe, tuple(shared), tuple(candidates), tuple(skipped), tuple(warnings))


def parse_batches(text: str, flag: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16); EdgepackError for anything but positive integers."""
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise EdgepackError(f"{flag} {text!r}: expected batch sizes like 1,4,16") from None
    if not sizes or min(sizes) < 1:
        raise EdgepackError(f"{flag} {text!r}: batch sizes must be 1 or more")
    return sizes


def recipe_from_flags(base: Recipe | None, *, target=None, precision=(), max_drop=None, seed=None, guard=None,
                      batch=None, bench_time=None, threads=None, prune_threshold=None, sparsity=None,
                      sparsity_scope="global", prune_all_layers=False, structured_prune=None,
                      train_opts: dict | None = None, metric=(), metric_fn=None, batch_axis=()) -> Recipe:
    """Flags override the recipe file; only flags the user gave change anything."""
    r = base or Recipe()
    upd: dict[str, Any] = {}
    if target:
        upd["target"] = target
    if precision:
        upd["precisions"] = tuple(p.strip() for item in precision for p in item.split(",") if p.strip())
        valid = [p.value for p in Precision]
        bad = [p for p in upd["precisions"] if p not in valid]
        if bad:
            raise EdgepackError(f"--precision {bad[0]!r} is not a precision; choose from {', '.join(valid)}")
    if max_drop is not None:
        upd["max_drop"] = max_drop
    if seed is not None:
        upd["seed"] = seed
    if guard is not None:
        upd["guard"] = guard
    if batch:
        upd["batch_sizes"] = parse_batches(batch, "--batch")
    if bench_time is not None:
        if not bench_time > 0:
            raise EdgepackError(f"--bench-time {bench_time}: must be a positive number of seconds")
        upd["bench_time_s"] = bench_time
    if threads is not None:
        if threads < 1:
            raise EdgepackError(f"--threads {threads}: must be 1 or more")
        upd["threads"] = threads
    steps = list(r.steps)
    if prune_threshold is not None or sparsity is not None:
        params = {"scope": sparsity_scope, "skip_first_last": not prune_all_layers}
        params.update({"threshold": prune_threshold} if prune_threshold is not None else {"sparsity": sparsity})
        steps = [s for s in steps if s.kind != "prune"] + [StepSpec(kind="prune", params=params)]
    if structured_prune is not None:
        params = {"ratio": structured_prune, **{k: v for k, v in (train_opts or {}).items() if v is not None}}
        steps = [s for s in steps if s.kind != "structured-prune"]
        steps.insert(0, StepSpec(kind="structured-prune", params=params))
    upd["steps"] = tuple(steps)
    if metric:
        upd["metrics"] = {**r.metrics, **_metric_pairs(metric)}
    if metric_fn:
        upd["metric_fn"] = metric_fn
    if batch_axis:
        upd["batch_axes"] = {**r.batch_axes, **_pairs(batch_axis, "--batch-axis", "INPUT=AXIS", int)}
    try:
        return Recipe.model_validate({**r.model_dump(), **upd})
    except ValidationError as e:
        raise EdgepackError(validation_message(e, "invalid options")) from e


def _metric_pairs(values) -> dict[str, str]:
    """--metric values: the name ends at the last '=' followed by a kind, so that a gate's '>=' stays in the value
    ('pitch=regression@confidence>=0.7') and names may hold '=' or '@'."""
    from edgepack.fidelity import KINDS

    out: dict[str, str] = {}
    for v in values:
        m = re.fullmatch(rf"(.+)=((?:{'|'.join(KINDS)})(?:@.*)?)", str(v), re.DOTALL)
        out.update({m[1]: m[2]} if m else _pairs([v], "--metric", "OUTPUT=KIND", str))
    return out


def _pairs(values, flag: str, form: str, cast) -> dict:
    """['a=1', 'b=2'] -> {'a': cast('1'), ...}; EdgepackError naming the flag and the form otherwise."""
    out = {}
    for v in values:
        name, sep, val = str(v).rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = cast(val)
        except ValueError:
            raise EdgepackError(f"{flag} {v!r}: expected {form}") from None
    return out
