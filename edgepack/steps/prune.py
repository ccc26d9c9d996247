"""Magnitude pruning: set weights with |w| < t to zero (ONNX and torch artifacts).

Unstructured zeros do not make dense kernels faster; they make the compressed archive smaller.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edgepack.errors import ModelError, StepError
from edgepack.steps import StepConfig, register
from edgepack.types import Artifact, ModelFormat, StepRecord

log = logging.getLogger(__name__)

NOTE = "unstructured sparsity does not speed up dense kernels; it shrinks the compressed archive"
WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1),
              # ONNX Runtime's fused forms (optimize-graph, extended level) keep the same weight inputs
              "FusedConv": (1,), "FusedGemm": (0, 1), "FusedMatMul": (0, 1)}
TORCH_TYPES = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"}
_FLOATS = (np.float16, np.float32, np.float64)


class PruneConfig(StepConfig):
    threshold: float | None = Field(None, ge=0)
    sparsity: float | None = Field(None, gt=0, lt=1)
    scope: Literal["global", "per-layer"] = "global"
    skip_first_last: bool = True
    min_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _one(self) -> PruneConfig:
        if (self.threshold is None) == (self.sparsity is None):
            raise ValueError("give exactly one of 'threshold' or 'sparsity'")
        return self


def sparsity_threshold(values: np.ndarray, sparsity: float) -> float:
    """The t for which about ``sparsity`` of ``values`` have |v| < t."""
    a = np.abs(values.ravel())
    k = min(int(round(sparsity * a.size)), a.size - 1)
    return float(np.partition(a, k)[k])


def _layer(name: str, w: np.ndarray, t: float | None, pruned: bool) -> dict:
    zeros = int(w.size - np.count_nonzero(w))
    return {"name": name, "shape": list(w.shape), "zeros": zeros, "size": int(w.size),
            "sparsity": round(zeros / w.size, 6), "threshold": t, "pruned": pruned}


def prune_arrays(weights: dict[str, np.ndarray], cfg: PruneConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Prune named arrays (in layer order). Returns the new arrays and the step details."""
    names = list(weights)
    skip = set()
    if cfg.skip_first_last and len(names) > 2:
        skip = {names[0], names[-1]}
    elif cfg.skip_first_last:
        log.info("only %d prunable layers: skip_first_last ignored", len(names))
    chosen = [n for n in names if n not in skip]
    if cfg.threshold is not None:
        thresholds = dict.fromkeys(chosen, cfg.threshold)
        top = cfg.threshold
    elif cfg.scope == "global" and chosen:
        top = sparsity_threshold(np.concatenate([weights[n].ravel() for n in chosen]), cfg.sparsity)
        thresholds = dict.fromkeys(chosen, top)
    else:
        top = None
        thresholds = {n: sparsity_threshold(weights[n], cfg.sparsity) for n in chosen}
    out, layers = {}, []
    for n in names:
        w = weights[n]
        if n in thresholds:
            w = np.where(np.abs(w) < thresholds[n], np.zeros((), w.dtype), w).astype(w.dtype)
            out[n] = w
        layers.append(_layer(n, w, thresholds.get(n), n in thresholds))
    zeros = sum(x["zeros"] for x in layers if x["pruned"])
    size = sum(x["size"] for x in layers if x["pruned"])
    details = {"layers": layers, "overall_sparsity": round(zeros / size, 6) if size else 0.0,
               "zeros": zeros, "size": size, "threshold": top, "scope": cfg.scope,
               "skipped": sorted(skip), "note": NOTE}
    return out, details


# --- ONNX -----------------------------------------------------------------------------------------

def _weight_sources(model) -> dict[str, tuple[str, Any]]:
    """Constant weight inputs of Conv/Gemm/MatMul in node order: name -> ("init", tensor) | ("const", node)."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    found: dict[str, tuple[str, Any]] = {}
    for node in model.graph.node:
        for i in WEIGHT_OPS.get(node.op_type, ()):
            if i >= len(node.input) or node.input[i] in found:
                continue
            name = node.input[i]
            if name in inits:
                found[name] = ("init", inits[name])
            elif name in consts:
                found[name] = ("const", consts[name])
    return found


def _const_tensor(node):
    for a in node.attribute:
        if a.name == "value":
            return a
    return None


def _read(kind: str, obj):
    from onnx import numpy_helper

    if kind == "init":
        return numpy_helper.to_array(obj)
    attr = _const_tensor(obj)
    return None if attr is None else numpy_helper.to_array(attr.t)


def _eligible(arr, min_size: int) -> bool:
    return arr is not None and arr.ndim >= 2 and arr.size >= min_size and arr.dtype.type in _FLOATS


def _load_onnx(path: Path):
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{path}: cannot read ONNX model: {e}") from e
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:
        load_external_data_for_model(model, str(path.parent))
    return model, external


def _prune_onnx(artifact: Artifact, cfg: PruneConfig, out_dir: Path) -> tuple[Artifact, dict]:
    import onnx
    from onnx import numpy_helper

    model, external = _load_onnx(Path(artifact.path))
    sources = _weight_sources(model)
    weights = {}
    for name, (kind, obj) in sources.items():
        arr = _read(kind, obj)
        if _eligible(arr, cfg.min_size):
            weights[name] = arr
    if not weights:
        return artifact, {}
    new, details = prune_arrays(weights, cfg)
    for name, arr in new.items():
        kind, obj = sources[name]
        tensor = numpy_helper.from_array(arr, name=obj.name if kind == "init" else "")
        if kind == "init":
            obj.CopyFrom(tensor)
        else:
            _const_tensor(obj).t.CopyFrom(tensor)
    out = out_dir / "model.onnx"
    big = external or model.ByteSize() > 1_800_000_000  # protobuf cannot hold 2 GB
    files: tuple[Path, ...] = (out,)
    if big:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        files = (out, out_dir / "model.onnx.data")
    else:
        onnx.save_model(model, str(out))
    # what unstructured zeros buy: a smaller compressed file (zlib level 6, as the report's compressed size)
    details["zlib_bytes_before"] = _zlib_size(artifact.files or (artifact.path,))
    details["zlib_bytes_after"] = _zlib_size(files)
    return replace(artifact, path=out, files=files), details


def _zlib_size(paths) -> int:
    import zlib

    return sum(len(zlib.compress(Path(p).read_bytes(), 6)) for p in paths)


def count_sparsity(onnx_path: str | Path, min_size: int = 1) -> dict:
    """Recount zeros of the Conv/Gemm/MatMul weights in an ONNX file (quantized weights included:
    a DequantizeLinear weight counts as zero where it equals its zero point)."""
    from onnx import numpy_helper

    model, _ = _load_onnx(Path(onnx_path))
    sources = _weight_sources(model)
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return _read("const", consts[name])
        return None

    # follow DequantizeLinear(w_q, scale, zero_point) feeding a weight input
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] not in sources:
            sources[node.output[0]] = ("dq", node)
    wanted = set()
    for node in model.graph.node:
        for i in WEIGHT_OPS.get(node.op_type, ()):
            if i < len(node.input):
                wanted.add(node.input[i])
    layers = []
    for name, (kind, obj) in sources.items():
        if name not in wanted:
            continue
        if kind == "dq":
            q = value(obj.input[0])
            if q is None or q.ndim < 2:
                continue
            zp = value(obj.input[2]) if len(obj.input) > 2 and obj.input[2] else np.zeros((), q.dtype)
            axis = next((a.i for a in obj.attribute if a.name == "axis"), 1)
            if zp.ndim == 1 and zp.size > 1:
                zp = zp.reshape([-1 if d == axis % q.ndim else 1 for d in range(q.ndim)])
            arr = np.where(q == zp, 0, 1).astype(np.int8)
        else:
            arr = _read(kind, obj)
            if arr is None or arr.ndim < 2 or arr.dtype.type not in _FLOATS:
                continue
        if arr.size >= min_size:
            layers.append(_layer(name, arr, None, True))
    zeros = sum(x["zeros"] for x in layers)
    size = sum(x["size"] for x in layers)
    for x in layers:
        x.pop("threshold"), x.pop("pruned")
    return {"layers": layers, "zeros": zeros, "size": size,
            "overall_sparsity": round(zeros / size, 6) if size else 0.0}


# --- torch ----------------------------------------------------------------------------------------

def prunable_torch_weights(module) -> dict[str, Any]:
    """Conv/Linear weight parameters in module order (also TorchScript modules, by original name)."""
    found = {}
    for mname, m in module.named_modules():
        kind = type(m).__name__ if not hasattr(m, "original_name") else m.original_name
        if kind in TORCH_TYPES:
            w = getattr(m, "weight", None)
            if w is not None and w.dim() >= 2:
                found[f"{mname}.weight" if mname else "weight"] = w
    return found


def _prune_torch(artifact: Artifact, cfg: PruneConfig) -> tuple[Artifact, dict]:
    import torch

    module = artifact.module
    if module is None:
        raise StepError("prune: the torch artifact has no module loaded", hint="load it with edgepack's load_model")
    try:
        pruned = copy.deepcopy(module)
    except Exception as e:
        raise StepError(f"prune: cannot copy the torch module: {e}",
                        hint="export it to ONNX first (prune then works on the ONNX file)") from e
    params = {n: p for n, p in prunable_torch_weights(pruned).items() if p.numel() >= cfg.min_size}
    if not params:
        return artifact, {}
    arrays = {n: p.detach().cpu().numpy().copy() for n, p in params.items()}
    new, details = prune_arrays(arrays, cfg)
    with torch.no_grad():
        for n, arr in new.items():
            params[n].copy_(torch.from_numpy(arr))
    return replace(artifact, module=pruned), details


@register("prune", PruneConfig)
def prune(artifact: Artifact, config: PruneConfig, ctx) -> tuple[Artifact, StepRecord]:
    """Magnitude pruning: zero the smallest Conv/Gemm/MatMul weights (smaller archive, same speed)."""
    params = config.model_dump()
    if artifact.format is ModelFormat.ONNX:
        new, details = _prune_onnx(artifact, config, ctx.step_dir("prune"))
    elif artifact.format is ModelFormat.TORCH:
        new, details = _prune_torch(artifact, config)
    else:
        raise StepError(f"prune works on ONNX and PyTorch models, not {artifact.format.value}",
                        hint="put 'prune' before 'convert-ir' in the recipe")
    if not details:
        return artifact, StepRecord("prune", params, False,
                                    f"nothing to change: no Conv/Gemm/MatMul weight with >= {config.min_size} values")
    n = sum(1 for x in details["layers"] if x["pruned"])
    summary = (f"pruned {n} of {len(details['layers'])} weight tensors to "
               f"{details['overall_sparsity']:.1%} zeros")
    if "zlib_bytes_after" in details:
        summary += (f"; compressed model {details['zlib_bytes_before']:,} -> {details['zlib_bytes_after']:,} bytes"
                    " (no speed-up: dense kernels still multiply the zeros)")
    return new.with_notes(f"magnitude-pruned to {details['overall_sparsity']:.1%} sparsity"), \
        StepRecord("prune", params, True, summary, details)
