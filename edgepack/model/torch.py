"""Export a torch artifact to ONNX: exporter choice and fallback, dynamic batch, a check against torch."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from edgepack.errors import ModelError, StepError, first_line
from edgepack.model.onnx import external_locations, metadata_of
from edgepack.types import Artifact, ModelFormat

log = logging.getLogger(__name__)


def export_onnx(artifact: Artifact, out_dir: Path, *, opset: int, dynamic_batch: bool = True) -> Artifact:
    """Export a torch artifact to `out_dir/model.onnx`, checked against torch with ONNX Runtime.

    The batch dimension is dynamic when the model allows it (checked at batch 1 and 3); otherwise the
    export is static and a note says why. ONNX artifacts are returned as they are.
    """
    if artifact.format is ModelFormat.ONNX:
        return artifact
    if artifact.format is not ModelFormat.TORCH:
        raise StepError(f"cannot export a {artifact.format.value} model to ONNX; pass a PyTorch model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    examples = examples_of(artifact)
    module = artifact.module
    n_out = len(flat_outputs(forward(module, examples)))
    in_names, out_names = io_names("input", len(examples)), io_names("output", n_out)
    notes: list[str] = []
    dynamic = dynamic_batch and all(t.dim() > 0 for t in examples)
    exporter = _pick_exporter(module, opset)
    if dynamic:
        try:
            used = _export(module, examples, out, opset, in_names, out_names, True, exporter)
            diff = _verify(module, examples, out, in_names, batches=(1, 3))
            log.info("exported with %s exporter (dynamic batch), max diff %.3g", used, diff)
        except (StepError, _Mismatch) as e:
            notes.append(f"fixed batch {examples[0].shape[0]}: dynamic batch export failed ({e})")
            dynamic = False
    if not dynamic:
        used = _export(module, examples, out, opset, in_names, out_names, False, exporter)
        try:
            _verify(module, examples, out, in_names, batches=(None,))
        except _Mismatch as e:
            notes.append(f"ONNX output differs from torch: {e}")
    if used != exporter:
        notes.append(f"exported with the {used} exporter after the {exporter} exporter failed")
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if got != opset:
        notes.append(f"exported at opset {got} (asked {opset})")
    if artifact.metadata:
        props = {**metadata_of(model), **{str(k): str(v) for k, v in artifact.metadata.items()}}
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(out))
    files = (out, *(out_dir / loc for loc in external_locations(model)))
    return Artifact(path=out, format=ModelFormat.ONNX, files=files, metadata=dict(artifact.metadata),
                    notes=artifact.notes + tuple(notes))


class _Mismatch(Exception):
    pass


def _pick_exporter(module, opset: int) -> str:
    """torch.export-based ("dynamo") gives clean graphs but only at opset >= 18; TorchScript modules need the
    TorchScript-based exporter; programs from torch.export need dynamo."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return "torchscript"
    if isinstance(module, torch.fx.GraphModule) or opset >= 18:
        return "dynamo"
    return "torchscript"


def _export(module, examples, out: Path, opset, in_names, out_names, dynamic: bool, exporter: str) -> str:
    """Run one exporter, then the other if the first fails; returns the one that worked."""
    import torch

    order = [exporter]
    if not isinstance(module, torch.jit.ScriptModule) and not isinstance(module, torch.fx.GraphModule):
        order.append("torchscript" if exporter == "dynamo" else "dynamo")
    errors = []
    for name in order:
        for f in out.parent.glob(out.name + "*"):
            f.unlink()
        try:
            _run_exporter(module, examples, out, opset, in_names, out_names, dynamic, name)
            return name
        except Exception as e:
            log.debug("%s exporter failed", name, exc_info=True)
            cause = f" ({first_line(e.__cause__)})" if e.__cause__ is not None else ""
            errors.append(f"{name}: {first_line(e)}{cause}")
    raise StepError("ONNX export failed: " + "; ".join(errors))


def _run_exporter(module, examples, out: Path, opset, in_names, out_names, dynamic, exporter) -> None:
    import torch

    stdout = io.StringIO()
    chatty = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in chatty]
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stdout), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        stack.callback(lambda: log.debug("%s exporter said: %s", exporter, stdout.getvalue()[-2000:]))
        for lg, level in zip(chatty, levels):
            lg.setLevel(logging.WARNING)
            stack.callback(lg.setLevel, level)
        if exporter == "dynamo":
            args = tuple(_tile(t, 2) for t in examples) if dynamic else examples  # batch 1 would be specialised
            big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_500_000_000
            torch.onnx.export(module, args, str(out), input_names=in_names, output_names=out_names,
                              opset_version=max(opset, 18), dynamo=True, external_data=big, verbose=False,
                              dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in args) if dynamic else None)
        else:
            axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic else None
            torch.onnx.export(module, examples, str(out), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
    if dynamic and exporter == "dynamo":
        _rename_batch(out)


def _rename_batch(out: Path) -> None:
    """torch.export names the batch dim like 's77'; call it 'batch' as the TorchScript exporter does."""
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    first = model.graph.input[0].type.tensor_type.shape.dim
    sym = first[0].dim_param if len(first) and first[0].dim_param else None
    if not sym:
        return
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == sym:
                d.dim_param = "batch"
    onnx.save(model, str(out))


def _verify(module, examples, out: Path, in_names, *, batches) -> float:
    """Run the ONNX file with ONNX Runtime and torch on the same inputs; raise _Mismatch beyond 1e-4."""
    import numpy as np
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _Mismatch(f"ONNX Runtime cannot load the export: {first_line(e)}") from e
    worst = 0.0
    for b in batches:
        inputs = examples if b is None else tuple(_tile(t, b, noise=True) for t in examples)
        try:
            ref = [t.detach().numpy() for t in flat_outputs(forward(module, inputs))]
        except ModelError as e:
            raise _Mismatch(f"torch itself fails at batch {b}") from e
        try:
            got = session.run(None, {n: t.detach().numpy() for n, t in zip(in_names, inputs)})
        except Exception as e:
            raise _Mismatch(f"ONNX Runtime fails at batch {b}: {first_line(e)}") from e
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise _Mismatch(f"output shape {g.shape} instead of {r.shape} at batch {b}")
            diff = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            worst = max(worst, diff)
            if not diff <= 1e-4 * max(1.0, float(np.max(np.abs(r))) if r.size else 1.0):
                raise _Mismatch(f"max abs diff {diff:.3g} against torch at batch {b}")
    return worst


def _tile(t, batch: int, noise: bool = False):
    """`t` with `batch` rows: copies of its rows, with a little noise on floats so rows differ."""
    import torch

    reps = (batch + t.shape[0] - 1) // t.shape[0]
    out = t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()
    if noise and out.is_floating_point():
        gen = torch.Generator().manual_seed(batch)
        out = out + 0.01 * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out


def io_names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def torch_dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def examples_of(artifact: Artifact) -> tuple:
    import torch

    ex = artifact.example_inputs
    if ex is None:
        raise ModelError(f"cannot tell the input shape of {artifact.path}; pass --input-shape (e.g. 1,3,224,224)")
    ex = (ex,) if isinstance(ex, torch.Tensor) else tuple(ex)
    if not ex or not all(isinstance(t, torch.Tensor) for t in ex):
        raise ModelError(f"example inputs of {artifact.path} must be tensors (a tensor or a tuple of tensors)")
    return ex


def forward(module, inputs):
    import torch

    try:
        with torch.no_grad():
            return module(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ModelError(f"the model fails on inputs of shape {shapes}: {first_line(e)}; "
                         "check --input-shape") from e


def flat_outputs(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flat_outputs(item)]
    raise ModelError(f"the model returns a {type(out).__name__}; edgepack needs tensors (or tuples/dicts of them)")
