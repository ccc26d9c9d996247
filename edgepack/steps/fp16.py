"""Half-precision weights and compute (`fp16`) with onnxconverter-common; inputs and outputs stay float32."""
from __future__ import annotations

import logging
import time
from typing import Any

from edgepack.errors import StepError, first_line
from edgepack.model import onnx as onnxutil
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, StepRecord

log = logging.getLogger(__name__)


class Fp16Config(StepConfig):
    keep_io_types: bool = True
    op_block_list: list[str] | None = None  # None: onnxconverter-common's default list of ops kept in fp32


def _float_weights(model) -> tuple[int, int]:
    """(float32, float16) counts of constant tensors with more than one element."""
    import numpy as np

    w = [a for a in onnxutil.weight_tensors(model).values() if a.size > 1]
    return sum(a.dtype == np.float32 for a in w), sum(a.dtype == np.float16 for a in w)


@register("fp16", Fp16Config)
def fp16(artifact: Artifact, cfg: Fp16Config, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Convert weights and compute to float16 (inputs/outputs stay float32 unless keep_io_types is off)."""
    from onnxconverter_common import float16

    t0 = time.perf_counter()
    onnxutil.require_onnx(artifact, "fp16")
    src = onnxutil.load(artifact.path)
    found = onnxutil.quantized_ops(src)
    if found:  # the converter would cast the inputs of (Dynamic)QuantizeLinear to float16, which they refuse
        summary = f"nothing to change: the model is already quantized ({onnxutil.describe_ops(found)})"
        return artifact, StepRecord("fp16", cfg.model_dump(), False, summary, {"already_quantized": found},
                                    time.perf_counter() - t0)
    f32_before, f16_before = _float_weights(src)
    if f32_before == 0:
        summary = "nothing to change: no float32 weights" + (" (already float16)" if f16_before else "")
        return artifact, StepRecord("fp16", cfg.model_dump(), False, summary,
                                    {"fp32_weights": 0, "fp16_weights": f16_before}, time.perf_counter() - t0)
    kwargs: dict[str, Any] = {"keep_io_types": cfg.keep_io_types}
    if cfg.op_block_list is not None:
        kwargs["op_block_list"] = cfg.op_block_list
    try:
        # a fresh copy: the converter edits the proto in place
        new = float16.convert_float_to_float16(onnxutil.load(artifact.path), **kwargs)
    except Exception as e:  # the converter raises plain Exception/ValueError on unsupported graphs
        raise StepError(f"float16 conversion failed: {first_line(e)}",
                        hint="add the failing op to op_block_list in the recipe") from e
    f32_after, f16_after = _float_weights(new)
    if f16_after == 0:
        raise StepError(f"float16 conversion left all {f32_after} float32 weights unchanged",
                        hint="check op_block_list does not name every op of the model")
    out = ctx.step_dir("fp16") / "model.onnx"
    onnxutil.save(new, out)
    new_art, new = onnxutil.finish(artifact, src, out)
    onnxutil.check_loads(out, "fp16")
    before, after = onnxutil.op_histogram(src), onnxutil.op_histogram(new)
    details = {"fp32_weights_before": f32_before, "fp32_weights": f32_after, "fp16_weights": f16_after,
               "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
               "casts_added": after.get("Cast", 0) - before.get("Cast", 0),
               "keep_io_types": cfg.keep_io_types}
    summary = f"{f16_after} of {f16_after + f32_after} weight tensors now float16"
    if f32_after:
        summary += f" ({f32_after} kept float32 by the op block list)"
    return new_art, StepRecord("fp16", cfg.model_dump(), True, summary, details, time.perf_counter() - t0)
