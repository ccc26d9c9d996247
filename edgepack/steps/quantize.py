"""ONNX Runtime int8/int16 quantization: static (calibrated, `quantize-static`) and dynamic (`quantize-dynamic`)."""
from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import DataError, StepError, first_line
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, frontend, register
from edgepack.types import Artifact, StepRecord

if TYPE_CHECKING:
    import onnx

    from edgepack.data import Dataset
    from edgepack.target import QuantScheme

log = logging.getLogger(__name__)


class QuantizeStaticConfig(StepConfig):
    exclude_nodes: list[str] = []


class QuantizeDynamicConfig(StepConfig):
    # What ONNX Runtime's CPU provider runs faster with dynamic int8: MatMul (MatMulInteger, Gemm becomes
    # MatMul + Add), its fused Attention and LSTM (DynamicQuantizeLSTM). ConvInteger is slower than float Conv.
    op_types: list[str] = ["MatMul", "Gemm", "Attention", "LSTM"]
    # below this share of the weights in MatMul/Gemm (and no LSTM), the few layers it speeds up cannot pay
    # for quantizing activations at run time (a CNN with a small classifier head)
    min_weight_share: float = 0.1


def qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8,
            "int16": QuantType.QInt16, "uint16": QuantType.QUInt16}[name]


CALIB_MEMORY = 3 * 2**30  # bytes of activations static calibration may hold


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
        batch = 1  # a static batch must be honoured: read it on the first input that has a batch axis
        axis_of = getattr(data, "axis", lambda name: 0)
        for i in inputs:
            ax, dims = axis_of(i.name), i.type.tensor_type.shape.dim
            if ax is not None and ax < len(dims):
                batch = max(dims[ax].dim_value, 1)
                break
        per_sample = onnxutil.activation_bytes(model)
        cap = max(8, CALIB_MEMORY // per_sample) if per_sample else limit  # ORT keeps every activation of
        n = min(len(data), limit, cap)  # every calibration sample in memory until it computes the ranges
        self.note = (f"calibrated on {n} of {len(data)} samples: the model's activations take about "
                     f"{per_sample / 2**20:.0f} MB per sample") if n < min(len(data), limit) else None
        n -= n % batch
        if n == 0:
            raise DataError(f"calibration data {data.source} has {len(data)} samples; the model needs batches of {batch}",
                            hint="pass more calibration samples")
        # Each input is cut on its own batch axis (Dataset.axis: a recurrent state may batch on axis 1); a
        # rank-0 array or an input without batch axis is one value for all samples and goes whole into every
        # batch. Every array is cast to the model's element type (int32 ids stay int32, lengths int64).
        arrays = {k: np.asarray(data.inputs[k]) for k in dtypes}
        for i in inputs:  # a rank-0 model input given one value per sample: the first one serves all batches
            if i.type.tensor_type.HasField("shape") and not i.type.tensor_type.shape.dim and arrays[i.name].ndim:
                arrays[i.name] = arrays[i.name].reshape(-1)[0]
        axes = {k: None if a.ndim == 0 else axis_of(k) for k, a in arrays.items()}
        self.feeds: list[dict[str, Any]] = []
        for start in range(0, n, batch):
            self.feeds.append({k: _contiguous(_take(arrays[k], axes[k], start, batch), dt) for k, dt in dtypes.items()})
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


def _contiguous(arr, dtype):
    """``arr`` as a C-contiguous array of ``dtype``; a rank-0 array stays rank 0 (np.ascontiguousarray makes it 1-D)."""
    import numpy as np

    out = np.asarray(arr, dtype=dtype)
    return out if out.flags.c_contiguous else out.copy(order="C")


def _take(arr, axis: int | None, start: int, count: int):
    """Samples ``start:start+count`` of ``arr`` on ``axis``; the whole array when it has no batch axis."""
    if axis is None:
        return arr
    index = [slice(None)] * arr.ndim
    index[axis] = slice(start, start + count)
    return arr[tuple(index)]


_PREPROCESSED: dict[tuple, tuple[Path, list[str]]] = {}  # one pack pre-processes a model once (int8, guard)


def preprocess(artifact: Artifact, out_dir: Path) -> tuple[Path, list[str]]:
    """Run ``quant_pre_process`` (shape inference + basic fusions) into ``out_dir``; fall back to the plain graph.

    Every node gets a name afterwards so that it can be reported and excluded. The result is reused for
    the same source file (unchanged) within this process: static int8 and its accuracy guard share it.
    """
    src_stat = Path(artifact.path).stat()
    key = (str(Path(artifact.path).absolute()), src_stat.st_mtime_ns, src_stat.st_size)
    done = _PREPROCESSED.get(key)
    if done is not None and done[0].exists():
        return done[0], list(done[1])
    out, notes = _preprocess(artifact, out_dir)
    _PREPROCESSED[key] = (out, list(notes))
    return out, notes


def _preprocess(artifact: Artifact, out_dir: Path) -> tuple[Path, list[str]]:
    from onnxruntime.quantization import quant_pre_process

    out = out_dir / "preprocessed.onnx"
    big = onnxutil.needs_external(artifact)
    notes: list[str] = []
    shaped = onnxutil.fully_shaped(onnxutil.load(artifact.path, with_data=False))
    attempts: tuple[dict, ...] = ({"skip_symbolic_shape": True},) if shaped else ({}, {"skip_symbolic_shape": True})
    src, dest, here = Path(artifact.path).absolute(), out.absolute(), out_dir.absolute()
    for kwargs in attempts:
        try:  # in out_dir: symbolic shape inference writes sym_shape_infer_temp.onnx and <uuid>.data to the CWD
            with quantizer_cwd(here):  # (and prints "Unable to determine if ..." on stdout)
                quant_pre_process(str(src), str(dest), save_as_external_data=big,
                                  external_data_location=out.name + ".data" if big else None, **kwargs)
            break
        except Exception as e:  # symbolic shape inference fails on some graphs: try without it
            log.info("quant_pre_process %s failed: %s", kwargs, e)
            if kwargs:
                notes.append(f"pre-processing failed ({first_line(e)}): quantized the graph as it was")
            else:
                notes.append(f"symbolic shape inference failed ({first_line(e)}): pre-processed without it")
    model = onnxutil.load(out if out.exists() else artifact.path)
    # Weights held in Constant nodes (Paddle, some tf2onnx exports) are activations to the quantizer: as
    # initializers they get int8 weight quantization (per channel where the scheme asks for it).
    moved = onnxutil.constants_to_initializers(model)
    if moved:
        notes.append(f"{moved} Constant node(s) turned into initializers")
    onnxutil.unshare_biases(model)
    onnxutil.name_nodes(model)
    onnxutil.save(model, out, external=big)
    return out, notes


def upgrade_for_qdq(artifact: Artifact, src: onnx.ModelProto, out_dir: Path,
                    ctx: Context) -> tuple[Artifact, list[str]]:
    """Bring a graph below opset 13 up to 13 when the scheme wants per-channel QDQ.

    ``DequantizeLinear(axis=...)`` (per-channel weights) exists from opset 13 on; ORT's quantizer writes it
    whatever the model's opset, and the result fails to load ("Unrecognized attribute: axis"). When onnx's
    version converter cannot convert the graph, the model is quantized with per-tensor weights instead
    (``static_quantize`` decides from the opset) and the note says so.
    """
    q = ctx.target.quantization
    have, want = onnxutil.opset_version(src), onnxutil.PER_CHANNEL_QDQ_OPSET
    if q.format != "qdq" or not q.per_channel or have >= want:
        return artifact, []
    try:
        new = onnxutil.upgrade_opset(src, want)
    except StepError as e:
        return artifact, [f"per-tensor weights: {e.args[0]} (per-channel QDQ needs opset {want})"]
    path = out_dir / f"opset{want}.onnx"
    onnxutil.save(new, path, external=onnxutil.needs_external(artifact))
    upgraded = Artifact(path=path, format=artifact.format, files=onnxutil.files_of(path), metadata=artifact.metadata)
    return upgraded, [f"upgraded the graph from opset {have} to {want} for per-channel QDQ"]


def _x86_cpu(ctx: Context) -> bool:
    """The candidate runs on ONNX Runtime's CPU provider on x86-64 (the target's arch, else this host's)."""
    import platform

    if ctx.target.arch != "any":
        return ctx.target.arch == "x86_64"
    provider = ctx.runtime.provider if ctx.runtime is not None else None
    return provider in (None, "CPUExecutionProvider") and platform.machine().lower() in ("x86_64", "amd64")


def seven_bit_weights(ctx: Context) -> bool:
    """Whether int8 weights must be quantized to 7 bits (``reduce_range``) for ONNX Runtime on x86.

    With int8 activations (S8S8) ORT's x86 integer GEMM shifts activations to uint8 and multiplies pairs
    with VPMADDUBSW, whose int16 sums saturate on CPUs without VNNI (AVX2, AVX-512 before Cascade Lake):
    a QDQ MatMul/Gemm then loses up to a few % of cosine although the QDQ graph itself is exact. 7-bit weights
    keep every pair sum in range on every x86 CPU, at a negligible accuracy cost with per-channel scales.
    """
    q = ctx.target.quantization
    return q.activation_type == "int8" and q.weight_type == "int8" and not q.reduce_range and _x86_cpu(ctx)


def start_static(artifact: Artifact,
                 ctx: Context) -> tuple[onnx.ModelProto, Path, Path, list[str], onnx.ModelProto]:
    """The start of static int8 (also the accuracy guard's): checks, then the source graph, the step folder, and
    the pre-processed model as (src, step_dir, pre_path, notes, pre_model)."""
    onnxutil.require_onnx(artifact, "quantize-static")
    if ctx.calib is None:
        raise StepError("static quantization needs calibration data", hint="pass --calib with ~100 typical inputs")
    src = onnxutil.load(artifact.path)
    done = onnxutil.quantized_ops(src)
    if done:  # quantize-static answers changed=False before coming here; the accuracy guard gets a clean error
        raise StepError(f"the model is already quantized ({onnxutil.describe_ops(done)})",
                        hint="it is measured as given (the fp32 candidates); static int8 does not apply")
    d = ctx.step_dir("quantize-static")
    source, notes = upgrade_for_qdq(artifact, src, d, ctx)
    pre, more = preprocess(source, d)
    if source is not artifact:
        remove_model(source.path)
    notes += more
    if seven_bit_weights(ctx):
        notes.append("int8 activations on x86: weights quantized to 7 bits (reduce_range), since ONNX Runtime's "
                     "int8 x int8 kernels saturate on CPUs without VNNI")
    return src, d, pre, notes, onnxutil.load(pre, with_data=False)


def static_quantize(pre: Path, out: Path, ctx: Context, *, exclude: list[str] | None = None,
                    include: list[str] | None = None, cache: Path | None = None,
                    reader: CalibReader | None = None) -> list[str]:
    """Quantize the pre-processed model ``pre`` into ``out`` with the target's QuantScheme.

    ``cache`` keeps the calibration ranges in a JSON file so that repeated runs (the accuracy guard) calibrate once.
    Returns the nodes it kept float on its own (beyond ``exclude``): a Softmax on float64, and the nodes around
    a tensor whose calibrated range is not finite (a log of zero, a -inf mask), whose scale would be inf/NaN.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    q: QuantScheme = ctx.target.quantization
    graph = onnxutil.load(pre, with_data=False)
    if reader is None and not (cache and cache.is_file()):
        reader = CalibReader(ctx.calib, graph, q.calibration_samples)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[q.calibration_method]
    # below opset 13 (the upgrade failed: start_static noted it) QDQ weights can only be per-tensor
    per_channel = q.per_channel and (q.format != "qdq" or onnxutil.opset_version(graph) >= onnxutil.PER_CHANNEL_QDQ_OPSET)
    given = list(exclude or [])
    auto = [n for n in [*front_end(graph), *uncalibrated_softmax(graph)] if n not in given]
    ranges = cache or out.with_name(out.stem + ".calibration.json")  # calibrate once even when retrying
    for _attempt in range(3):
        try:
            with quantizer_cwd(out.parent):
                quantize_static(
                    str(pre.absolute()), str(out.absolute()), reader,
                    quant_format=QuantFormat.QDQ if q.format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=list(q.op_types) or None,
                    per_channel=per_channel, reduce_range=q.reduce_range or seven_bit_weights(ctx),
                    activation_type=qtype(q.activation_type), weight_type=qtype(q.weight_type),
                    nodes_to_exclude=[*given, *auto] or None, nodes_to_quantize=include or None,
                    calibrate_method=method, calibration_cache_path=str(ranges.absolute()),
                    use_external_data_format=pre.with_name(pre.name + ".data").exists(),
                    extra_options={"ActivationSymmetric": q.symmetric_activations,
                                   "WeightSymmetric": q.symmetric_weights},
                )
        except Exception as e:  # ValueError/TypeError/AssertionError from the quantizer, ORT's own types
            raise quantizer_error(e, "ONNX Runtime static quantization", graph, ctx) from e
        more = [n for n in _nodes_around(graph, _bad_scales(out)) if n not in given and n not in auto]
        if not more:
            break
        log.info("non-finite quantization scales: keeping %s float", ", ".join(more))
        auto += more
    if cache is None:
        ranges.unlink(missing_ok=True)
    return auto


def front_end(model: onnx.ModelProto) -> list[str]:
    """The graph's signal front-end (see steps/frontend.py): kept float by every int8 path."""
    return frontend.front_end(frontend.onnx_nodes(model))


def kept_notes(kept: list[str], model: onnx.ModelProto) -> list[str]:
    """Notes on the nodes static_quantize kept float on its own: the front-end, and what ORT cannot quantize."""
    front = set(front_end(model)) & set(kept)
    rest = [n for n in kept if n not in front]
    notes = []
    if front:
        ops = {n.name: n.op_type for n in model.graph.node}
        notes.append(frontend.note(sorted(front), sum(ops.get(n) in onnxutil.QUANTIZABLE for n in front)))
    if rest:
        notes.append(f"kept float: {', '.join(rest[:8])}{' ...' if len(rest) > 8 else ''} (a Softmax on float64 "
                     "or a tensor with an infinite range: ONNX Runtime cannot quantize them)")
    return notes


def _bad_scales(path: Path) -> set[str]:
    """Tensors whose quantization scale came out inf, NaN or 0 (ORT names the scale ``<tensor>_scale``)."""
    import numpy as np
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    model = onnxutil.load(path, with_data=False)
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    bad = set()
    for t in model.graph.initializer:
        if t.name in scales and not uses_external_data(t):
            v = numpy_helper.to_array(t)
            if v.dtype.kind == "f" and not (np.all(np.isfinite(v)) and np.all(v > 0)):
                bad.add(t.name.removesuffix("_scale"))
    return bad


def _nodes_around(model: onnx.ModelProto, tensors: set[str]) -> list[str]:
    """Names of the nodes that produce or read any of ``tensors`` (keeping them float drops those tensors' QDQ)."""
    return [n.name for n in model.graph.node if tensors & {*n.input, *n.output}]


def uncalibrated_softmax(model: onnx.ModelProto) -> list[str]:
    """Softmax nodes whose output is not float32/float16 (float64 in DSP graphs such as swift-f0's).

    ORT calibrates float32/float16 tensors only, then forces every Softmax output's range to [0, 1] and fails
    on one it never calibrated ("Only an existing tensor can be modified, 'v452' is not."); such a Softmax
    stays float (the rest of the graph is quantized as usual).
    """
    types = onnxutil.tensor_types(model)
    return [n.name for n in model.graph.node
            if n.op_type == "Softmax" and types.get(n.output[0]) not in onnxutil.CALIBRATED_TYPES]


@contextlib.contextmanager
def quantizer_cwd(folder: Path):
    """Run a third-party quantizer inside the step folder, with its stdout kept out of edgepack's.

    ORT's symbolic shape inference writes ``sym_shape_infer_temp.onnx`` and ``<uuid>.data`` into the CWD,
    and its histogram calibrators print progress on stdout (which would corrupt ``--json`` output).
    """
    import numpy as np

    buf = io.StringIO()
    try:  # numpy warnings: ORT divides by the zero scale of a constant tensor before it handles it
        with contextlib.chdir(folder.absolute()), contextlib.redirect_stdout(buf), np.errstate(all="ignore"):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            log.debug("quantizer output: %s", text[-2000:])


_DATA_ERRORS = ("invalid dimensions", "invalid rank", "unexpected input data type", "invalid feed input",
                "required inputs", "missing input")


def quantizer_error(e: BaseException, what: str, model: onnx.ModelProto, ctx: Context, *,
                    calibrated: bool = True) -> StepError:
    """A third-party quantizer's failure as one StepError: its own reason first, then a hint that fits it
    (``calibrated``: the quantizer ran the model on the calibration data)."""
    reason = first_line(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if reason.endswith("for the following indices") and len(lines) > 1:  # ORT: the index detail comes next
        reason = f"{reason}: {lines[1]}"
    low = reason.lower()
    q = ctx.target.quantization
    ints = onnxutil.integer_inputs(model)
    if "unrecognized attribute: axis" in low:
        hint = ("per-channel QDQ needs opset 13; re-export the model with opset >= 13, or set per_channel = false "
                "in the target's [quantization]")
    elif "16" in q.activation_type + q.weight_type and any(k in low for k in ("16-bit", "int16", "uint16", "opset 21")):
        hint = "16-bit types need format = \"qdq\" in the target's [quantization]"
    elif calibrated and any(k in low for k in _DATA_ERRORS):
        shapes = ", ".join(f"{i.name} {_type_text(i)}" for i in onnxutil.graph_inputs(model))
        hint = f"the calibration data must match the model inputs ({shapes})"
    elif calibrated and ints and "truth value of an array" in low:
        hint = (f"the quantizer could not compute a range on the path of the integer input(s) "
                f"{', '.join(f'{k} ({v})' for k, v in ints.items())}; exclude the node that fails with exclude_nodes, "
                "or use the int8-dynamic candidate, which needs no ranges")
    elif not calibrated:
        hint = "exclude the failing node with exclude_nodes, or rely on the static int8 and fp32 candidates"
    else:
        hint = ("the graph has a construct ONNX Runtime's quantizer does not handle; exclude the failing node "
                "with exclude_nodes, or rely on the other candidates")
    return StepError(f"{what} failed: {reason}", hint=hint)


def _type_text(value_info) -> str:
    from onnx import TensorProto

    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return f"{TensorProto.DataType.Name(t.elem_type).lower()}{dims}"


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
    others = d.get("other_quantized") or {}  # e.g. {"LSTM -> DynamicQuantizeLSTM": 2}
    if d["quantized"] <= 0 and not others:
        summary = f"nothing to change: the quantizer converted 0 of {total} Conv/MatMul/Gemm nodes"
        return artifact, StepRecord(kind, params, False, summary, d, time.perf_counter() - t0)
    onnxutil.check_loads(out, kind)
    summary = f"quantized {d['int_ops']} of {total} Conv/MatMul/Gemm nodes"
    if others:
        summary += "; " + ", ".join(f"{n} {what}" for what, n in others.items())
    if d["stayed_float"]:
        summary += f"; float: {', '.join(d['stayed_float'][:5])}" + (" ..." if len(d["stayed_float"]) > 5 else "")
    return new_art, StepRecord(kind, params, True, summary, d, time.perf_counter() - t0)


@register("quantize-static", QuantizeStaticConfig, needs=("calib",))
def quantize_static_step(artifact: Artifact, cfg: QuantizeStaticConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Calibrated static quantization (QDQ or QOperator) with the target's quantization scheme."""
    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "quantize-static")
    unchanged = _already_quantized("quantize-static", cfg.model_dump(), artifact, t0)
    if unchanged is not None:
        return unchanged
    src, d, pre, notes, pre_model = start_static(artifact, ctx)
    exclude = resolve_names(cfg.exclude_nodes, pre_model)
    out = d / "model.onnx"
    reader = CalibReader(ctx.calib, pre_model, ctx.target.quantization.calibration_samples)
    kept = static_quantize(pre, out, ctx, exclude=exclude, reader=reader)
    notes += kept_notes(kept, pre_model)
    q = ctx.target.quantization
    notes += [reader.note] if reader.note else []
    extra = {"scheme": q.model_dump(), "calibration_samples": reader.samples, "notes": notes,
             "excluded": exclude}
    return with_notes(record("quantize-static", cfg.model_dump(), artifact, out, src, t0, extra), notes)


# Notes that change what the result is (not how it was made): they go into the step's summary too.
SUMMARY_NOTES = ("upgraded the graph", "per-tensor weights", "int8 activations on x86", "kept the signal front-end")


def with_notes(result: tuple[Artifact, StepRecord], notes: list[str]) -> tuple[Artifact, StepRecord]:
    """The record with the notes that matter for the result appended to its summary."""
    art, rec = result
    shown = [n for n in notes if n.startswith(SUMMARY_NOTES)]
    if not shown or not rec.changed:
        return art, rec
    return art, replace(rec, summary=f"{rec.summary}; {'; '.join(shown)}")


def _already_quantized(kind: str, params: dict, artifact: Artifact, t0: float,
                       model: onnx.ModelProto | None = None) -> tuple[Artifact, StepRecord] | None:
    """``changed=False`` for a model that is already quantized (measured as given), else None."""
    model = model if model is not None else onnxutil.load(artifact.path, with_data=False)
    found = onnxutil.quantized_ops(model)
    if not found:
        return None
    summary = f"nothing to change: the model is already quantized ({onnxutil.describe_ops(found)})"
    return artifact, StepRecord(kind, params, False, summary, {"already_quantized": found},
                                time.perf_counter() - t0)


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
    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "quantize-dynamic")
    graph = onnxutil.load(artifact.path, with_data=False)
    unchanged = _already_quantized("quantize-dynamic", cfg.model_dump(), artifact, t0, graph)
    if unchanged is not None:
        return unchanged
    todo = {op: n for op in cfg.op_types if (n := onnxutil.count_ops(graph, [op]))}
    if not todo:  # e.g. a CNN: ConvInteger would be slower than float Conv, so there is nothing worth doing
        summary = f"nothing to change: no {'/'.join(cfg.op_types)} to quantize"
        return artifact, StepRecord("quantize-dynamic", cfg.model_dump(), False, summary,
                                    {"op_types": list(cfg.op_types), "candidates": 0}, time.perf_counter() - t0)
    share = onnxutil.matmul_weight_share(graph)
    if "LSTM" not in todo and share < cfg.min_weight_share:
        summary = (f"nothing to change: MatMul/Gemm hold {share:.1%} of the weights (dynamic int8 pays off from "
                   f"{cfg.min_weight_share:.0%}; set min_weight_share to go below)")
        return artifact, StepRecord("quantize-dynamic", cfg.model_dump(), False, summary,
                                    {"op_types": list(cfg.op_types), "matmul_weight_share": share},
                                    time.perf_counter() - t0)
    del graph
    src = onnxutil.load(artifact.path)
    d = ctx.step_dir("quantize-dynamic")
    out = d / "model.onnx"
    inp, front, notes = dynamic_input(artifact, d)
    notes += dynamic_quantize(inp, out, ctx, cfg.op_types, src, exclude=front)
    remove_model(inp)
    new = onnxutil.load(out, with_data=False)
    others = {f"{op} -> {qop}": n for op, qop in (("LSTM", "DynamicQuantizeLSTM"), ("Attention", "QAttention"))
              if (n := onnxutil.count_ops(new, [qop]) - onnxutil.count_ops(src, [qop]))}
    del new
    extra = {"weight_type": dynamic_weight_type(ctx), "op_types": list(cfg.op_types), "candidates": todo,
             "notes": notes, "other_quantized": others}
    return record("quantize-dynamic", cfg.model_dump(), artifact, out, src, t0, extra)


def dynamic_input(artifact: Artifact, d: Path) -> tuple[Path, list[str], list[str]]:
    """The model as the dynamic quantizer needs it: weights held in Constant nodes become initializers (it only
    sees those), and every node has a name (to exclude nodes by). Returns its path, its signal front-end (kept
    float by every int8 path) and the note on it."""
    model = onnxutil.load(artifact.path)
    onnxutil.constants_to_initializers(model)
    onnxutil.name_nodes(model)
    inp = d / "input.onnx"
    onnxutil.save(model, inp, external=onnxutil.needs_external(artifact))
    front = front_end(model)
    return inp, front, kept_notes(front, model)


def dynamic_weight_type(ctx: Context) -> str:
    return ctx.target.quantization.weight_type if ctx.target.quantization.weight_type in ("int8", "uint8") else "int8"


def dynamic_quantize(inp: Path, out: Path, ctx: Context, op_types, src: onnx.ModelProto,
                     exclude: list[str] | None = None) -> list[str]:
    """ONNX Runtime dynamic int8 of ``inp`` (from dynamic_input) into ``out`` with ``exclude`` kept float; its
    notes."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = ctx.target.quantization
    wtype = dynamic_weight_type(ctx)
    notes = [] if wtype == q.weight_type else [f"dynamic quantization supports 8-bit weights only; used int8 "
                                                f"instead of {q.weight_type}"]
    try:
        with _no_preprocess_advice(), quantizer_cwd(out.parent):
            quantize_dynamic(str(inp.absolute()), str(out.absolute()), op_types_to_quantize=list(op_types),
                             per_channel=q.per_channel, reduce_range=q.reduce_range,
                             weight_type=QuantType.QInt8 if wtype == "int8" else QuantType.QUInt8,
                             nodes_to_exclude=list(exclude or []),
                             use_external_data_format=inp.with_name(inp.name + ".data").exists(),
                             # without shape inference (no pre-processing here) some outputs have no type
                             extra_options={"WeightSymmetric": q.symmetric_weights,
                                            "DefaultTensorType": TensorProto.FLOAT})
    except Exception as e:  # ORT raises ValueError, RuntimeError, AssertionError and its own types
        raise quantizer_error(e, "ONNX Runtime dynamic quantization", src, ctx, calibrated=False) from e
    return notes


def remove_model(path: Path) -> None:
    """Delete an ONNX file and its external data file, if there."""
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()

