"""Knowledge distillation: train a smaller student on a torch teacher's soft targets.

Without a given student, the student is the teacher with every prunable layer slimmed to ``width``
of its channels (torch_pruning on a copy, so any architecture works); it starts from the kept
teacher weights, which trains faster than a random start.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

from pydantic import Field

from edgepack.errors import ModelError, StepError
from edgepack.steps import StepConfig, register
from edgepack.steps.train import Progress, TrainConfig, evaluate, fit
from edgepack.types import Artifact, ModelFormat, StepRecord

log = logging.getLogger(__name__)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def slim_copy(module, example_inputs: tuple, width: float):
    """A copy of ``module`` with (1 - width) of the channels of every hidden layer removed."""
    from edgepack.steps.structured import channel_prune

    student = copy.deepcopy(module)
    return channel_prune(student, example_inputs, 1.0 - width, importance="l1")


def distill(teacher: Artifact, *, student: Artifact | None = None, width: float | None = None, train,
            eval, cfg: TrainConfig, temperature: float = 4.0, alpha: float = 0.5, seed: int = 0,
            progress: Progress | None = None) -> tuple[Artifact, dict]:
    """Train a student against ``teacher``; loss alpha*KL(T)*T^2 + (1-alpha)*CE.

    Give either ``student`` (a TORCH artifact) or ``width`` (0 < width < 1). Returns the student as a
    TORCH artifact (the teacher's example inputs) and a teacher/student comparison.
    """
    from edgepack.steps.structured import check_module, example_tuple

    if teacher.format is not ModelFormat.TORCH:
        raise StepError(f"distillation needs a PyTorch teacher, got {teacher.format.value}",
                        hint="load the model from a .pt2, TorchScript or a Python factory")
    if (student is None) == (width is None):
        raise StepError("distillation needs exactly one of a student model or a width (e.g. width 0.5)")
    if not 0 < temperature:
        raise StepError(f"distillation temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise StepError(f"distillation alpha must be in [0, 1], got {alpha}")
    examples = example_tuple(teacher.example_inputs, train)
    if student is None:
        if not 0 < width < 1:
            raise StepError(f"student width must be between 0 and 1, got {width}")
        check_module(teacher.module, "deriving a student by width")
        module = slim_copy(teacher.module, examples, width)
        init = f"teacher slimmed to width {width} (torch_pruning, L1 importance), trained from the kept weights"
    else:
        if student.format is not ModelFormat.TORCH or student.module is None:
            raise StepError("the student must be a PyTorch model", hint="give a .pt2 or a Python factory")
        module = copy.deepcopy(student.module)
        init = "given student, trained from its own weights"

    t0 = time.perf_counter()
    result = fit(module, train, eval, cfg, teacher=teacher.module, temperature=temperature, alpha=alpha,
                 progress=progress, seed=seed)
    seconds = time.perf_counter() - t0
    t_acc = evaluate(teacher.module, eval) if eval is not None and eval.labels is not None else None
    s_acc = evaluate(module, eval) if eval is not None and eval.labels is not None else None
    t_params, s_params = _params(teacher.module), _params(module)
    info = {
        "teacher": {"accuracy": t_acc, "parameters": t_params},
        "student": {"accuracy": s_acc, "parameters": s_params},
        "param_ratio": round(s_params / t_params, 4),
        "accuracy_drop": None if t_acc is None else round(t_acc - s_acc, 4),
        "student_init": init, "width": width, "temperature": temperature, "alpha": alpha,
        "epochs_run": result.epochs_run, "train_seconds": round(seconds, 2), "history": result.history,
    }
    out = replace(teacher, module=module, example_inputs=teacher.example_inputs,
                  notes=teacher.notes + (f"distilled student: {s_params:,} of {t_params:,} parameters",))
    return out, info


def save_torch_artifact(artifact: Artifact, out_dir: str | Path) -> Path:
    """Write the module as a torch.export program ``model.pt2`` (dynamic batch when possible)."""
    import torch

    from edgepack.steps.structured import example_tuple

    if artifact.format is not ModelFormat.TORCH or artifact.module is None:
        raise ModelError("only a PyTorch model can be saved as .pt2")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = example_tuple(artifact.example_inputs)
    module = artifact.module.eval()
    # a batch of 1 would be specialised; export with batch 2 and mark dim 0 dynamic
    batch2 = tuple(torch.cat([x[:1], x[:1]]) for x in examples)
    dim = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(module, batch2, dynamic_shapes=tuple({0: dim} for _ in batch2))
    except Exception as e:
        log.info("dynamic batch export failed (%s); exporting with static shapes", e)
        try:
            program = torch.export.export(module, examples)
        except Exception as e2:
            raise ModelError(f"torch.export could not export the model: {type(e2).__name__}: {e2}") from e2
    path = out_dir / "model.pt2"
    torch.export.save(program, str(path))
    return path


class DistillConfig(StepConfig, TrainConfig):
    """Student width and the distillation loss, plus the training controls of TrainConfig (flat keys)."""

    width: float = Field(..., gt=0, lt=1)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


@register("distill", DistillConfig, needs=("torch", "train"))
def distill_step(artifact: Artifact, config: DistillConfig, ctx) -> tuple[Artifact, StepRecord]:
    """Replace the model with a student of `width` trained on the teacher's soft targets."""
    if ctx.train is None:
        raise StepError("distillation trains on training data: pass --train train.npz")
    t0 = time.perf_counter()

    def progress(epoch, total, loss, acc=None):
        ctx.events("epoch", epoch=epoch, total=total, loss=loss, eval_acc=acc)

    student, info = distill(artifact, width=config.width, train=ctx.train, eval=ctx.eval,
                            cfg=config.train_config(), temperature=config.temperature, alpha=config.alpha,
                            seed=ctx.seed, progress=progress)
    t, s = info["teacher"], info["student"]
    summary = f"student of width {config.width}: {s['parameters']:,} of {t['parameters']:,} parameters"
    if s["accuracy"] is not None:
        summary += f", accuracy {t['accuracy']:.4f} -> {s['accuracy']:.4f}"
    return student, StepRecord("distill", config.model_dump(), True, summary, info, time.perf_counter() - t0)
