"""Recipes: what pack will do, resolved from a target profile, flags and an optional recipe file.

A recipe names the shared steps (pruning, structured pruning) that run once on the source model, the
precisions to build as candidates, and the accuracy budget. ``plan()`` turns it into candidates, each a
runtime plus its own steps, and checks everything that can be checked before any work starts.
"""
from __future__ import annotations

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
    guard: bool = True  # accuracy guard when int8 breaks the budget
    batch_sizes: tuple[int, ...] = (1,)
    bench_time_s: float | None = None  # per-candidate latency budget; None: the target's
    threads: int | None = None


def load_recipe(path: Path) -> Recipe:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StepError(f"recipe file {path} not found") from e
    except tomllib.TOMLDecodeError as e:
        raise StepError(f"{path}: not valid TOML: {e}") from e
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise StepError(validation_message(e, str(path))) from e


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    data = recipe.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


@dataclass(frozen=True)
class CandidatePlan:
    name: str
    runtime: RuntimeSpec
    precision: Precision
    steps: tuple[StepSpec, ...]
    arch: str = "any"  # the target's CPU architecture (latency measured only on a matching host)


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
    # The fp32 reference on the first runtime is always built: every other candidate is judged against it.
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
            if steps is None:
                skipped.append((name, f"{spec.runtime} has no {p.value} path"))
                continue
            if p is Precision.INT8 and not has_calib:
                skipped.append((name, "static int8 needs calibration data: pass --calib calib.npz"))
                warnings.append(f"{name} skipped: static int8 needs calibration data; pass --calib DIR|FILE.npz to enable it")
                continue
            candidates.append(CandidatePlan(name, spec, p, steps, target.arch))
    if not candidates:
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
                      train_opts: dict | None = None) -> Recipe:
    """Flags override the recipe file; only flags the user gave change anything."""
    r = base or Recipe()
    upd: dict[str, Any] = {}
    if target:
        upd["target"] = target
    if precision:
        upd["precisions"] = tuple(p.strip() for item in precision for p in item.split(",") if p.strip())
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
    try:
        return Recipe.model_validate({**r.model_dump(), **upd})
    except ValidationError as e:
        raise EdgepackError(validation_message(e, "invalid options")) from e
