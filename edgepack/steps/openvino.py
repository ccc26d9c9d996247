"""OpenVINO steps: ONNX -> IR (`convert-ir`), NNCF post-training int8 (`nncf-int8`) and NNCF weight
compression (`nncf-int4`). Each reads the previous artifact and writes model.xml/model.bin under its
step directory; openvino and nncf are imported inside the functions.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgepack.errors import DataError, StepError
from edgepack.model.onnx import describe_ops
from edgepack.steps import Context, StepConfig, register
from edgepack.steps.ovutil import (
    SOURCE_QUANTIZED,
    already_quantized_ir,
    compressed_weights,
    front_end_scope,
    import_nncf,
    matmul_weight_share,
    matmul_weights,
    op_counts,
    ov_reason,
    quiet_nncf,
    read_ir,
    require_ir,
    save_ir,
)
from edgepack.types import Artifact, ModelFormat, StepRecord

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- convert-ir

class ConvertIRConfig(StepConfig):
    compress_to_fp16: bool = False  # store weights as f16 in the .bin (compute precision is a runtime hint)


@register("convert-ir", ConvertIRConfig)
def convert_ir(artifact: Artifact, cfg: ConvertIRConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Convert an ONNX model to OpenVINO IR (static shapes when the target asks for them)."""
    import openvino as ov

    t0 = time.perf_counter()
    if artifact.format is not ModelFormat.ONNX:
        raise StepError(f"convert-ir needs an ONNX model, got {artifact.format.value} ({artifact.path.name})",
                        hint="put 'export-onnx' before it")
    _check_onnx_readable(artifact.path)
    try:
        model = ov.convert_model(str(artifact.path))
    except Exception as e:  # OpenVINO raises several unrelated types (RuntimeError, OpConversionFailure, ...)
        raise StepError(f"OpenVINO cannot convert {artifact.path.name}: {ov_reason(e)}",
                        hint="check the op is supported by OpenVINO's ONNX frontend") from e

    shapes = ctx.target.shapes
    if shapes.policy == "static":
        _reshape_static(model, shapes.batch, dict(shapes.static), ctx)
        dynamic = [i.get_any_name() for i in model.inputs if not i.get_partial_shape().is_static]
        if dynamic:
            raise StepError(f"inputs {dynamic} are still dynamic after reshape",
                            hint="set shapes.static for them in the target profile")

    metadata = {**_onnx_metadata(artifact.path), **artifact.metadata}
    quantized = _onnx_quantized_ops(artifact.path)
    if quantized:  # OpenVINO folds dynamic quantization into float ops: remember it for the NNCF steps
        model.set_rt_info(describe_ops(quantized), list(SOURCE_QUANTIZED))
    out = save_ir(model, ctx.step_dir("convert-ir"), metadata, compress_to_fp16=cfg.compress_to_fp16)
    inputs = {i.get_any_name(): str(i.get_partial_shape()) for i in model.inputs}
    size = sum(p.stat().st_size for p in out.files)
    summary = (f"converted to OpenVINO IR ({sum(op_counts(model).values())} ops, "
               f"{'f16' if cfg.compress_to_fp16 else 'f32'} weights, {size / 1e6:.2f} MB); inputs "
               + ", ".join(f"{k} {v}" for k, v in inputs.items()))
    return out.with_notes(*artifact.notes), StepRecord(
        "convert-ir", cfg.model_dump(), True, summary,
        details={"inputs": inputs, "shape_policy": shapes.policy, "size_bytes": size,
                 "metadata_keys": sorted(metadata)},
        seconds=time.perf_counter() - t0)


def _check_onnx_readable(path: Path) -> None:
    """Ask the ONNX frontend first: convert_model would try every frontend and spam stderr on a bad file."""
    from openvino.frontend import FrontEndManager

    if not path.is_file():
        raise StepError(f"model file {path} does not exist")
    fe = FrontEndManager().load_by_framework("onnx")
    if not fe.supported(str(path)):
        raise StepError(f"OpenVINO cannot read {path.name}: not a valid ONNX file",
                        hint="check the file with onnx.checker or re-export it")


def _onnx_quantized_ops(path: Path) -> dict[str, int]:
    from edgepack.model.onnx import quantized_ops

    try:
        import onnx

        return quantized_ops(onnx.load(str(path), load_external_data=False))
    except Exception:  # already read by OpenVINO; this only saves NNCF a pointless run
        return {}


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # already read by OpenVINO; metadata is a nice-to-have here
        return {}
    return {p.key: p.value for p in m.metadata_props}


def _reshape_static(model: Any, batch: int, explicit: dict[str, tuple[int, ...]], ctx: Context) -> None:
    """Fix every input: shapes.static first, then batch for a dynamic dim 0, then calibration sample shapes."""
    import openvino as ov

    calib = ctx.calib.inputs if ctx.calib is not None else {}
    names = {i.get_any_name() for i in model.inputs}
    unknown = sorted(set(explicit) - names)
    if unknown:
        raise StepError(f"shapes.static names unknown inputs {unknown}", hint=f"model inputs: {sorted(names)}")
    new: dict[str, ov.PartialShape] = {}
    for inp in model.inputs:
        name, ps = inp.get_any_name(), inp.get_partial_shape()
        if name in explicit:
            dims = list(explicit[name])
            if ps.rank.is_static and len(dims) != ps.rank.get_length():
                raise StepError(f"shapes.static[{name}] has {len(dims)} dims but input '{name}' has rank "
                                f"{ps.rank.get_length()}", hint=f"model shape is {ps}")
        else:
            if ps.rank.is_dynamic:
                raise StepError(f"input '{name}' has unknown rank; cannot make it static",
                                hint=f"set shapes.static = {{ {name} = [...] }} in the target profile")
            dims = []
            for k, d in enumerate(ps):
                if d.is_static:
                    dims.append(d.get_length())
                elif k == 0:
                    dims.append(batch)
                elif name in calib and np.ndim(calib[name]) == ps.rank.get_length():
                    dims.append(int(calib[name].shape[k]))
                else:
                    raise StepError(f"input '{name}' dim {k} is dynamic ({ps}) and cannot be resolved "
                                    "for a static-shape target",
                                    hint=f"set shapes.static = {{ {name} = [...] }} in the target profile "
                                    "or pass --calib data with that input")
        new[name] = ov.PartialShape(dims)
    try:
        model.reshape(new)
    except RuntimeError as e:
        raise StepError(f"OpenVINO cannot reshape to {({k: str(v) for k, v in new.items()})}: {ov_reason(e)}",
                        hint="check shapes.static in the target profile") from e


# ---------------------------------------------------------------- nncf-int8

class NNCFInt8Config(StepConfig):
    preset: Literal["performance", "mixed"] | None = None  # None: performance when activations are symmetric
    subset_size: int = 300
    ignored_scopes: tuple[str, ...] = ()  # node names kept in float
    fast_bias_correction: bool = True


def _target_device(ctx: Context):
    nncf = import_nncf()

    dev = (ctx.runtime.device or "") if ctx.runtime is not None else ""
    return {"CPU": nncf.TargetDevice.CPU, "GPU": nncf.TargetDevice.GPU,
            "NPU": nncf.TargetDevice.NPU}.get(dev.split(".")[0].upper(), nncf.TargetDevice.ANY)


def _preset_name(cfg_preset: str | None, ctx: Context) -> str:
    if cfg_preset is not None:
        return cfg_preset
    return "performance" if ctx.target.quantization.symmetric_activations else "mixed"


def calib_items(model: Any, dataset: Any, what: str = "--calib") -> list[dict[str, np.ndarray]]:
    """Dataset -> list of feeds keyed by input name, batch 1 (or the model's static batch)."""
    names = [i.get_any_name() for i in model.inputs]
    missing = [n for n in names if n not in dataset.inputs]
    if missing:
        raise DataError(f"{what} data ({dataset.source}) has no arrays for inputs {missing}",
                        hint=f"it has {sorted(dataset.inputs)}")
    first = model.inputs[0].get_partial_shape()
    batch = first[0].get_length() if first.rank.is_static and first.rank.get_length() and first[0].is_static else 1
    items = [{n: np.asarray(b[n], order="C") for n in names} for b in dataset.batches(batch)]
    items = [it for it in items if len(it[names[0]]) == batch]  # a short last batch cannot feed a static model
    if not items:
        raise DataError(f"{what} data ({dataset.source}) has {len(dataset)} samples, "
                        f"fewer than the static batch {batch}")
    return items


@register("nncf-int8", NNCFInt8Config, needs=("calib",))
def nncf_int8(artifact: Artifact, cfg: NNCFInt8Config, ctx: Context) -> tuple[Artifact, StepRecord]:
    """NNCF post-training int8 quantization of an OpenVINO IR (inserts FakeQuantize)."""
    nncf = import_nncf()

    t0 = time.perf_counter()
    require_ir(artifact, "nncf-int8")
    if ctx.calib is None:
        raise StepError("nncf-int8 needs calibration data", hint="pass --calib DIR (a .npz/.npy file or folder)")
    model = read_ir(artifact.path)
    done = already_quantized_ir(model)
    if done:
        return artifact, StepRecord("nncf-int8", cfg.model_dump(), False,
                                    f"nothing to change: the model is already quantized ({done})",
                                    {"already_quantized": done}, time.perf_counter() - t0)
    items = calib_items(model, ctx.calib)
    preset, device = _preset_name(cfg.preset, ctx), _target_device(ctx)
    fq_before = op_counts(model)["FakeQuantize"]
    kwargs, front = front_end_scope(model, cfg.ignored_scopes)
    subset = min(cfg.subset_size, len(items))
    try:
        with quiet_nncf(log):
            q = nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset(preset),
                              subset_size=subset, target_device=device,
                              fast_bias_correction=cfg.fast_bias_correction, **kwargs)
    except nncf.ValidationError as e:
        raise StepError(f"nncf-int8: {ov_reason(e)}", hint="check ignored_scopes against the IR's node names") from e
    except (RuntimeError, nncf.InternalError) as e:
        raise StepError(f"nncf-int8 failed: {ov_reason(e)}") from e
    fq = op_counts(q)["FakeQuantize"] - fq_before
    int8_weights = sum(compressed_weights(q).values())  # NNCF folds weight quantizers into int8 constants
    out = save_ir(q, ctx.step_dir("nncf-int8"), artifact.metadata)
    params = {**cfg.model_dump(), "preset": preset, "target_device": device.value, "subset_size": subset}
    details = {"fake_quantize": fq, "int8_weights": int8_weights, "calibration_items": subset,
               "target_device": device.value}
    seconds = time.perf_counter() - t0
    if fq <= 0:
        return out.with_notes(*artifact.notes), StepRecord(
            "nncf-int8", params, False, "nothing to change: NNCF inserted no FakeQuantize (no quantizable ops)",
            details, seconds)
    summary = (f"inserted {fq} FakeQuantize ops, {int8_weights} int8 weights ({preset} preset, "
               f"{subset} calibration items, device {device.value})" + (f"; {front}" if front else ""))
    details["notes"] = [front] if front else []
    return out.with_notes(*artifact.notes), StepRecord("nncf-int8", params, True, summary, details, seconds)


# ---------------------------------------------------------------- nncf-int4

class NNCFInt4Config(StepConfig):
    mode: Literal["int4_sym", "int4_asym", "int8_asym"] = "int4_sym"
    group_size: int = 32  # int4 modes only; -1 means per output channel
    ratio: float = 1.0  # share of weights in int4; the rest in int8
    min_weight_share: float = 0.5  # as the int4 step: below this share of MatMul weights, nothing to gain


@register("nncf-int4", NNCFInt4Config)
def nncf_int4(artifact: Artifact, cfg: NNCFInt4Config, ctx: Context) -> tuple[Artifact, StepRecord]:
    """NNCF weight-only compression of MatMul weights (int4 groups, or int8) in an OpenVINO IR."""
    nncf = import_nncf()

    t0 = time.perf_counter()
    require_ir(artifact, "nncf-int4")
    if not 0.0 < cfg.ratio <= 1.0:
        raise StepError(f"nncf-int4: ratio must be in (0, 1], got {cfg.ratio}")
    model = read_ir(artifact.path)
    params = cfg.model_dump()
    done = already_quantized_ir(model)
    if done:
        return artifact, StepRecord("nncf-int4", params, False,
                                    f"nothing to change: the model is already quantized ({done})",
                                    {"already_quantized": done}, time.perf_counter() - t0)
    n_matmul = matmul_weights(model)
    before = compressed_weights(model)
    out_dir = ctx.step_dir("nncf-int4")
    if n_matmul == 0:
        out = save_ir(model, out_dir, artifact.metadata)
        return out.with_notes(*artifact.notes), StepRecord(
            "nncf-int4", params, False, "nothing to change: no MatMul weights", {"matmul_weights": 0},
            time.perf_counter() - t0)
    share = matmul_weight_share(model)
    if share < cfg.min_weight_share:
        summary = (f"nothing to change: MatMuls hold {share:.1%} of the weights (weight-only compression pays off "
                   f"from {cfg.min_weight_share:.0%}; set min_weight_share to go below)")
        return artifact, StepRecord("nncf-int4", params, False, summary,
                                    {"matmul_weights": n_matmul, "matmul_weight_share": share}, time.perf_counter() - t0)
    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode(cfg.mode)}
    if cfg.mode.startswith("int4"):
        kwargs.update(group_size=cfg.group_size, ratio=cfg.ratio)
        if cfg.group_size > 0:  # weights whose channels the group does not divide: a smaller power-of-two group
            from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

            kwargs["advanced_parameters"] = AdvancedCompressionParameters(
                group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16)
    try:
        with quiet_nncf(log):
            c = nncf.compress_weights(model, **kwargs)
    except (nncf.ValidationError, nncf.UnsupportedModelError, nncf.InvalidGroupSizeError) as e:
        raise StepError(f"nncf-int4: {ov_reason(e)}",
                        hint="a group_size must divide each weight's input channels; try group_size = -1") from e
    except (RuntimeError, nncf.InternalError) as e:
        raise StepError(f"nncf-int4 failed: {ov_reason(e)}") from e
    after = compressed_weights(c) - before
    out = save_ir(c, out_dir, artifact.metadata)
    n = sum(after.values())
    details = {"matmul_weights": n_matmul, "compressed": dict(after),
               "size_bytes": sum(p.stat().st_size for p in out.files)}
    seconds = time.perf_counter() - t0
    if n == 0:
        return out.with_notes(*artifact.notes), StepRecord(
            "nncf-int4", params, False, f"nothing to change: NNCF compressed none of {n_matmul} MatMul weights",
            details, seconds)
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(after.items()))
    group = f", group {cfg.group_size}" if cfg.mode.startswith("int4") else ""
    summary = f"compressed {n} weights of {n_matmul} MatMuls ({kinds}; mode {cfg.mode}{group})"
    return out.with_notes(*artifact.notes), StepRecord("nncf-int4", params, True, summary, details, seconds)
