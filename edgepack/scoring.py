"""What candidates are judged on: the scoring data, the reference's answers, each output's metric, the budget."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError, ModelError, first_line
from edgepack.recipe import Plan
from edgepack.types import Artifact, Fidelity, ModelFormat


@dataclass(frozen=True)
class Scoring:
    """The data every candidate is judged on, the reference's answers on it, and how each output is judged."""

    data: Any  # Dataset
    reference: list[np.ndarray]
    labels: np.ndarray | None
    reference_accuracy: float | None
    max_drop: float
    thresholds: Any  # target.FidelityThresholds
    names: list[str] = field(default_factory=list)  # output names
    kinds: list[str] = field(default_factory=list)  # metric kind per output (fidelity.KINDS)
    axes: list[int | None] = field(default_factory=list)  # batch axis per output
    metric_fn: Callable[[dict, dict], float] | None = None  # the user's own score (--metric-fn)
    reference_metric: float | None = None  # metric_fn on the reference outputs
    gates: dict[int, tuple[int, float]] = field(default_factory=dict)  # output -> (gate output, threshold)

    @property
    def min_top1(self) -> float:
        return self.thresholds.min_top1_agreement

    @property
    def min_cosine(self) -> float:
        return self.thresholds.min_cosine

    def compare(self, outputs: list[np.ndarray]) -> Fidelity:
        from edgepack.fidelity import compare

        fid = compare(self.reference, outputs, self.labels, names=self.names, kinds=self.kinds, axes=self.axes,
                      thresholds=self.thresholds, gates=self.gates)
        if self.metric_fn is not None:
            value = _call_metric(self.metric_fn, self.data, self.names, outputs)
            row = {"output": "*", "kind": "user", "metric": "--metric-fn", "value": value,
                   "threshold": self.reference_metric - self.max_drop,
                   "passed": value >= self.reference_metric - self.max_drop - 1e-12}
            fid = replace(fid, outputs=fid.outputs + (row,))
        return fid

    def judge(self, fid: Fidelity) -> bool:
        if self.labels is not None and fid.accuracy is not None and self.reference_accuracy is not None:
            return fid.accuracy >= self.reference_accuracy - self.max_drop - 1e-9
        if fid.outputs:
            return all(r["passed"] for r in fid.outputs)
        top1_ok = fid.top1_agreement is None or fid.top1_agreement >= self.min_top1
        return top1_ok and fid.cosine >= self.min_cosine

    def score(self, fid: Fidelity) -> float:
        """One number, higher is better, for the accuracy guard: accuracy with labels, else the worst output's
        value as a fraction of its pass mark (1.0 when every output passes)."""
        if self.labels is not None and fid.accuracy is not None:
            return fid.accuracy
        if not fid.outputs:
            return fid.top1_agreement if fid.top1_agreement is not None else fid.cosine
        worst = 1.0
        for r in fid.outputs:
            if r.get("value") is None or not r.get("threshold"):
                continue
            ratios = [r["value"] / r["threshold"]]
            for key, mark in (("box_iou", "min_box_iou"), ("nn_agreement", "min_nn_agreement")):
                if r.get(key) is not None:
                    ratios.append(r[key] / getattr(self.thresholds, mark))
            if r.get("worst_threshold"):  # scores judged by their worst error too
                ratios.append(r["worst_db"] / r["worst_threshold"])
            ratio = min(1.0, *ratios)
            worst = min(worst, ratio if r["passed"] else min(ratio, 0.999))
        return worst

    def budget(self) -> tuple[float, float]:
        """(reference score, allowed drop) in the units of score()."""
        if self.labels is not None and self.reference_accuracy is not None:
            return self.reference_accuracy, self.max_drop
        return 1.0, 1e-9

    def coarse_budget(self) -> str | None:
        """A warning when the labelled budget is finer than one sample: a single changed prediction breaks it."""
        if self.labels is None or not len(self.labels) or self.max_drop <= 0 or self.max_drop * len(self.labels) >= 1:
            return None
        n, step, points = len(self.labels), 100 / len(self.labels), 100 * self.max_drop
        return (f"the accuracy budget ({points:g} point{'' if points == 1 else 's'}) is finer than one of the {n} labelled samples "
                f"({step:.2f} points each): a single changed prediction breaks it; pass at least "
                f"{int(np.ceil(1 / self.max_drop))} labelled samples for the budget to mean what it says")

    def describe(self) -> dict[str, Any]:
        if self.labels is not None:
            return {"metric": "accuracy", "max_drop": self.max_drop, "reference_accuracy": self.reference_accuracy,
                    "samples": len(self.labels)}
        outputs = [{"output": n, "kind": k, "threshold": _mark(k, self.thresholds),
                    **({"gate": {"output": self.names[self.gates[i][0]], "at_least": self.gates[i][1]}}
                       if i in self.gates else {})} for i, (n, k) in enumerate(zip(self.names, self.kinds))]
        return {"metric": "fidelity", "outputs": outputs, "samples": len(self.data),
                **({"metric_fn_reference": self.reference_metric, "max_drop": self.max_drop}
                   if self.metric_fn is not None else {})}


def _mark(kind: str, thresholds) -> float | None:
    from edgepack.fidelity import thresholds_for

    return thresholds_for(kind, thresholds) if kind not in ("ignore", "boxes") else None


def _call_metric(fn, data, names: list[str], outputs: list[np.ndarray]) -> float:
    try:
        value = float(fn(dict(data.inputs), dict(zip(names, outputs))))
    except Exception as e:  # the user's code: say so, in one line
        raise EdgepackError(f"--metric-fn raised {type(e).__name__}: {first_line(e)}") from e
    if not np.isfinite(value):
        raise EdgepackError(f"--metric-fn returned {value}; it must return a finite number (higher is better)")
    return value


def load_metric_fn(spec: str) -> Callable[[dict, dict], float]:
    """module:function, importable from the current directory (code the user named on the command line)."""
    import importlib
    import sys

    module, _, name = spec.partition(":")
    if not module or not name.isidentifier():
        raise EdgepackError(f"--metric-fn {spec!r}: expected module:function")
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as e:
        raise EdgepackError(f"--metric-fn {spec!r}: importing {module} failed: {first_line(e)}") from e
    finally:
        sys.path.pop(0)
    if not callable(fn):
        raise EdgepackError(f"--metric-fn {spec!r}: {module} has no function {name}")
    return fn


def make_scoring(reference: Artifact, the_plan: Plan, calib, eval, threads: int, in_specs=None) -> Scoring:
    """Run the reference on the scoring data (eval, else calib, else random inputs) through ONNX Runtime and
    decide how each output is judged."""
    from edgepack.data import batch_axes, dataset_from_arrays, output_axes, synthetic_inputs
    from edgepack.fidelity import check_gates, compare, gates_of, guess_kinds, run_dataset
    from edgepack.model.describe import io_specs
    from edgepack.runtimes import open_session, reference_spec

    tgt, recipe = the_plan.target, the_plan.recipe
    spec = reference_spec()
    try:
        session = open_session(reference, spec, threads=threads)
    except ModelError as e:
        op = _unsupported_op(str(e))
        if op is None:
            raise
        raise ModelError(f"operator {op} is not supported by {spec.runtime} ({spec.provider or spec.device}), which "
                         f"target '{tgt.name}' needs for "
                         "the fp32 reference", hint="re-export the model with standard ONNX operators") from e
    ins, outs = io_specs(reference)
    ins = in_specs or ins
    data = eval if eval is not None else calib
    if data is None:
        axes = batch_axes(ins, recipe.batch_axes)
        data = dataset_from_arrays(synthetic_inputs(ins, 64, recipe.seed, axes), None, source="random inputs",
                                   axes=axes)
    from edgepack.fidelity import fixed_batch

    oaxes = output_axes(outs, ins, fixed_batch(session.inputs, data.axes))
    axes_list = _checked_axes(session, data, [oaxes[o.name] for o in outs])
    ref_out = run_dataset(session, data, eval_batch(session, data.axes), dict(enumerate(axes_list)))
    labels = getattr(data, "labels", None)
    names = [o.name for o in outs]
    kinds = guess_kinds(names, ref_out, axes_list, reference.metadata, recipe.metrics, _roles(reference))
    ref_fid = compare(ref_out, ref_out, labels, axes=axes_list)
    fn = load_metric_fn(recipe.metric_fn) if recipe.metric_fn else None
    ref_metric = _call_metric(fn, data, names, ref_out) if fn is not None else None
    gates = gates_of(names, recipe.metrics)
    check_gates(names, ref_out, axes_list, gates)
    return Scoring(data, ref_out, labels, ref_fid.accuracy, recipe.max_drop, tgt.fidelity, names, kinds, axes_list,
                   fn, ref_metric, gates)


def _roles(reference: Artifact) -> dict[str, str]:
    """What computed each output of an ONNX reference (fidelity picks metrics by it); {} for other formats."""
    from edgepack.model import onnx as onnxutil

    if reference.format != ModelFormat.ONNX:
        return {}
    return onnxutil.output_roles(onnxutil.load(reference.path, with_data=False))


def _unsupported_op(message: str) -> str | None:
    """The operator named by ONNX Runtime's "not a registered function/op" / "no implementation" errors."""
    import re

    m = (re.search(r"([\w.]+:)?(\w+)\(-?\d+\) is not a registered function/op", message)
         or re.search(r"Could not find an implementation for (\w+)\(", message))
    return None if m is None else "".join(g for g in m.groups() if g)


SCORE_MEMORY = 2**30  # bytes of activations one scoring batch may take


def eval_batch(session, axes: dict | None = None) -> int:
    """The batch the scoring data is run at: the model's fixed batch, else 32, or fewer where 32 samples'
    activations would not fit SCORE_MEMORY (an audio CNN with 350 MB per sample runs at 2, not 32)."""
    from edgepack.fidelity import fixed_batch

    fixed = fixed_batch(session.inputs, axes or {})
    if fixed:
        return fixed
    per = sample_bytes(str(getattr(session, "path", "") or ""))
    return max(1, min(32, SCORE_MEMORY // per)) if per else 32


@functools.lru_cache(maxsize=64)
def sample_bytes(path: str) -> int:
    """Activation bytes of one sample of an ONNX model (shape inference on the graph alone); 0 if unknown."""
    if not path.endswith(".onnx"):
        return 0
    import onnx

    from edgepack.model import onnx as onnxutil

    try:
        return onnxutil.activation_bytes(onnx.shape_inference.infer_shapes(onnxutil.load(Path(path), with_data=False)))
    except Exception:  # shape inference fails on some graphs: no limit then
        return 0


def _checked_axes(session, data, axes: list[int | None]) -> list[int | None]:
    """The output batch axes, checked on one real batch: an output whose size on its axis is not the batch
    (declared [batch] but giving two values per sample, say) has no batch axis: one value per run."""
    batch = next(iter(data.batches(eval_batch(session, data.axes))))
    n = next((v.shape[data.axis(k)] for k, v in batch.items() if data.axis(k) is not None), 1)
    outs = session.run(batch)
    return [ax if ax is not None and o.ndim > ax and o.shape[ax] == n else None for o, ax in zip(outs, axes)]
