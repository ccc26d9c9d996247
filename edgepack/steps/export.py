"""`export-onnx`: a PyTorch model to ONNX (dynamic batch where the model allows)."""
from __future__ import annotations

import time

from edgepack.errors import StepError
from edgepack.steps import Context, StepConfig, register
from edgepack.types import Artifact, ModelFormat, StepRecord


class ExportConfig(StepConfig):
    opset: int = 17
    dynamic_batch: bool = True


@register("export-onnx", ExportConfig, needs=("torch",))
def export(artifact: Artifact, cfg: ExportConfig, ctx: Context) -> tuple[Artifact, StepRecord]:
    """Export a PyTorch model to ONNX."""
    from edgepack.model.torch import export_onnx

    if artifact.format is not ModelFormat.TORCH:
        raise StepError("export-onnx takes a PyTorch model")
    t0 = time.perf_counter()
    out = export_onnx(artifact, ctx.step_dir("export-onnx"), opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
    summary = f"exported to ONNX opset {cfg.opset}" + ("; " + "; ".join(out.notes) if out.notes else "")
    return out, StepRecord("export-onnx", cfg.model_dump(), True, summary, seconds=time.perf_counter() - t0)
