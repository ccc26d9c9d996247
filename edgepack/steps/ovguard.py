"""Accuracy-controlled NNCF int8: quantize, then let NNCF revert layers to float until the metric drop
on labelled eval data is within max_drop (nncf.quantize_with_accuracy_control).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from edgepack.errors import DataError, StepError
from edgepack.steps import Context, StepConfig, register
from edgepack.steps.openvino import _preset_name, _target_device, calib_items
from edgepack.steps.ovutil import (
    front_end_scope,
    import_nncf,
    op_counts,
    ov_reason,
    quiet_nncf,
    read_ir,
    require_ir,
    save_ir,
)
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)

KIND = "nncf-int8-accuracy"
GUARD_KIND = "nncf-int8-guarded"
_REVERTED = re.compile(r"^(\d+) out of (\d+) were reverted back to the floating-point precision:")
MAX_ITERATIONS = 12  # layer groups NNCF may revert (one validation each): bounds the cost on large models
_METRIC = re.compile(r"^Metric of (initial|quantized) model: (\S+)")
MIN_TRIALS = 3  # reverts NNCF makes before Progress may judge them


class GiveUp(Exception):
    """Raised from the validation function to stop NNCF's accuracy control: its reverts cannot close the gap."""


class Progress:
    """The metric of every full validation NNCF asks for: the float model, the quantized one, then one per
    revert (NNCF reverts the most sensitive layer groups first, so later ones gain less). After MIN_TRIALS
    reverts, gives up when the metric they restored, at their average rate per revert, would need more than
    twice the reverts left (minilm-l3: three reverts of 38 quantized ops moved the drop from 0.0947 to 0.0933,
    its budget ~0, and the nine more it would have run took another 50 s)."""

    def __init__(self, items: int, max_drop: float, reverts: int = MAX_ITERATIONS):
        self.items, self.max_drop, self.reverts = items, max_drop, reverts
        self.metrics: list[float] = []

    def __call__(self, metric: float, items: int) -> None:
        if items != self.items or self.items < 2:  # (one item: per-item and full validations look alike)
            return
        self.metrics.append(metric)
        if (why := self.hopeless()) is not None:
            raise GiveUp(why)

    def hopeless(self) -> str | None:
        if len(self.metrics) < 2 + MIN_TRIALS:
            return None
        initial, quantized, trials = self.metrics[0], self.metrics[1], self.metrics[2:]
        k, drop0, drop = len(trials), initial - quantized, initial - max(trials)
        if drop <= self.max_drop:
            return None
        rate = (drop0 - drop) / k
        if rate > 0 and (drop - self.max_drop) / rate <= 2 * (self.reverts - k):
            return None
        return (f"{k} reverts moved the metric drop from {drop0:.4g} to {drop:.4g} (budget {self.max_drop:.4g}): "
                f"reverting more layers would not close the gap")


def ov_accuracy_control(
    artifact: Artifact,
    ctx: Context,
    validate: Callable[[Any, list], float],
    max_drop: float,
    *,
    subset_size: int = 300,
    preset: str | None = None,
    data: Any = None,
) -> tuple[Artifact, StepRecord]:
    """Quantize an IR to int8 keeping the metric drop (absolute) within max_drop.

    validate(compiled_model, items) -> metric, where items is a list of (feeds, label) with feeds a dict
    keyed by input name; NNCF calls it on the float model, the quantized model and each trial.
    """
    nncf = import_nncf()

    t0 = time.perf_counter()
    require_ir(artifact, KIND)
    if ctx.calib is None:
        raise StepError(f"{KIND} needs calibration data", hint="pass --calib DIR")
    model = read_ir(artifact.path)
    calib = calib_items(model, ctx.calib)
    if data is not None:  # judged by the caller's metric on these inputs: no labels needed
        val: list = [(f, None) for f in calib_items(model, data, "scoring")]
    else:
        if ctx.eval is None or ctx.eval.labels is None:
            raise DataError(f"{KIND} needs labelled evaluation data", hint="pass --eval DIR with labels in 'y'")
        feeds = calib_items(model, ctx.eval, "--eval")
        labels = np.asarray(ctx.eval.labels)
        per = len(labels) // max(len(feeds), 1)  # samples per item (the static batch)
        val = [(f, labels[i * per:(i + 1) * per]) for i, f in enumerate(feeds)]
    preset_name, device = _preset_name(preset, ctx), _target_device(ctx)
    subset = min(subset_size, len(calib))
    scope, front = front_end_scope(model)
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    progress = Progress(len(val), max_drop)

    def judge(compiled, items) -> tuple[float, None]:
        items = list(items)
        metric = float(validate(compiled, items))
        progress(metric, len(items))
        return metric, None

    try:
        with quiet_nncf(log) as lines:
            q = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(calib), nncf.Dataset(val, lambda item: item[0]), judge,
                max_drop=max_drop, preset=nncf.QuantizationPreset(preset_name), **scope,
                target_device=device, subset_size=subset,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=MAX_ITERATIONS))
    except GiveUp as e:
        raise StepError(f"{KIND} gave up after {time.perf_counter() - t0:.0f} s: {e}") from None
    except (RuntimeError, nncf.InternalError, nncf.ValidationError) as e:
        raise StepError(f"{KIND} failed: {ov_reason(e)}") from e
    found = parse_nncf_log(lines)
    found["final_metric"] = _final_metric(q, val, validate, ctx)
    out = save_ir(q, ctx.step_dir(KIND), artifact.metadata)
    fq = op_counts(q)["FakeQuantize"]
    details = {**found, "fake_quantize": fq, "max_drop": max_drop, "validation_items": len(val)}
    if found["reverted"] is None:
        reverted = "NNCF did not report reverted layers"
    else:
        reverted = f"{len(found['reverted'])} layer(s) reverted to float"
    summary = (f"int8 with accuracy control: metric {found['initial_metric']} -> {found['final_metric']} "
               f"(max drop {max_drop}); {reverted}; {fq} FakeQuantize ops" + (f"; {front}" if front else ""))
    params = {"max_drop": max_drop, "subset_size": subset, "preset": preset_name, "target_device": device.value}
    return out.with_notes(*artifact.notes), StepRecord(KIND, params, fq > 0, summary, details,
                                                       time.perf_counter() - t0)


def _final_metric(model: Any, val: list, validate: Callable[[Any, list], float], ctx: Context) -> float:
    """The metric of the returned model, measured here rather than read from NNCF's log."""
    import openvino as ov

    hint = (ctx.runtime.inference_precision if ctx.runtime is not None else None) or "f32"
    from edgepack.runtimes.sigstack import keep_sigaltstack

    with keep_sigaltstack():  # see edgepack/sigstack.py
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return float(validate(compiled, val))


def parse_nncf_log(lines: list[str]) -> dict[str, Any]:
    """What NNCF logged: metrics, drop, reverted layer names (None when NNCF did not say)."""
    out: dict[str, Any] = {"initial_metric": None, "quantized_metric": None, "accuracy_drop": None,
                           "reverted": None, "quantized_ops": None, "restorer_ran": False, "completed": None}
    for msg in lines:
        first, *rest = msg.split("\n")
        if m := _METRIC.match(first):
            out[f"{m.group(1)}_metric"] = _num(m.group(2))
        elif first.startswith("Accuracy drop: ") and out["accuracy_drop"] is None:
            out["accuracy_drop"] = _num(first.split()[2])
        elif first.startswith(("Changing the scope of quantizer nodes", "Total number of quantized operations")):
            out["restorer_ran"] = True
        elif m := _REVERTED.match(first):
            out["reverted"] = [r.strip() for r in rest if r.strip()]
            out["quantized_ops"] = int(m.group(2))
        elif first.startswith("Algorithm completed:"):
            out["completed"] = first.split(":", 1)[1].strip()
        elif first.startswith("The algorithm could not achieve"):
            out["completed"] = "could not achieve the required accuracy drop"
    if out["reverted"] is None and out["accuracy_drop"] is not None and not out["restorer_ran"]:
        out["reverted"] = []  # the drop was within budget right after quantization: nothing reverted
    return out


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class NNCFGuardConfig(StepConfig):
    subset_size: int = 300


@register("nncf-int8-guarded", NNCFGuardConfig, needs=("calib",))
def nncf_int8_guarded(artifact: Artifact, cfg: NNCFGuardConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """NNCF int8 that reverts layers to float until pack's own judgement of the outputs holds again."""
    if ctx.score_outputs is None or ctx.scoring_data is None:
        raise StepError(f"{GUARD_KIND} runs inside pack, which judges each trial against the original",
                        hint="use nncf-int8 in a recipe of your own")
    score_outputs = ctx.score_outputs
    axes = list(ctx.output_axes)

    def validate(compiled, items: list) -> float:
        parts = [compiled(feeds) for feeds, _ in items]
        n_out = len(compiled.outputs)
        outs = []
        for i in range(n_out):
            ax = axes[i] if i < len(axes) else 0
            arrays = [np.asarray(p[i]) for p in parts]
            outs.append(np.stack(arrays) if ax is None else np.concatenate(arrays, axis=ax))
        return float(score_outputs(outs))

    art, rec = ov_accuracy_control(artifact, ctx, validate, max(ctx.max_drop, 1e-6), subset_size=cfg.subset_size,
                                   data=ctx.scoring_data)
    return art, replace(rec, kind=GUARD_KIND)
