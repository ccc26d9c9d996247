"""ONNX Runtime int8/int16 quantization: static (calibrated, `quantize-static`) and dynamic (`quantize-dynamic`)."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import DataError, StepError
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, StepRecord

if TYPE_CHECKING:
    import onnx

    from edgepack.data import Dataset
    from edgepack.target import QuantScheme

log = logging.getLogger(__name__)


class QuantizeStaticConfig(StepConfig):
    exclude_nodes: list[str] = []


class QuantizeDynamicConfig(StepConfig):
    # ORT's dynamic Conv (ConvInteger) is slower than float Conv on CPU, so Conv is left out by default.
    op_types: list[str] = ["MatMul", "Gemm"]


def qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8,
            "int16": QuantType.QInt16, "uint16": QuantType.QUInt16}[name]


class CalibReader:
    """Feeds up to ``limit`` calibration samples, ``batch`` at a time, cast to the model's input dtypes."""

    def __init__(self, data: Dataset, model: onnx.ModelProto, limit: int):
        import numpy as np
        from onnx.helper import tensor_dtype_to_np_dtype

        inputs = onnxutil.graph_inputs(model)
        missing = [i.name for i in inputs if i.name not in data.inputs]
        if missing:
            raise DataError(f"calibration data {data.source} has no input {', '.join(missing)} "
                            f"(it has {', '.join(data.inputs)})", hint="pass --calib data with one entry per model input")
        dtypes = {i.name: np.dtype(tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in inputs}
        dim0 = inputs[0].type.tensor_type.shape.dim if inputs else []
        batch = dim0[0].dim_value if dim0 and dim0[0].dim_value > 1 else 1  # a static batch must be honoured
        n = min(len(data), limit)
        n -= n % batch
        if n == 0:
            raise DataError(f"calibration data {data.source} has {len(data)} samples; the model needs batches of {batch}",
                            hint="pass more calibration samples")
        self.feeds = []
        for start in range(0, n, batch):
            self.feeds.append({k: np.ascontiguousarray(data.inputs[k][start:start + batch], dtype=dt)
                               for k, dt in dtypes.items()})
        self.samples = n
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.feeds)


def preprocess(artifact: Artifact, out_dir: Path) -> tuple[Path, list[str]]:
    """Run ``quant_pre_process`` (shape inference + basic fusions) into ``out_dir``; fall back to the plain graph.

    Every node gets a name afterwards so that it can be reported and excluded.
    """
    from onnxruntime.quantization import quant_pre_process

    out = out_dir / "preprocessed.onnx"
    big = onnxutil.needs_external(artifact)
    notes: list[str] = []
    attempts: tuple[dict, ...] = ({}, {"skip_symbolic_shape": True})
    for kwargs in attempts:
        try:
            quant_pre_process(str(artifact.path), str(out), save_as_external_data=big,
                              external_data_location=out.name + ".data" if big else None, **kwargs)
            break
        except Exception as e:  # symbolic shape inference fails on some graphs: try without it
            log.info("quant_pre_process %s failed: %s", kwargs, e)
            notes.append(f"pre-processing {'without symbolic shapes ' if kwargs else ''}failed: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    else:
        notes.append("quantized the graph without pre-processing")
    model = onnxutil.load(out if out.exists() else artifact.path)
    onnxutil.name_nodes(model)
    onnxutil.save(model, out, external=big)
    return out, notes


def start_static(artifact: Artifact,
                 ctx: Context) -> tuple[onnx.ModelProto, Path, Path, list[str], onnx.ModelProto]:
    """The start of static int8 (also the accuracy guard's): checks, then the source graph, the step folder, and
    the pre-processed model as (src, step_dir, pre_path, notes, pre_model)."""
    onnxutil.require_onnx(artifact, "quantize-static")
    if ctx.calib is None:
        raise StepError("static quantization needs calibration data", hint="pass --calib with ~100 typical inputs")
    src = onnxutil.load(artifact.path)
    d = ctx.step_dir("quantize-static")
    pre, notes = preprocess(artifact, d)
    return src, d, pre, notes, onnxutil.load(pre, with_data=False)


def static_quantize(pre: Path, out: Path, ctx: Context, *, exclude: list[str] | None = None,
                    include: list[str] | None = None, cache: Path | None = None,
                    reader: CalibReader | None = None) -> None:
    """Quantize the pre-processed model ``pre`` into ``out`` with the target's QuantScheme.

    ``cache`` keeps the calibration ranges in a JSON file so that repeated runs (the accuracy guard) calibrate once.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    q: QuantScheme = ctx.target.quantization
    if reader is None and not (cache and cache.is_file()):
        reader = CalibReader(ctx.calib, onnxutil.load(pre, with_data=False), q.calibration_samples)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[q.calibration_method]
    try:
        quantize_static(
            str(pre), str(out), reader,
            quant_format=QuantFormat.QDQ if q.format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(q.op_types) or None,
            per_channel=q.per_channel, reduce_range=q.reduce_range,
            activation_type=qtype(q.activation_type), weight_type=qtype(q.weight_type),
            nodes_to_exclude=exclude or None, nodes_to_quantize=include or None,
            calibrate_method=method, calibration_cache_path=str(cache) if cache else None,
            use_external_data_format=pre.with_name(pre.name + ".data").exists(),
            extra_options={"ActivationSymmetric": q.symmetric_activations, "WeightSymmetric": q.symmetric_weights},
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        raise StepError(f"ONNX Runtime static quantization failed: {str(e).splitlines()[0]}",
                        hint="check [quantization] in the target (16-bit types need format = \"qdq\")") from e
    except Exception as e:  # failures inside calibration sessions come as ORT's own types
        raise StepError(f"calibration or quantization failed in ONNX Runtime: {str(e).splitlines()[0]}",
                        hint="check the calibration data matches the model inputs") from e


def quant_details(src: onnx.ModelProto, new: onnx.ModelProto) -> dict[str, Any]:
    before, after = onnxutil.compute_split(src), onnxutil.compute_split(new)
    hist = onnxutil.op_histogram(new)
    return {
        "nodes_before": len(src.graph.node), "nodes_after": len(new.graph.node),
        "int_ops_before": before["int_ops"], "int_ops": after["int_ops"], "float_ops": after["float_ops"],
        "quantized": after["int_ops"] - before["int_ops"],
        "stayed_float": after["float_nodes"],
        "quantize_linear": hist.get("QuantizeLinear", 0), "dequantize_linear": hist.get("DequantizeLinear", 0),
    }


def resolve_names(names: list[str], model: onnx.ModelProto) -> list[str]:
    """Map node names to the pre-processed graph, where ORT renames fused nodes ``mm1`` -> ``mm1/MatMulAddFusion``."""
    known = [n.name for n in model.graph.node]
    out, unknown = [], []
    for name in names:
        hits = [k for k in known if k == name] or [k for k in known if k.startswith(name + "/")]
        out.extend(hits) if hits else unknown.append(name)
    if unknown:
        some = [n.name for n in model.graph.node if n.op_type in onnxutil.QUANTIZABLE][:10]
        raise StepError(f"exclude_nodes names no node called {', '.join(unknown)}",
                        hint=f"Conv/MatMul/Gemm nodes in this graph: {', '.join(some) or 'none'}")
    return out


def record(kind: str, params: dict, artifact: Artifact, out: Path, src: onnx.ModelProto, t0: float,
           extra: dict | None = None) -> tuple[Artifact, StepRecord]:
    """Restore metadata, check the result loads, and decide ``changed`` by comparing the two graphs."""
    new_art, new = onnxutil.finish(artifact, src, out)
    d = quant_details(src, new) | (extra or {})
    total = d["int_ops"] + d["float_ops"]
    if d["quantized"] <= 0:
        summary = f"nothing to change: the quantizer converted 0 of {total} Conv/MatMul/Gemm nodes"
        return artifact, StepRecord(kind, params, False, summary, d, time.perf_counter() - t0)
    onnxutil.check_loads(out, kind)
    summary = f"quantized {d['int_ops']} of {total} Conv/MatMul/Gemm nodes"
    if d["stayed_float"]:
        summary += f"; float: {', '.join(d['stayed_float'][:5])}" + (" ..." if len(d["stayed_float"]) > 5 else "")
    return new_art, StepRecord(kind, params, True, summary, d, time.perf_counter() - t0)


@register("quantize-static", QuantizeStaticConfig, needs=("calib",))
def quantize_static_step(artifact: Artifact, cfg: QuantizeStaticConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Calibrated static quantization (QDQ or QOperator) with the target's quantization scheme."""
    t0 = time.perf_counter()
    src, d, pre, notes, pre_model = start_static(artifact, ctx)
    exclude = resolve_names(cfg.exclude_nodes, pre_model)
    out = d / "model.onnx"
    reader = CalibReader(ctx.calib, pre_model, ctx.target.quantization.calibration_samples)
    static_quantize(pre, out, ctx, exclude=exclude, reader=reader)
    remove_model(pre)
    q = ctx.target.quantization
    extra = {"scheme": q.model_dump(), "calibration_samples": reader.samples, "notes": notes,
             "excluded": exclude}
    return record("quantize-static", cfg.model_dump(), artifact, out, src, t0, extra)


@contextlib.contextmanager
def _no_preprocess_advice():
    """ORT's dynamic quantizer logs advice to pre-process on the root logger; dynamic quantization of
    MatMul/Gemm does not need it, so the line is dropped instead of reaching the user."""
    drop = lambda record: not record.getMessage().startswith("Please consider to run pre-processing")
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


@register("quantize-dynamic", QuantizeDynamicConfig)
def quantize_dynamic_step(artifact: Artifact, cfg: QuantizeDynamicConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Dynamic quantization: int8 weights, activations quantized at run time (MatMul/Gemm by default)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "quantize-dynamic")
    q = ctx.target.quantization
    notes = []
    wtype = q.weight_type
    if wtype not in ("int8", "uint8"):
        notes.append(f"dynamic quantization supports 8-bit weights only; used int8 instead of {wtype}")
        wtype = "int8"
    src = onnxutil.load(artifact.path)
    d = ctx.step_dir("quantize-dynamic")
    out = d / "model.onnx"
    # The dynamic quantizer only sees initializers: weights held in Constant nodes would stay float.
    model = onnxutil.load(artifact.path)
    onnxutil.constants_to_initializers(model)
    onnxutil.name_nodes(model)
    big = onnxutil.needs_external(artifact)
    inp = d / "input.onnx"
    onnxutil.save(model, inp, external=big)
    del model
    try:
        with _no_preprocess_advice():
            quantize_dynamic(str(inp), str(out), op_types_to_quantize=list(cfg.op_types),
                             per_channel=q.per_channel, reduce_range=q.reduce_range,
                             weight_type=QuantType.QInt8 if wtype == "int8" else QuantType.QUInt8,
                             use_external_data_format=big,
                             extra_options={"WeightSymmetric": q.symmetric_weights})
    except Exception as e:  # ORT raises ValueError, RuntimeError and its own types
        raise StepError(f"ONNX Runtime dynamic quantization failed: {str(e).splitlines()[0]}",
                        hint="try 'quantize-static' with --calib instead") from e
    remove_model(inp)
    extra = {"weight_type": wtype, "op_types": list(cfg.op_types), "notes": notes}
    return record("quantize-dynamic", cfg.model_dump(), artifact, out, src, t0, extra)


def remove_model(path: Path) -> None:
    """Delete an ONNX file and its external data file, if there."""
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()

