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

from .errors import StepError, TargetError
from .target import RuntimeSpec, Target
from .types import ModelFormat, Precision, RuntimeName

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
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise StepError(f"{path}: {where}: {msg}") from e


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


def _short(spec: RuntimeSpec) -> str:
    rt = "ort" if spec.runtime is RuntimeName.ONNXRUNTIME else "ov"
    dev = (spec.provider or spec.device or "").replace("ExecutionProvider", "").lower()
    return f"{rt}-{dev}"


def candidate_steps(spec: RuntimeSpec, precision: Precision) -> tuple[StepSpec, ...] | None:
    """Steps that build one candidate from the shared ONNX model; None when the runtime can't do it."""
    if spec.runtime is RuntimeName.ONNXRUNTIME:
        level = "extended" if spec.provider == "CPUExecutionProvider" else "basic"
        table = {
            Precision.FP32: [StepSpec(kind="optimize-graph", params={"level": level})],
            Precision.INT8: [StepSpec(kind="quantize-static")],
            Precision.INT8_DYNAMIC: [StepSpec(kind="quantize-dynamic")],
            Precision.FP16: [StepSpec(kind="fp16")],
            Precision.INT4: [StepSpec(kind="int4")],
        }
    else:
        table = {
            Precision.FP32: [StepSpec(kind="convert-ir")],
            Precision.FP16: [StepSpec(kind="convert-ir", params={"compress_to_fp16": True})],
            Precision.INT8: [StepSpec(kind="convert-ir"), StepSpec(kind="nncf-int8", params=_nncf_params(spec))],
            Precision.INT4: [StepSpec(kind="convert-ir"), StepSpec(kind="nncf-int4")],
        }
    steps = table.get(precision)
    return tuple(steps) if steps else None


def _nncf_params(spec: RuntimeSpec) -> dict:
    return {"preset": "performance" if spec.device == "NPU" else "mixed"}


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
    from .steps import get_step, make_config

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
        for p in wanted:
            name = f"{_short(spec)}-{p.value}"
            steps = candidate_steps(spec, p)
            if steps is None:
                skipped.append((name, f"{spec.runtime.value} has no {p.value} path"))
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
