"""The training loop shared by structured pruning (fine-tuning) and distillation.

``fit`` trains a torch module on a ``Dataset`` (``.inputs`` name -> array, ``.labels``), optionally
against a teacher's soft targets, with a learning-rate schedule, L1/L2 penalties and early stopping
on eval accuracy. It is deterministic for a given seed on the CPU.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgepack.errors import DataError

if TYPE_CHECKING:
    from edgepack.data import Dataset

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float, "float | None"], None]  # (epoch, total, loss, eval_acc)


class TrainConfig(BaseModel):
    """Training controls (recipe keys; unknown keys are errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)  # L2, through the optimizer
    l1: float = Field(0.0, ge=0)  # L1 penalty on weights (rank >= 2), added to the loss
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(10, ge=1)  # step schedule: multiply by gamma every step_size epochs
    gamma: float = Field(0.1, gt=0, le=1)
    patience: int | None = Field(None, ge=1)  # early stopping on eval accuracy (needs eval data)
    seed: int | None = None  # None: the run's seed


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch
    best_accuracy: float | None = None
    epochs_run: int = 0
    seconds: float = 0.0


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of cfg.lr during ``epoch`` (0-based): linear warm-up, then constant/step/cosine."""
    w = cfg.warmup_epochs
    if epoch < w:
        return (epoch + 1) / (w + 1)
    e = epoch - w
    if cfg.schedule == "step":
        return cfg.gamma ** (e // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - w, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(e, span) / span))
    return 1.0


def make_optimizer(model, cfg: TrainConfig):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig):
    """A LambdaLR stepped once per epoch."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))


def _tensors(inputs: dict[str, np.ndarray], index=None) -> list:
    import torch

    out = []
    for arr in inputs.values():
        a = arr if index is None else arr[index]
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def _logits(model, xs):
    out = model(*xs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def evaluate(model, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset (the module is left in eval mode)."""
    import torch

    if dataset.labels is None:
        raise DataError(f"{dataset.source}: accuracy needs labels ('y' in the .npz)")
    model.eval()
    correct, n = 0, len(dataset)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = slice(start, start + batch_size)
            pred = _logits(model, _tensors(dataset.inputs, idx)).argmax(dim=1).numpy()
            correct += int((pred == dataset.labels[idx]).sum())
    return correct / max(n, 1)


def _l1_penalty(model):
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.dim() >= 2)


def fit(model, train: Dataset, eval: Dataset | None, cfg: TrainConfig, *, loss_fn=None, teacher=None,
        temperature: float = 4.0, alpha: float = 0.5, progress: Progress | None = None,
        seed: int = 0) -> TrainResult:
    """Train ``model`` in place; with ``teacher``, distil: alpha*KL(T)*T^2 + (1-alpha)*CE.

    With ``cfg.patience`` and eval data, stops when eval accuracy has not improved for that many
    epochs and restores the best weights. ``cfg.seed`` overrides ``seed``.
    """
    import torch
    import torch.nn.functional as F

    seed = cfg.seed if cfg.seed is not None else seed
    n = len(train)
    if n == 0:
        raise DataError(f"{train.source}: training data is empty")
    if train.labels is None and (teacher is None or alpha < 1.0):
        raise DataError(f"{train.source}: training needs labels ('y' in the .npz)")
    if eval is not None and eval.labels is None:
        eval = None  # accuracy cannot be measured: no early stopping
    labels = None if train.labels is None else torch.from_numpy(train.labels.astype(np.int64))
    loss_fn = loss_fn or F.cross_entropy

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)  # CPU ops without a deterministic kernel warn
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    t_logits = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():  # the inputs never change between epochs: the teacher's answers are computed once
            t_logits = torch.cat([_logits(teacher, _tensors(train.inputs, slice(i, i + 256))) for i in range(0, n, 256)])
    result, best_state, since_best = TrainResult(), None, 0
    t0 = time.perf_counter()
    try:
        for epoch in range(cfg.epochs):
            te = time.perf_counter()
            model.train()
            order = gen.permutation(n)
            total, seen = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2 and n > 1:  # batch norm cannot train on a single sample
                    continue
                xs = _tensors(train.inputs, idx)
                out = _logits(model, xs)
                y = None if labels is None else labels[idx]
                if teacher is None:
                    loss = loss_fn(out, y)
                else:
                    t_out = t_logits[torch.from_numpy(idx)]
                    kd = F.kl_div(F.log_softmax(out / temperature, dim=1), F.softmax(t_out / temperature, dim=1),
                                  reduction="batchmean") * temperature ** 2
                    loss = alpha * kd if y is None else alpha * kd + (1 - alpha) * loss_fn(out, y)
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * _l1_penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            acc = evaluate(model, eval) if eval is not None else None
            mean_loss = total / max(seen, 1)
            result.history.append({"epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": lr,
                                   "eval_accuracy": acc, "seconds": round(time.perf_counter() - te, 3)})
            result.epochs_run = epoch + 1
            log.debug("epoch %d/%d loss %.4f acc %s", epoch + 1, cfg.epochs, mean_loss, acc)
            if progress is not None:
                progress(epoch + 1, cfg.epochs, mean_loss, acc)
            if acc is not None and (result.best_accuracy is None or acc > result.best_accuracy):
                result.best_accuracy, since_best = acc, 0
                best_state = copy.deepcopy(model.state_dict())
            elif acc is not None:
                since_best += 1
                if cfg.patience is not None and since_best >= cfg.patience:
                    log.info("early stop after epoch %d: no gain for %d epochs", epoch + 1, since_best)
                    break
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    if best_state is not None and cfg.patience is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
