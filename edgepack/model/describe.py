"""Describe a model: its input and output tensors, parameter count, op histogram, file hashes."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError
from edgepack.model.load import load_model
from edgepack.model.onnx import STANDARD_DOMAINS, all_nodes, prod, tensors
from edgepack.model.torch import examples_of, flat_outputs, forward, io_names, torch_dtype
from edgepack.types import Artifact, ModelFormat, TensorSpec


def io_specs(artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensors of an ONNX, OpenVINO IR or torch artifact."""
    if artifact.format is ModelFormat.ONNX:
        import onnx

        graph = onnx.load(str(artifact.path), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        return ([_onnx_spec(v) for v in graph.input if v.name not in inits], [_onnx_spec(v) for v in graph.output])
    if artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        model = ov.Core().read_model(str(artifact.path))
        return [_ov_spec(p) for p in model.inputs], [_ov_spec(p) for p in model.outputs]
    examples = examples_of(artifact)
    outputs = flat_outputs(forward(artifact.module, examples))
    in_names, out_names = io_names("input", len(examples)), io_names("output", len(outputs))
    return ([TensorSpec(n, torch_dtype(t), tuple(t.shape)) for n, t in zip(in_names, examples)],
            [TensorSpec(n, torch_dtype(t), tuple(t.shape)) for n, t in zip(out_names, outputs)])


def _onnx_spec(value) -> TensorSpec:
    from onnx.helper import tensor_dtype_to_np_dtype

    tt = value.type.tensor_type
    dtype = tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "float32"
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(value.name, dtype, dims)


def _ov_spec(port) -> TensorSpec:
    import numpy as np

    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, shape)



def count_parameters(artifact: Artifact) -> int:
    """Number of weights: torch parameters, ONNX initializers plus Constant tensors, OpenVINO constants."""
    if artifact.format is ModelFormat.TORCH:
        return int(sum(p.numel() for p in artifact.module.parameters()))
    if artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        model = ov.Core().read_model(str(artifact.path))
        return int(sum(prod(op.get_output_shape(0)) for op in model.get_ordered_ops() if op.get_type_name() == "Constant"))
    import onnx

    return _onnx_parameters(onnx.load(str(artifact.path), load_external_data=False).graph)


def _onnx_parameters(graph) -> int:
    return int(sum(prod(t.dims) for t in tensors(graph)))


def inspect_model(path: Path) -> dict:
    """A summary of a model: format, inputs, outputs, op histogram, parameters, size, opsets, metadata."""
    artifact = load_model(path)
    ins, outs = io_specs(artifact) if artifact.format is not ModelFormat.TORCH or artifact.example_inputs is not None \
        else ([], [])
    info: dict[str, Any] = {
        "path": str(artifact.path), "format": artifact.format.value,
        "inputs": [s.to_dict() for s in ins], "outputs": [s.to_dict() for s in outs],
        "parameters": count_parameters(artifact),
        "size_bytes": sum(f.stat().st_size for f in artifact.files),
        "files": [str(f) for f in artifact.files], "metadata": dict(artifact.metadata),
    }
    if artifact.format is ModelFormat.ONNX:
        import onnx

        model = onnx.load(str(artifact.path), load_external_data=False)
        ops = Counter(n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}.{n.op_type}" for n in all_nodes(model.graph))
        info.update(ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
                    opset={o.domain or "ai.onnx": o.version for o in model.opset_import},
                    producer=f"{model.producer_name} {model.producer_version}".strip(), ir_version=model.ir_version)
    elif artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        ops = Counter(op.get_type_name() for op in ov.Core().read_model(str(artifact.path)).get_ordered_ops())
        info["ops"] = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return info


def file_sha256(paths) -> str:
    """SHA-256 of one file (same as `sha256sum`), or of several: the sha256sum lines of each, sorted by name."""
    items = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    digests = []
    for p in items:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise ModelError(f"cannot read {p} to hash it: {e.strerror}") from e
        digests.append((p.name, h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    lines = "".join(f"{d}  {name}\n" for name, d in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()
