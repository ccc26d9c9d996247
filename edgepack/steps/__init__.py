"""Compression steps: one registry, filled by a decorator in each step module.

A step is ``fn(artifact, config, ctx) -> (artifact, StepRecord)``. It writes only under
``ctx.step_dir(kind)`` and never changes its input files.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.errors import StepError, validation_message

if TYPE_CHECKING:
    from edgepack.data import Dataset
    from edgepack.target import RuntimeSpec, Target
    from edgepack.types import Artifact, StepRecord


class StepConfig(BaseModel):
    """Base of every step's parameters (read from recipes and flags: unknown keys are errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Step:
    kind: str
    config: type[StepConfig]
    fn: Callable[..., tuple[Artifact, StepRecord]]
    needs: tuple[str, ...] = ()  # "torch", "calib", "train", "eval"
    doc: str = ""


STEPS: dict[str, Step] = {}
_MODULES = ("export", "graph", "quantize", "guard", "fp16", "int4", "openvino", "ovguard", "prune", "structured", "distill")


def register(kind: str, config: type[StepConfig], *, needs: tuple[str, ...] = ()):
    def deco(fn):
        STEPS[kind] = Step(kind, config, fn, needs, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def load_steps() -> dict[str, Step]:
    """Import every step module (cheap: heavy imports happen inside the step functions)."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return STEPS


def get_step(kind: str) -> Step:
    steps = load_steps()
    if kind not in steps:
        raise StepError(f"unknown step '{kind}'", hint=f"known steps: {', '.join(sorted(steps))}")
    return steps[kind]


def make_config(kind: str, params: dict[str, Any]) -> StepConfig:
    step = get_step(kind)
    try:
        return step.config.model_validate(params)
    except ValidationError as e:
        raise StepError(validation_message(e, f"step '{kind}'")) from e


@dataclass
class Context:
    """What a step may use besides its input artifact."""

    workdir: Path
    target: Target
    runtime: RuntimeSpec | None = None  # the runtime of the candidate being built (None for shared steps)
    calib: Dataset | None = None
    eval: Dataset | None = None
    train: Dataset | None = None
    seed: int = 0
    progress: Callable[..., None] = field(default=lambda message, fraction=None: None)
    events: Callable[..., None] = field(default=lambda event, **data: None)  # structured events, e.g. "epoch" (see cli/progress.py)
    # for steps that keep a budget (the accuracy guard): score a model file, higher is better
    evaluate: Callable[[Path], float] | None = None
    reference_score: float = 1.0
    max_drop: float = 0.0
    score_outputs: Callable[[list], float] | None = None  # the same score, from a model's outputs on scoring_data
    scoring_data: Dataset | None = None
    output_axes: tuple[int | None, ...] = ()  # batch axis of each output
    _counter: list[int] = field(default_factory=lambda: [0])

    def step_dir(self, kind: str) -> Path:
        self._counter[0] += 1
        d = self.workdir / f"{self._counter[0]:02d}-{kind}"
        d.mkdir(parents=True, exist_ok=True)
        return d
