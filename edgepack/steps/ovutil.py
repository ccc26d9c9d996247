"""Small OpenVINO/NNCF helpers shared by the IR steps: read and save IR, count ops, quiet NNCF.

Heavy imports (openvino, nncf) happen inside the functions.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import StepError
from edgepack.types import Artifact, ModelFormat

log = logging.getLogger(__name__)

LOW_BIT_TYPES = ("u4", "i4", "u8", "i8")  # element types NNCF uses for compressed weights
_NOISE = re.compile(r"^(Exception from |Check '|FrontEnd API failed|Summary:|\s*$)")


def ov_reason(err: BaseException) -> str:
    """OpenVINO's multi-line error (source locations, check names) reduced to its reason, on one line."""
    lines = [ln.strip(" -\t") for ln in str(err).splitlines() if not _NOISE.match(ln)]
    reason = " ".join(ln for ln in lines if ln) or type(err).__name__
    return reason[:400]


def require_ir(artifact: Artifact, kind: str) -> None:
    if artifact.format is not ModelFormat.OPENVINO:
        raise StepError(
            f"step '{kind}' needs an OpenVINO IR model, got {artifact.format.value} ({artifact.path.name})",
            hint="put 'convert-ir' before it in the recipe",
        )


def read_ir(path: Path) -> Any:
    """Read an IR (.xml + .bin) into an ov.Model."""
    import openvino as ov

    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as e:
        raise StepError(f"OpenVINO cannot read {path}: {ov_reason(e)}") from e


def save_ir(model: Any, out_dir: Path, metadata: dict[str, str], *, compress_to_fp16: bool = False) -> Artifact:
    """Write model.xml/model.bin under out_dir, with metadata stored in rt_info under 'edgepack'."""
    import openvino as ov

    for key, value in metadata.items():
        model.set_rt_info(str(value), ["edgepack", str(key)])
    xml = out_dir / "model.xml"
    try:
        ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    except RuntimeError as e:
        raise StepError(f"OpenVINO cannot save the IR to {xml}: {ov_reason(e)}") from e
    return Artifact(path=xml, format=ModelFormat.OPENVINO, files=(xml, xml.with_suffix(".bin")),
                    metadata=dict(metadata))


def rt_metadata(model: Any) -> dict[str, str]:
    """The 'edgepack' section of a model's rt_info as a plain dict (empty when absent)."""
    if not model.has_rt_info(["edgepack"]):
        return {}
    keys = model.get_rt_info(["edgepack"]).astype(dict)
    return {str(k): model.get_rt_info(["edgepack", str(k)]).astype(str) for k in keys}


def op_counts(model: Any) -> Counter:
    """Histogram of op type names (FakeQuantize, Convolution, MatMul, ...)."""
    return Counter(op.get_type_name() for op in model.get_ordered_ops())


def compressed_weights(model: Any) -> Counter:
    """Weight Constants stored in a low-bit type, by element type ({"u4": 3, "u8": 1}).

    A low-bit Constant counts as a weight when it reaches input 0 of the dequantizing Subtract/Multiply
    (through a Convert); zero points, which reach input 1 of Subtract, do not count.
    """
    out: Counter = Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        etype = op.get_output_element_type(0).get_type_name()
        if etype not in LOW_BIT_TYPES:
            continue
        if any(_feeds_port0(t) for t in op.output(0).get_target_inputs()):
            out[etype] += 1
    return out


def _feeds_port0(target: Any) -> bool:
    node = target.get_node()
    if node.get_type_name() == "Convert":
        return any(_feeds_port0(t) for t in node.output(0).get_target_inputs())
    return target.get_index() == 0 and node.get_type_name() in ("Subtract", "Multiply", "Reshape")


# rt_info path where convert-ir notes the quantized ONNX ops it was given (OpenVINO folds dynamic quantization
# into float arithmetic, so the IR alone does not show it); outside the "edgepack" metadata section.
SOURCE_QUANTIZED = ("edgepack_source", "quantized_ops")


def already_quantized_ir(model: Any) -> str:
    """What shows an IR is already quantized ("12 FakeQuantize", "3 i8 weights", the ONNX ops convert-ir
    noted), or "" for a float IR."""
    parts = []
    fq = op_counts(model)["FakeQuantize"]
    if fq:
        parts.append(f"{fq} FakeQuantize")
    parts += [f"{n} {t} weights" for t, n in sorted(compressed_weights(model).items())]
    if model.has_rt_info(list(SOURCE_QUANTIZED)):
        parts.append("ONNX: " + model.get_rt_info(list(SOURCE_QUANTIZED)).astype(str))
    return ", ".join(parts)


def _weight_const(op: Any) -> Any:
    """The Constant behind an op's weight input (through Convert/Transpose/Reshape), or None."""
    src = op.input_value(1).get_node()
    while src.get_type_name() in ("Convert", "Transpose", "Reshape") and src.get_input_size():
        src = src.input_value(0).get_node()
    return src if src.get_type_name() == "Constant" else None


def matmul_weights(model: Any) -> int:
    """MatMul nodes whose second input is a constant (the weights NNCF's weight compression can touch)."""
    return sum(op.get_type_name() == "MatMul" and _weight_const(op) is not None for op in model.get_ordered_ops())


COMPUTE_OPS = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def matmul_weight_share(model: Any) -> float:
    """Share of the constant compute weights (convolutions and MatMuls) held by MatMuls: what weight-only
    compression touches; the IR counterpart of model.onnx.matmul_weight_share."""
    total = matmul = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in COMPUTE_OPS or op.get_input_size() < 2:
            continue
        const = _weight_const(op)
        if const is None:
            continue
        size = int(np.prod(list(const.get_output_shape(0))))
        total += size
        matmul += size if op.get_type_name() == "MatMul" else 0
    return matmul / total if total else 0.0


class _Forward(logging.Handler):
    """Re-logs NNCF records under edgepack's logger at DEBUG and keeps their text for parsing."""

    def __init__(self, target: logging.Logger, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.target, self.lines = target, lines

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(msg)
        self.target.debug("nncf %s: %s", record.levelname.lower(), msg)


@contextlib.contextmanager
def quiet_nncf(target: logging.Logger | None = None) -> Iterator[list[str]]:
    """Run NNCF without its stdout log handler and progress bars; yields the list of its log messages.

    NNCF logs to a stdout handler installed at import and draws rich progress bars on sys.stdout; both
    would corrupt `--json` output, so records go to edgepack's logger at DEBUG and stdout is captured.
    """
    from edgepack.lazy import torch_hidden
    from edgepack.runtimes.sigstack import keep_sigaltstack

    import_nncf()  # installs nncf's logger and handler
    nlog = logging.getLogger("nncf")
    lines: list[str] = []
    saved = (list(nlog.handlers), nlog.level, nlog.propagate)
    fwd = _Forward(target or log, lines)
    for h in saved[0]:
        nlog.removeHandler(h)
    nlog.addHandler(fwd)
    nlog.setLevel(logging.INFO)
    nlog.propagate = False
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), torch_hidden(), keep_sigaltstack():
            yield lines
    finally:
        nlog.removeHandler(fwd)
        for h in saved[0]:
            nlog.addHandler(h)
        nlog.setLevel(saved[1])
        nlog.propagate = saved[2]
        text = buf.getvalue().strip()
        if text:
            (target or log).debug("nncf output: %s", text[-2000:])



def import_nncf():
    """NNCF without PyTorch (see edgepack.lazy)."""
    from edgepack.lazy import import_without_torch

    import_without_torch("nncf")
    import nncf

    return nncf


def front_end_scope(model: Any, names: tuple[str, ...] | list[str] = ()) -> tuple[dict[str, Any], str | None]:
    """NNCF keyword arguments that keep ``names`` and the model's signal front-end (steps/frontend.py) float,
    and a note on the front-end. The user's names alone are validated against the model."""
    from edgepack.steps import frontend

    nodes = frontend.openvino_nodes(model)
    kinds = {name: kind for name, kind, _ in nodes}
    kept = [n for n in frontend.front_end(nodes) if kinds.get(n) not in ("Constant", "Parameter", "Convert")]
    if not kept and not names:
        return {}, None
    scope = {"ignored_scope": import_nncf().IgnoredScope(names=[*names, *kept], validate=not kept)}
    if not kept:
        return scope, None
    weighted = sum(kinds[n] in ("Convolution", "GroupConvolution", "MatMul") for n in kept)
    return scope, frontend.note(kept, weighted)
