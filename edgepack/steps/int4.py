"""Weight-only 4-bit quantization of MatMul weights (`int4`) into ONNX Runtime's MatMulNBits."""
from __future__ import annotations

import logging
import time

from pydantic import field_validator

from edgepack.errors import StepError
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)


class Int4Config(StepConfig):
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    exclude_nodes: list[str] = []

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("block_size must be a power of two, at least 16")
        return v


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
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "int4")
    src = onnxutil.load(artifact.path)
    # Not pre-processed on purpose: after quant_pre_process the quantizer silently changed nothing.
    model = onnxutil.load(artifact.path)
    onnxutil.constants_to_initializers(model)  # the quantizer only looks at initializers
    onnxutil.name_nodes(model)
    eligible = eligible_matmuls(model)
    if not eligible:
        return artifact, StepRecord("int4", cfg.model_dump(), False,
                                    "nothing to change: no MatMul with a constant 2-D weight",
                                    {"eligible": 0, "matmul_nbits": 0}, time.perf_counter() - t0)
    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                        accuracy_level=cfg.accuracy_level, quant_format=QuantFormat.QOperator)
    try:
        q = MatMulNBitsQuantizer(model, nodes_to_exclude=cfg.exclude_nodes, algo_config=algo)
        q.process()
        new = q.model.model
    except Exception as e:  # the quantizer raises AssertionError/ValueError on shapes it cannot handle
        raise StepError(f"4-bit weight quantization failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        hint="exclude the failing MatMul with exclude_nodes, or use a larger block_size") from e
    count = onnxutil.op_histogram(new).get("MatMulNBits", 0)
    details = {"eligible": len(eligible), "matmul_nbits": count, "block_size": cfg.block_size,
               "nodes_before": len(src.graph.node), "nodes_after": len(new.graph.node),
               "stayed_float": [n.name for n in new.graph.node if n.op_type == "MatMul"]}
    if count == 0:
        summary = f"nothing to change: the 4-bit quantizer converted 0 of {len(eligible)} eligible MatMul nodes"
        return artifact, StepRecord("int4", cfg.model_dump(), False, summary, details, time.perf_counter() - t0)
    out = ctx.step_dir("int4") / "model.onnx"
    onnxutil.save(new, out)
    new_art, _ = onnxutil.finish(artifact, src, out)
    onnxutil.check_loads(out, "int4")
    summary = f"{count} of {len(eligible)} MatMul nodes now 4-bit MatMulNBits (block {cfg.block_size})"
    return new_art, StepRecord("int4", cfg.model_dump(), True, summary, details, time.perf_counter() - t0)
