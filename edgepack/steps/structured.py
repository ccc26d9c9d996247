"""Structured pruning: remove whole channels with torch_pruning, then fine-tune on training data.

Unlike magnitude pruning this makes the dense model smaller and faster. It needs a PyTorch module
that torch_pruning can rewrite (a Python factory + weights), and labelled training data.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Literal

from pydantic import Field

from edgepack.errors import StepError
from edgepack.steps import StepConfig, register
from edgepack.steps.train import TrainConfig, evaluate, fit
from edgepack.types import Artifact, ModelFormat, StepRecord

log = logging.getLogger(__name__)

NEEDS_MODULE = ("needs a PyTorch model that can be rewritten: a Python factory + weights "
                "(model.py:build --weights w.pt); TorchScript and torch.export files won't do")
NEEDS_TRAIN = "structured pruning fine-tunes on training data: pass --train train.npz"


class StructuredPruneConfig(StepConfig, TrainConfig):
    """Channel ratio and importance, plus the fine-tuning controls of TrainConfig (flat keys)."""

    ratio: float = Field(..., gt=0, lt=1)
    importance: Literal["l1", "l2"] = "l1"
    round_to: int | None = Field(None, ge=1)

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


def check_module(module, what: str = "structured-prune"):
    """Raise StepError unless ``module`` is a plain nn.Module with Conv/Linear layers."""
    import torch

    if module is None or not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        raise StepError(f"{what} {NEEDS_MODULE}")
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    if not any(isinstance(m, kinds) for m in module.modules()):
        raise StepError(f"{what} found no Conv/Linear layer to prune: it {NEEDS_MODULE}")


def example_tuple(example_inputs, dataset=None) -> tuple:
    """Example inputs as a tuple of tensors (from the artifact, else one sample of the dataset)."""
    import torch

    if example_inputs is None and dataset is not None:
        example_inputs = tuple(torch.from_numpy(a[:1].copy()) for a in dataset.inputs.values())
    if example_inputs is None:
        raise StepError("the torch model has no example inputs", hint="give input shapes or an example_inputs() function")
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def classifier_layers(module, example_inputs: tuple) -> list:
    """The last Conv/Linear executed in a forward pass (its outputs are the classes: never pruned)."""
    import torch

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    order: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in module.modules()
             if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module.eval()
            module(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def count_ops(module, example_inputs: tuple) -> tuple[int, int]:
    """(FLOPs for one sample, parameters) as torch_pruning counts them."""
    import torch_pruning as tp

    one = tuple(x[:1] for x in example_inputs)
    flops, params = tp.utils.count_ops_and_params(module, one)
    return int(flops), int(params)


def channel_prune(module, example_inputs: tuple, ratio: float, *, importance: str = "l1",
                  round_to: int | None = None, ignored=None):
    """Remove ``ratio`` of the channels of every prunable layer in place (uniform, not global)."""
    import torch_pruning as tp

    ignored = classifier_layers(module, example_inputs) if ignored is None else ignored
    imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
    try:
        pruner = tp.pruner.MetaPruner(module, example_inputs, importance=imp, pruning_ratio=ratio,
                                      ignored_layers=ignored, round_to=round_to)
        pruner.step()
    except Exception as e:
        raise StepError(f"torch_pruning could not prune this model: {type(e).__name__}: {e}",
                        hint="try a smaller ratio, or use magnitude 'prune' instead") from e
    return module


@register("structured-prune", StructuredPruneConfig, needs=("torch", "train"))
def structured_prune(artifact: Artifact, config: StructuredPruneConfig, ctx) -> tuple[Artifact, StepRecord]:
    """Remove a ratio of channels (torch_pruning), then fine-tune on the training data."""
    if artifact.format is not ModelFormat.TORCH:
        raise StepError(f"structured-prune {NEEDS_MODULE} (got {artifact.format.value})")
    check_module(artifact.module)
    if ctx.train is None:
        raise StepError(NEEDS_TRAIN)
    t0 = time.perf_counter()
    examples = example_tuple(artifact.example_inputs, ctx.train)
    model = copy.deepcopy(artifact.module)
    flops0, params0 = count_ops(model, examples)
    labelled = ctx.eval is not None and ctx.eval.labels is not None
    acc0 = evaluate(model, ctx.eval) if labelled else None

    channel_prune(model, examples, config.ratio, importance=config.importance, round_to=config.round_to)
    flops1, params1 = count_ops(model, examples)
    acc1 = evaluate(model, ctx.eval) if labelled else None

    cfg = config.train_config()

    def progress(epoch, total, loss, acc):
        ctx.progress(f"fine-tuning epoch {epoch}/{total} loss {loss:.4f}", epoch / total)
        ctx.events("epoch", epoch=epoch, total=total, loss=loss, eval_acc=acc)

    result = fit(model, ctx.train, ctx.eval, cfg, progress=progress, seed=ctx.seed)
    acc2 = evaluate(model, ctx.eval) if labelled else None
    details = {
        "ratio": config.ratio, "importance": config.importance,
        "params_before": params0, "params_after": params1,
        "flops_before": flops0, "flops_after": flops1, "flops_per": "sample (torch_pruning count)",
        "accuracy_before": acc0, "accuracy_pruned": acc1, "accuracy_finetuned": acc2,
        "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 2),
        "history": result.history,
    }
    summary = (f"removed {config.ratio:.0%} of channels: params {params0:,} -> {params1:,}, "
               f"FLOPs {flops0:,} -> {flops1:,}, {result.epochs_run} epochs of fine-tuning")
    if acc2 is not None:
        summary += f", accuracy {acc0:.3f} -> {acc1:.3f} -> {acc2:.3f}"
    new = replace(artifact, module=model, example_inputs=artifact.example_inputs)
    record = StepRecord("structured-prune", config.model_dump(), True, summary, details,
                        seconds=time.perf_counter() - t0)
    return new.with_notes(f"structured-pruned {config.ratio:.0%} of channels"), record
