"""All ONNX proto helpers (steps, loading, describing): load/save (external data), op counts, weights, metadata."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import StepError, first_line
from edgepack.types import Artifact, ModelFormat

if TYPE_CHECKING:
    import numpy as np
    import onnx

log = logging.getLogger(__name__)

# Compute ops that carry the model's weights and dominate its cost.
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Ops whose arithmetic is integer (QOperator, dynamic and weight-only formats).
INT_COMPUTE = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulNBits",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QLinearConvTranspose",
})
QUANTIZABLE = ("Conv", "MatMul", "Gemm")
# Ops that only appear in a model somebody already quantized (static QDQ or QOperator, dynamic, weight-only).
QUANTIZED_OPS = frozenset(INT_COMPUTE | {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeLSTM", "QLinearAdd",
    "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean", "QEmbedLayerNormalization",
    "QOrderedMatMul", "QOrderedAttention", "MatMulBnb4", "GatherBlockQuantized", "MatMulFpQ4",
})
# Element types of tensors that carry real-valued activations (everything else is ids, lengths, masks).
FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
# Element types ONNX Runtime's calibrators collect ranges for (FLOAT, FLOAT16).
CALIBRATED_TYPES = frozenset({1, 10})
# The lowest opset where DequantizeLinear takes `axis` (per-channel QDQ).
PER_CHANNEL_QDQ_OPSET = 13
# Protobuf cannot hold more than 2 GiB; stay well below it.
EXTERNAL_DATA_BYTES = 1_800_000_000


def require_onnx(artifact: Artifact, kind: str) -> None:
    if artifact.format is not ModelFormat.ONNX:
        raise StepError(
            f"step '{kind}' needs an ONNX model, got {artifact.format.value}",
            hint="put 'export-onnx' before it in the recipe",
        )


def model_bytes(artifact: Artifact) -> int:
    files = artifact.files or (artifact.path,)
    return sum(p.stat().st_size for p in files if Path(p).is_file())


def needs_external(artifact: Artifact) -> bool:
    return model_bytes(artifact) > EXTERNAL_DATA_BYTES


def load(path: Path, *, with_data: bool = True) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=with_data)
    except Exception as e:  # onnx raises DecodeError, OSError, ValidationError...
        raise StepError(f"cannot read ONNX model {path}: {e}", hint="check the file is a complete .onnx model") from e


def save(model: onnx.ModelProto, path: Path, *, external: bool | None = None) -> tuple[Path, ...]:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` when the model is too big for one protobuf."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        try:
            external = model.ByteSize() > EXTERNAL_DATA_BYTES
        except Exception:  # protobuf (upb) cannot even size a message over 2 GB: it needs external data
            external = True
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return (path, data)
    onnx.save_model(model, str(path))
    return (path,)


def files_of(path: Path) -> tuple[Path, ...]:
    """The model file plus the external data files it names (read from the graph, not guessed)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return (path, *sorted({path.parent / loc for loc in external_locations(model)}))


def output_artifact(src: Artifact, path: Path, *notes: str) -> Artifact:
    return replace(src, path=path, format=ModelFormat.ONNX, files=files_of(path), module=None,
                   example_inputs=None, notes=src.notes + notes)


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, extra: dict[str, str] | None = None) -> None:
    """Give ``dst`` the metadata_props of ``src`` (plus ``extra``), keeping any key ``dst`` already has."""
    have = {p.key: p for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key in have:
            have[p.key].value = p.value
        else:
            dst.metadata_props.add(key=p.key, value=p.value)
    for k, v in (extra or {}).items():
        if k not in {p.key for p in dst.metadata_props}:
            dst.metadata_props.add(key=k, value=v)


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def finish(src_artifact: Artifact, src: onnx.ModelProto, out_path: Path, *notes: str) -> tuple[Artifact, onnx.ModelProto]:
    """Reload a file a library wrote, restore metadata_props from ``src``, save it back; return the artifact."""
    model = load(out_path)
    copy_metadata(src, model, src_artifact.metadata)
    save(model, out_path)
    art = output_artifact(src_artifact, out_path, *notes)
    return replace(art, metadata=metadata_of(model)), model


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count over the main graph and every subgraph."""
    return dict(sorted(Counter(n.op_type for n in all_nodes(model.graph)).items()))


def all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g.node:
                yield from all_nodes(a.g)
            for g in a.graphs:
                yield from all_nodes(g)


def compute_split(model: onnx.ModelProto) -> dict[str, Any]:
    """Count compute nodes doing integer vs float arithmetic.

    In QDQ format a Conv/MatMul/Gemm whose data and weight both come out of DequantizeLinear runs as an integer
    kernel in ONNX Runtime (it fuses the pattern), so it counts as integer.
    """
    producer = {o: n for n in model.graph.node for o in n.output}

    def from_dq(name: str) -> bool:
        n = producer.get(name)
        return n is not None and n.op_type == "DequantizeLinear"

    int_nodes: list[str] = []
    float_nodes: list[str] = []
    for n in all_nodes(model.graph):
        if n.op_type in INT_COMPUTE:
            int_nodes.append(n.name or n.op_type)
        elif n.op_type in FLOAT_COMPUTE:
            qdq = len(n.input) >= 2 and from_dq(n.input[0]) and from_dq(n.input[1])
            (int_nodes if qdq else float_nodes).append(n.name or n.op_type)
    return {"int_ops": len(int_nodes), "float_ops": len(float_nodes), "float_nodes": float_nodes}


def weight_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor: initializers and the ``value`` of Constant nodes (main graph)."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move tensor-valued Constant nodes of the main graph into initializers (quantizers only see those)."""
    moved = []
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = n.attribute[0].t
            t.name = n.output[0]
            model.graph.initializer.append(t)
            moved.append(n)
    for n in moved:
        model.graph.node.remove(n)
    return len(moved)


def name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed nodes a stable name (``Conv_3``) so they can be listed and excluded."""
    used = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)
            count += 1
    return count


def graph_inputs(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def check_loads(path: Path, kind: str) -> None:
    """Open the model with plain ONNX Runtime on CPU: a step must not hand on a model that cannot run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise StepError(f"step '{kind}' wrote a model ONNX Runtime CPU cannot load: {first_line(e)}",
                        hint="remove this step from the recipe or report the model") from e


STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def tensors(graph) -> Iterator:
    """Weights: initializers and Constant-node tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(sub)


def external_locations(model) -> list[str]:
    """File names of the external data a model refers to (in order of first use)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    seen: dict[str, None] = {}
    for t in tensors(model.graph):
        if uses_external_data(t):
            seen[ExternalDataInfo(t).location] = None
    return list(seen)


def prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of the ops that show a model is already quantized (QDQ pairs, QLinear*, *Integer,
    DynamicQuantizeLSTM, MatMulNBits ...), main graph and subgraphs; empty for a float model."""
    return {op: n for op, n in op_histogram(model).items() if op in QUANTIZED_OPS}


def describe_ops(counts: dict[str, int], limit: int = 4) -> str:
    """``{"MatMulInteger": 12, "DynamicQuantizeLinear": 6}`` -> ``"12 MatMulInteger, 6 DynamicQuantizeLinear"``
    (largest first, at most ``limit`` kinds, then "...")."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{n} {op}" for op, n in items[:limit])
    return text + (" ..." if len(items) > limit else "")


def already_quantized(model: onnx.ModelProto) -> str | None:
    """The summary a quantization step gives a model that is already quantized, or None for a float model."""
    found = quantized_ops(model)
    if not found:
        return None
    return f"nothing to change: the model is already quantized ({describe_ops(found)})"


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset the model imports (1 when it names none)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model converted to ai.onnx opset ``version`` with onnx's version converter, shapes re-inferred.

    Raises StepError with the converter's reason when it cannot convert (unsupported op, custom domain).
    Weights stay inside the returned proto; callers save it with ``save``.
    """
    import onnx

    try:
        new = onnx.version_converter.convert_version(model, version)
        if new.ByteSize() < EXTERNAL_DATA_BYTES:  # the checker cannot take a message over 2 GB
            onnx.checker.check_model(new)
    except Exception as e:  # the converter raises RuntimeError/ValidationError/IndexError on what it cannot map
        raise StepError(f"cannot convert the graph from opset {opset_version(model)} to {version}: {first_line(e)}",
                        hint="re-export the model with a newer opset") from e
    try:
        new = onnx.shape_inference.infer_shapes(new)
    except Exception as e:  # shapes are a help for the quantizer, not a requirement
        log.info("shape inference after the opset upgrade failed: %s", e)
    return new


def integer_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Graph inputs that are not real-valued (token ids, lengths, masks): name -> element type name."""
    import onnx

    return {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()
            for i in graph_inputs(model)
            if i.type.HasField("tensor_type") and i.type.tensor_type.elem_type not in FLOAT_TYPES}


def count_ops(model: onnx.ModelProto, op_types) -> int:
    """How many nodes (subgraphs included) have one of ``op_types``."""
    wanted = set(op_types)
    return sum(1 for n in all_nodes(model.graph) if n.op_type in wanted)


def unshare_biases(model: onnx.ModelProto) -> int:
    """Give every Conv/ConvTranspose/Gemm its own copy of a bias initializer that several nodes share.

    A quantized bias depends on its node's input and weight scales, so ORT's QDQ quantizer copies a shared one
    itself, naming the copy ``<bias><n>``, which can collide with an existing tensor name (tf2onnx names) and
    leave a graph ONNX Runtime rejects. Copies made here have names checked against every tensor in the graph.
    Returns how many copies were made.
    """
    inits = {t.name: t for t in model.graph.initializer}
    names = set(inits) | {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    uses = Counter(i for n in model.graph.node for i in n.input)
    seen: set[str] = set()
    copies = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 3:
            continue
        bias = n.input[2]
        if bias not in inits or uses[bias] < 2:
            continue
        if bias not in seen:  # the first user keeps the original
            seen.add(bias)
            continue
        k = 1
        while f"{bias}_copy{k}" in names:
            k += 1
        t = model.graph.initializer.add()
        t.CopyFrom(inits[bias])
        t.name = f"{bias}_copy{k}"
        names.add(t.name)
        n.input[2] = t.name
        copies += 1
    return copies


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph (inputs, initializers, node outputs) that onnx's shape
    inference can tell; the model is not changed."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # inference fails on some graphs: use what the model already says
        log.info("shape inference for tensor types failed: %s", e)
        inferred = model
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def fully_shaped(model: onnx.ModelProto) -> bool:
    """Whether onnx's own shape inference gives every node output of the main graph a shape whose every dim is
    a number or a named symbol, and there are no subgraphs: then onnxruntime's symbolic shape inference (sympy,
    ~1 s to import) adds nothing."""
    import onnx

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return False
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return False
    known = {vi.name for vi in (*g.value_info, *g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") or d.HasField("dim_param") for d in vi.type.tensor_type.shape.dim)}
    return all(o in known for n in g.node for o in n.output if o)


def matmul_weight_share(model: onnx.ModelProto) -> float:
    """Share of the compute weights (elements of the constant weights of Conv/ConvTranspose/MatMul/Gemm and of
    LSTM/GRU/RNN) that sit in MatMul/Gemm with a constant 2-D float weight: what int4 weight-only (MatMulNBits, NNCF int4)
    compresses. 0.0 for a model without such weights; reads shapes only (works with external data)."""
    shapes: dict[str, tuple[list[int], int]] = {t.name: (list(t.dims), t.data_type) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            shapes[n.output[0]] = (list(n.attribute[0].t.dims), n.attribute[0].t.data_type)
    total = matmul = 0
    for n in model.graph.node:
        if n.op_type in ("LSTM", "GRU", "RNN"):  # recurrent weights W, R: heavy, and not MatMulNBits material
            total += sum(prod(shapes[i][0]) for i in n.input[1:3] if i in shapes)
            continue
        if n.op_type not in FLOAT_COMPUTE or len(n.input) < 2 or n.input[1] not in shapes:
            continue
        dims, dtype = shapes[n.input[1]]
        size = prod(dims)
        total += size
        if n.op_type in ("MatMul", "Gemm") and len(dims) == 2 and dtype in (1, 10):  # FLOAT, FLOAT16
            matmul += size
    return matmul / total if total else 0.0


_FLOAT_BYTES = {1: 4, 10: 2, 11: 8, 16: 2}  # float, float16, double, bfloat16


def activation_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float tensors of one sample, from the shapes that shape inference left in the graph (a
    symbolic dim counts as 1, so this is a lower bound); 0 when the graph carries no shapes."""
    total = 0
    for vi in (*model.graph.value_info, *model.graph.output):
        t = vi.type.tensor_type
        size = _FLOAT_BYTES.get(t.elem_type)
        if size and t.HasField("shape"):
            total += prod(d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim) * size
    return total


# ops that move or retype values without computing: walked through when asking what produced an output
_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Concat", "Cast",
                         "Slice", "Gather", "Split", "Expand", "Tile"})
_POOL_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool",
                       "LpNormalization", "ReduceL2", "AveragePool"})
_LINEAR_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "BatchNormalization"})


def output_roles(model: onnx.ModelProto) -> dict[str, str]:
    """What computed each output, walking back through layout ops and constant scale/shift:

    ``softmax`` (class probabilities), ``sigmoid``, ``scaled-sigmoid`` (a bounded score such as a MOS),
    ``pooled`` (a mean/sum/norm over positions: an embedding), ``linear`` (a MatMul/Gemm/Conv head:
    logits or unnormalized scores), else the op type.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    const = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    roles = {}
    for out in g.output:
        name, scaled, role = out.name, False, "input"
        for _ in range(64):
            n = producer.get(name)
            if n is None:
                break
            live = [i for i in n.input if i and i not in const]
            if n.op_type in _LAYOUT_OPS and live:
                name = live[0]
                continue
            if n.op_type in ("Add", "Sub", "Mul") and len(live) == 1:
                name, scaled = live[0], True
                continue
            if n.op_type == "Div" and len(live) == 2:  # x / norm(x) or x / count: a normalized pooling
                role = "pooled"
                break
            if n.op_type == "Add" and len(live) == 2 and any(
                    producer.get(i) is not None and producer[i].op_type in _LINEAR_OPS for i in live):
                role = "linear"  # MatMul + bias as two live tensors
                break
            role = _role(n.op_type, scaled)
            break
        roles[out.name] = role
    return roles


def _role(op: str, scaled: bool) -> str:
    if op in _POOL_OPS:
        return "pooled"
    if op in _LINEAR_OPS:
        return "linear"
    if op in ("Softmax", "LogSoftmax"):
        return "softmax"
    if op == "Sigmoid":
        return "scaled-sigmoid" if scaled else "sigmoid"
    return op
