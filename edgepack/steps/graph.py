"""Graph steps: ONNX Runtime offline optimization (`optimize-graph`) and static input shapes (`fix-shapes`)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edgepack.errors import StepError, first_line
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, StepRecord

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


class OptimizeGraphConfig(StepConfig):
    level: Literal["basic", "extended"] = "basic"


class FixShapesConfig(StepConfig):
    pass


def _provider(ctx: Context) -> str | None:
    return ctx.runtime.provider if ctx.runtime is not None else None


@register("optimize-graph", OptimizeGraphConfig)
def optimize_graph(artifact: Artifact, cfg: OptimizeGraphConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Fold constants and fuse nodes with ONNX Runtime's offline optimizer (portable levels only)."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "optimize-graph")
    src = onnxutil.load(artifact.path)
    level, notes = cfg.level, []
    # Extended fusions write com.microsoft ops (FusedConv, ...) that only the CPU provider runs.
    if level == "extended" and _provider(ctx) != "CPUExecutionProvider":
        level = "basic"
        notes.append(f"level 'extended' needs the CPU provider (got {_provider(ctx) or 'none'}); used 'basic'")
    out = ctx.step_dir("optimize-graph") / "model.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if level == "extended"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.optimized_model_filepath = str(out)
    if onnxutil.needs_external(artifact):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(artifact.path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several unrelated exception types
        raise StepError(f"ONNX Runtime cannot optimize {artifact.path.name}: {first_line(e)}",
                        hint="check the model loads in onnxruntime, or drop 'optimize-graph' from the recipe") from e
    new_art, new = onnxutil.finish(artifact, src, out)
    onnxutil.check_loads(out, "optimize-graph")
    before, after = onnxutil.op_histogram(src), onnxutil.op_histogram(new)
    n0, n1 = sum(before.values()), sum(after.values())
    # e.g. FusedConv: runs on ORT CPU only, and quantize-static leaves it float
    contrib = sorted({n.op_type for n in new.graph.node if n.domain == "com.microsoft"})
    details = {"level": level, "nodes_before": n0, "nodes_after": n1, "ops_before": before, "ops_after": after,
               "contrib_ops": contrib, "notes": notes}
    changed = before != after or len(src.graph.initializer) != len(new.graph.initializer)
    summary = (f"{n0} -> {n1} nodes ({level} level, constant folding)" if changed
               else f"nothing to change: ONNX Runtime {level} optimization left all {n0} nodes as they were")
    if notes:
        summary += f"; {notes[0]}"
    return new_art, StepRecord("optimize-graph", cfg.model_dump(), changed, summary, details,
                               time.perf_counter() - t0)


def _dims(value_info) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        else:
            out.append(d.dim_param or None)
    return out


def _static_shapes(model: onnx.ModelProto, ctx: Context) -> dict[str, list[int]]:
    """Resolve a static shape for every graph input, or raise naming every dim that stays unknown."""
    policy = ctx.target.shapes
    calib = ctx.calib.inputs if ctx.calib is not None else {}
    shapes, missing = {}, []
    for inp in onnxutil.graph_inputs(model):
        dims = _dims(inp)
        if inp.name in policy.static:
            want = list(policy.static[inp.name])
            clash = [i for i, (d, w) in enumerate(zip(dims, want)) if isinstance(d, int) and d != w]
            if len(want) != len(dims) or clash or any(w <= 0 for w in want):
                raise StepError(f"shapes.static gives {inp.name} shape {want}, but the model input is {dims}",
                                hint="give one positive size per dim, matching the model's fixed dims")
            shapes[inp.name] = want
            continue
        shape = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(policy.batch)
            elif inp.name in calib and calib[inp.name].ndim == len(dims):
                shape.append(int(calib[inp.name].shape[i]))
            else:
                shape.append(0)
                missing.append(f"{inp.name}[{i}]={d or '?'}")
        shapes[inp.name] = shape
    if missing:
        raise StepError(f"cannot make input shapes static: no size for {', '.join(missing)}",
                        hint="set shapes.static in the target (e.g. input = [1, 3, 224, 224]) or pass --calib")
    return shapes


@register("fix-shapes", FixShapesConfig)
def fix_shapes(artifact: Artifact, cfg: FixShapesConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Make every input shape static (target batch and shapes.static), then infer the shapes inside."""
    import onnx

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "fix-shapes")
    # Shape inference works on the graph alone; weights are loaded back before saving.
    model = onnxutil.load(artifact.path, with_data=False)
    shapes = _static_shapes(model, ctx)
    before = {i.name: _dims(i) for i in onnxutil.graph_inputs(model)}
    for inp in onnxutil.graph_inputs(model):
        for d, size in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
            d.Clear()
            d.dim_value = size
    del model.graph.value_info[:]  # stale symbolic shapes; inference rebuilds them
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and others
        raise StepError(f"shape inference failed after fixing input shapes {shapes}: {first_line(e)}",
                        hint="check shapes.static in the target matches what the model accepts") from e
    bad = {n: d for n, d in ((i.name, _dims(i)) for i in onnxutil.graph_inputs(model))
           if not all(isinstance(x, int) and x > 0 for x in d)}
    if bad:
        raise StepError(f"inputs still not static after fix-shapes: {bad}", hint="set shapes.static in the target")
    onnx.load_external_data_for_model(model, str(Path(artifact.path).parent))
    out = ctx.step_dir("fix-shapes") / "model.onnx"
    onnxutil.save(model, out)
    src = onnxutil.load(artifact.path, with_data=False)
    new_art, new = onnxutil.finish(artifact, src, out)
    onnxutil.check_loads(out, "fix-shapes")
    outputs = {o.name: _dims(o) for o in new.graph.output}
    changed = before != shapes
    summary = ("input shapes " + ", ".join(f"{k}={v}" for k, v in shapes.items()) if changed
               else "nothing to change: every input shape was already static")
    details = {"inputs_before": before, "inputs": shapes, "outputs": outputs}
    return new_art, StepRecord("fix-shapes", cfg.model_dump(), changed, summary, details, time.perf_counter() - t0)
