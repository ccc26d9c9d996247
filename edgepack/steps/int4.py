"""Weight-only 4-bit quantization of MatMul weights (`int4`) into ONNX Runtime's MatMulNBits."""
from __future__ import annotations

import contextlib
import logging
import time

from pydantic import field_validator

from edgepack.errors import StepError, first_line
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)


class Int4Config(StepConfig):
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    exclude_nodes: list[str] = []
    gemm_as_matmul: bool = True  # rewrite plain Gemms with constant weights as MatMul so they get 4-bit too
    # int4 weight-only pays off on MatMul-heavy models (transformers, MLPs, unrolled RNNs); on a CNN whose
    # classifier head is the only MatMul it changes neither size nor speed: skip below this share of weights
    min_weight_share: float = 0.5

    @field_validator("min_weight_share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("min_weight_share must be between 0 and 1")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("block_size must be a power of two, at least 16")
        return v


def gemms_to_matmuls(model) -> int:
    """Rewrite each Gemm that is a plain ``A @ B' + C`` with a constant 2-D float B as MatMul (+ Add).

    MatMulNBits only replaces MatMul; unrolled RNNs and classifier heads are Gemms. Gemms with alpha/beta != 1,
    transA or a computed B stay as they are. The MatMul keeps the Gemm's name. Returns how many changed.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    names = {o for n in model.graph.node for o in n.output} | set(inits) | {i.name for i in model.graph.input}
    new_nodes, count, transposed = [], 0, set()
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        b = inits.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if b is None or not plain or len(b.dims) != 2:
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(b)
        if w.dtype not in (np.float32, np.float16):
            new_nodes.append(n)
            continue
        if attrs.get("transB", 0):
            wname = f"{b.name}_T"
            while wname in names:
                wname += "_"
            names.add(wname)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), wname))
            transposed.add(b.name)
        else:
            wname = b.name
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        mm_out = n.output[0]
        if bias:
            mm_out = f"{n.output[0]}_matmul"
            while mm_out in names:
                mm_out += "_"
            names.add(mm_out)
        new_nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name or mm_out))
        if bias:
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [n.output[0]], name=f"{n.name or mm_out}_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for nd in model.graph.node for i in nd.input} | {i.name for i in model.graph.input}
        for t in [t for t in model.graph.initializer if t.name in transposed and t.name not in used]:
            model.graph.initializer.remove(t)  # replaced by its transposed copy
    return count


@contextlib.contextmanager
def _quiet_nbits():
    """ORT's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) at import and logs one line per node:
    keep the root logger as it was and its lines at DEBUG under edgepack's logger."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mod
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    qlog = logging.getLogger(mod.__name__)
    level = qlog.level
    qlog.setLevel(logging.WARNING)
    try:
        yield mod
    finally:
        qlog.setLevel(level)


def eligible_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is a constant 2-D float weight (what MatMulNBits can hold)."""
    import numpy as np

    weights = onnxutil.weight_tensors(model)
    return [n.name or n.output[0] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights
            and weights[n.input[1]].ndim == 2 and weights[n.input[1]].dtype in (np.float32, np.float16)]


@register("int4", Int4Config)
def int4(artifact: Artifact, cfg: Int4Config, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Block-wise 4-bit weights for MatMul (MatMulNBits); activations stay float."""
    from onnxruntime.quantization import QuantFormat

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "int4")
    src = onnxutil.load(artifact.path)
    found = onnxutil.quantized_ops(src)
    if found:
        return artifact, StepRecord("int4", cfg.model_dump(), False,
                                    f"nothing to change: the model is already quantized ({onnxutil.describe_ops(found)})",
                                    {"already_quantized": found, "eligible": 0, "matmul_nbits": 0},
                                    time.perf_counter() - t0)
    # Not pre-processed on purpose: after quant_pre_process the quantizer silently changed nothing.
    model = onnxutil.load(artifact.path)
    onnxutil.constants_to_initializers(model)  # the quantizer only looks at initializers (Paddle: Constant nodes)
    gemms = gemms_to_matmuls(model) if cfg.gemm_as_matmul else 0
    onnxutil.name_nodes(model)
    eligible = eligible_matmuls(model)
    if not eligible:
        return artifact, StepRecord("int4", cfg.model_dump(), False,
                                    "nothing to change: no MatMul with a constant 2-D weight",
                                    {"eligible": 0, "matmul_nbits": 0}, time.perf_counter() - t0)
    share = onnxutil.matmul_weight_share(src)
    if share < cfg.min_weight_share:
        summary = (f"nothing to change: MatMul/Gemm hold {share:.1%} of the weights (int4 weight-only pays off "
                   f"from {cfg.min_weight_share:.0%}; set min_weight_share to go below)")
        return artifact, StepRecord("int4", cfg.model_dump(), False, summary,
                                    {"eligible": len(eligible), "matmul_nbits": 0, "matmul_weight_share": share},
                                    time.perf_counter() - t0)
    out_dir = ctx.step_dir("int4")
    try:
        with _quiet_nbits() as nbits, contextlib.chdir(out_dir.absolute()):
            algo = nbits.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                                      accuracy_level=cfg.accuracy_level,
                                                      quant_format=QuantFormat.QOperator)
            q = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=cfg.exclude_nodes, algo_config=algo)
            q.process()
            new = q.model.model
    except Exception as e:  # the quantizer raises AssertionError/ValueError on shapes it cannot handle
        raise StepError(f"4-bit weight quantization failed: {first_line(e)}",
                        hint="exclude the failing MatMul with exclude_nodes, or use a larger block_size") from e
    count = onnxutil.op_histogram(new).get("MatMulNBits", 0)
    details = {"eligible": len(eligible), "matmul_nbits": count, "block_size": cfg.block_size,
               "matmul_weight_share": share, "gemm_as_matmul": gemms, "nodes_before": len(src.graph.node), "nodes_after": len(new.graph.node),
               "stayed_float": [n.name for n in new.graph.node if n.op_type == "MatMul"]}
    if count == 0:
        summary = f"nothing to change: the 4-bit quantizer converted 0 of {len(eligible)} eligible MatMul nodes"
        return artifact, StepRecord("int4", cfg.model_dump(), False, summary, details, time.perf_counter() - t0)
    out = out_dir / "model.onnx"
    onnxutil.save(new, out)
    new_art, _ = onnxutil.finish(artifact, src, out)
    onnxutil.check_loads(out, "int4")
    summary = f"{count} of {len(eligible)} MatMul nodes now 4-bit MatMulNBits (block {cfg.block_size})"
    if gemms:
        summary += f"; {gemms} Gemm node(s) rewritten as MatMul first"
    return new_art, StepRecord("int4", cfg.model_dump(), True, summary, details, time.perf_counter() - t0)
