"""ONNX Runtime steps on tiny hand-built graphs: real quantization, real sessions, numbers checked."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgepack.steps.fp16
import edgepack.steps.graph
import edgepack.steps.int4
import edgepack.steps.quantize  # noqa: F401
from edgepack.errors import DataError, StepError
from edgepack.model import onnx as onnxutil
from edgepack.steps import STEPS, Context, make_config
from edgepack.steps.guard import guard_dynamic, guard_quantize
from edgepack.target import QuantScheme, load_target
from edgepack.types import Artifact, ModelFormat

RNG = np.random.default_rng(0)


@dataclass(frozen=True)
class Dataset:  # same interface as edgepack.data.Dataset
    inputs: dict
    labels: np.ndarray | None = None
    source: str = "test"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, n: int):
        for i in range(0, len(self), n):
            yield {k: v[i:i + n] for k, v in self.inputs.items()}


# ---------------------------------------------------------------- models

def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _save(model: onnx.ModelProto, path: Path) -> Artifact:
    model.metadata_props.add(key="author", value="edgepack-test")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Artifact(path=path, format=ModelFormat.ONNX, files=(path,), metadata={"author": "edgepack-test"})


def conv_net(path: Path) -> Artifact:
    """x[N,3,16,16] -> Conv 8 -> Relu -> Conv 8 -> Relu -> GlobalAveragePool -> Flatten -> Gemm 10."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("w1", RNG.normal(0, 0.3, (8, 3, 3, 3))), _init("b1", RNG.normal(0, 0.1, 8)),
             _init("w2", RNG.normal(0, 0.2, (8, 8, 3, 3))), _init("b2", RNG.normal(0, 0.1, 8)),
             _init("wf", RNG.normal(0, 0.5, (10, 8))), _init("bf", RNG.normal(0, 0.1, 10))]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def conv_only_net(path: Path) -> Artifact:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["y"], name="relu1")]
    g = helper.make_graph(nodes, "convonly", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [_init("w1", RNG.normal(0, 0.3, (4, 3, 3, 3)))])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def matmul_net(path: Path, outlier: float = 0.0) -> Artifact:
    """x[N,64] -> MatMul 64x64 (+b) -> Relu -> MatMul 64x32 (weight in a Constant node) -> y.

    With ``outlier`` > 0, input feature 0 is expected to be huge and W1's row 0 small: the input's int8 range is
    then all outlier and the first MatMul breaks under int8, while the second one is harmless.
    """
    w1 = RNG.normal(0, 1 / 8, (64, 64))
    if outlier:
        w1[0] /= outlier
    w2 = RNG.normal(0, 1 / 8, (64, 32))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Constant", [], ["w2"], name="w2const", value=numpy_helper.from_array(w2.astype(np.float32))),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                          [_init("w1", w1), _init("b1", RNG.normal(0, 0.1, 64))])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ctx_for(tmp_path: Path, calib=None, **quant) -> Context:
    target = load_target("cpu-x86")
    if quant:
        target = target.model_copy(update={"quantization": QuantScheme(**{**target.quantization.model_dump(), **quant})})
    return Context(workdir=tmp_path / "work", target=target, runtime=target.runtimes[0], calib=calib)


def step(kind: str, art: Artifact, ctx: Context, **params):
    s = STEPS[kind]  # registered by importing the step modules above
    return s.fn(art, s.config.model_validate(params), ctx)


IMG = RNG.normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
VEC = RNG.normal(0, 1, (40, 64)).astype(np.float32)


def zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    w = onnxutil.weight_tensors(model)
    return [w[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


# ---------------------------------------------------------------- quantize-static

def test_static_int8_symmetric_conv(tmp_path):
    art = conv_net(tmp_path / "conv.onnx")
    digest = sha(art.path)
    ctx = ctx_for(tmp_path, Dataset({"x": IMG[:32]}), activation_type="int8", symmetric_activations=True)
    out, rec = step("quantize-static", art, ctx)
    assert rec.changed and rec.details["quantized"] == 3, rec.summary
    # int8 activations (S8S8) on x86: ORT's integer GEMM saturates int16 pair sums on CPUs without VNNI, so
    # the weights get 7 bits (reduce_range); with 8-bit weights the fused QGemm gave cosine 0.965 on AVX2
    assert rec.summary == ("quantized 3 of 3 Conv/MatMul/Gemm nodes; int8 activations on x86: weights quantized "
                           "to 7 bits (reduce_range), since ONNX Runtime's int8 x int8 kernels saturate on CPUs "
                           "without VNNI")
    assert rec.details["stayed_float"] == [] and rec.details["calibration_samples"] == 32
    m = onnx.load(str(out.path))
    zps = zero_points(m)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # int8 symmetric: zero point 0
    w = onnxutil.weight_tensors(m)
    assert all(np.abs(w[f"{n}_quantized"].astype(int)).max() <= 64 for n in ("w1", "w2", "wf"))
    assert cosine(run(art.path, IMG), run(out.path, IMG)) > 0.999
    assert onnxutil.metadata_of(m)["author"] == "edgepack-test" and out.metadata["author"] == "edgepack-test"
    assert out.path.parent.parent == ctx.workdir and sha(art.path) == digest


def test_static_16bit_activations(tmp_path):
    art = conv_net(tmp_path / "conv.onnx")
    ctx = ctx_for(tmp_path, Dataset({"x": IMG[:16]}), activation_type="uint16", weight_type="int8")
    out, rec = step("quantize-static", art, ctx)
    zps = zero_points(onnx.load(str(out.path)))
    assert {z.dtype for z in zps} >= {np.dtype(np.uint16)}
    assert rec.details["quantized"] == 3
    assert cosine(run(art.path, IMG), run(out.path, IMG)) > 0.999


def test_static_exclude_and_errors(tmp_path):
    art = conv_net(tmp_path / "conv.onnx")
    ctx = ctx_for(tmp_path, Dataset({"x": IMG[:8]}))
    out, rec = step("quantize-static", art, ctx, exclude_nodes=["conv2"])
    assert rec.details["stayed_float"] == ["conv2"] and rec.details["quantized"] == 2
    assert "float: conv2" in rec.summary
    mm = matmul_net(tmp_path / "mm.onnx")  # the name before pre-processing finds the fused node
    _, rec_mm = step("quantize-static", mm, ctx_for(tmp_path, Dataset({"x": VEC[:8]})), exclude_nodes=["mm1"])
    assert rec_mm.details["excluded"] == ["mm1/MatMulAddFusion"] and rec_mm.details["quantized"] == 1
    with pytest.raises(StepError, match="no node called nope"):
        step("quantize-static", art, ctx, exclude_nodes=["nope"])
    with pytest.raises(StepError, match="needs calibration data.*--calib"):
        step("quantize-static", art, ctx_for(tmp_path))
    with pytest.raises(DataError, match="has no input x"):
        step("quantize-static", art, ctx_for(tmp_path, Dataset({"image": IMG[:4]})))


# ---------------------------------------------------------------- quantize-dynamic

def test_dynamic_matmul_and_nothing_on_conv(tmp_path):
    art = matmul_net(tmp_path / "mm.onnx")
    out, rec = step("quantize-dynamic", art, ctx_for(tmp_path))
    hist = onnxutil.op_histogram(onnx.load(str(out.path)))
    # both MatMuls, including mm2 whose weight sits in a Constant node
    assert hist["MatMulInteger"] == 2 and hist["DynamicQuantizeLinear"] == 2 and "MatMul" not in hist, hist
    assert rec.changed and rec.details["quantized"] == 2 and rec.summary == "quantized 2 of 2 Conv/MatMul/Gemm nodes"
    assert cosine(run(art.path, VEC), run(out.path, VEC)) > 0.99
    assert onnxutil.metadata_of(onnx.load(str(out.path)))["author"] == "edgepack-test"

    conv = conv_only_net(tmp_path / "convonly.onnx")
    same, rec2 = step("quantize-dynamic", conv, ctx_for(tmp_path))
    assert not rec2.changed and same is conv
    assert rec2.summary == "nothing to change: no MatMul/Gemm/Attention/LSTM to quantize"


# ---------------------------------------------------------------- fp16

def test_fp16(tmp_path):
    art = matmul_net(tmp_path / "mm.onnx")
    out, rec = step("fp16", art, ctx_for(tmp_path))
    m = onnx.load(str(out.path))
    big = [a for a in onnxutil.weight_tensors(m).values() if a.size > 1]
    assert big and all(a.dtype == np.float16 for a in big)
    assert rec.details["fp16_weights"] == 3 and rec.details["fp32_weights"] == 0
    io = [i.type.tensor_type.elem_type for i in (*m.graph.input, *m.graph.output)]
    assert io == [TensorProto.FLOAT, TensorProto.FLOAT]
    y = run(out.path, VEC)
    assert y.dtype == np.float32 and cosine(run(art.path, VEC), y) > 0.999
    assert onnxutil.metadata_of(m)["author"] == "edgepack-test"
    again, rec2 = step("fp16", out, ctx_for(tmp_path))
    assert not rec2.changed and rec2.summary.startswith("nothing to change")


# ---------------------------------------------------------------- int4

def test_int4(tmp_path):
    art = matmul_net(tmp_path / "mm.onnx")
    out, rec = step("int4", art, ctx_for(tmp_path))
    m = onnx.load(str(out.path))
    assert onnxutil.op_histogram(m).get("MatMulNBits") == 2 and rec.details["matmul_nbits"] == 2
    assert "MatMul" not in onnxutil.op_histogram(m)
    assert cosine(run(art.path, VEC), run(out.path, VEC)) > 0.98
    assert onnxutil.metadata_of(m)["author"] == "edgepack-test"

    conv = conv_only_net(tmp_path / "convonly.onnx")
    same, rec2 = step("int4", conv, ctx_for(tmp_path))
    assert not rec2.changed and same is conv
    assert rec2.summary == "nothing to change: no MatMul with a constant 2-D weight"
    with pytest.raises(StepError, match="block_size must be a power of two"):
        make_config("int4", {"block_size": 48})


# ---------------------------------------------------------------- graph steps

def test_optimize_graph_folds_constants(tmp_path):
    w = RNG.normal(0, 1, (64, 64)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["w"], ["wi"], name="id"),
             helper.make_node("Mul", ["wi", "two"], ["w2"], name="scale"),  # constant subgraph
             helper.make_node("MatMul", ["x", "w2"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
                          [_init("w", w), _init("two", np.array(2.0))])
    art = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fold.onnx")
    ctx = Context(workdir=tmp_path / "work", target=load_target("cpu-x86"))  # no runtime: extended -> basic
    out, rec = step("optimize-graph", art, ctx, level="extended")
    assert rec.details["nodes_before"] == 3 and rec.details["nodes_after"] == 1 and rec.changed
    assert rec.summary.startswith("3 -> 1 nodes (basic level") and "used 'basic'" in rec.summary
    assert np.allclose(run(art.path, VEC), run(out.path, VEC), atol=1e-4)
    assert onnxutil.metadata_of(onnx.load(str(out.path)))["author"] == "edgepack-test"
    again, rec2 = step("optimize-graph", out, ctx)
    assert not rec2.changed and rec2.summary.startswith("nothing to change")


def test_optimize_graph_extended_on_cpu(tmp_path):
    art = conv_net(tmp_path / "conv.onnx")
    out, rec = step("optimize-graph", art, ctx_for(tmp_path), level="extended")  # runtime: CPU provider
    assert rec.details["level"] == "extended" and rec.details["contrib_ops"] == ["FusedConv"]
    assert rec.details["nodes_before"] == 7 and rec.details["nodes_after"] == 5
    assert np.allclose(run(art.path, IMG), run(out.path, IMG), atol=1e-5)


def _symbolic_net(path: Path) -> Artifact:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "sym",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _dims(vi) -> list[int]:
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_fix_shapes(tmp_path):
    art = _symbolic_net(tmp_path / "sym.onnx")
    with pytest.raises(StepError, match=r"no size for x\[2\]=H, x\[3\]=W.*shapes.static"):
        step("fix-shapes", art, ctx_for(tmp_path))
    out, rec = step("fix-shapes", art, ctx_for(tmp_path, Dataset({"x": IMG[:2]})))  # H, W from calibration data
    m = onnx.load(str(out.path))
    assert _dims(m.graph.input[0]) == [1, 3, 16, 16] and _dims(m.graph.output[0]) == [1, 3, 16, 16]
    assert rec.changed and rec.details["inputs"] == {"x": [1, 3, 16, 16]}

    base = load_target("cpu-x86")
    t = base.model_copy(update={"shapes": base.shapes.model_copy(update={"batch": 4, "static": {"x": (4, 3, 8, 8)}})})
    out2, rec2 = step("fix-shapes", art, Context(workdir=tmp_path / "w2", target=t))
    assert _dims(onnx.load(str(out2.path)).graph.input[0]) == [4, 3, 8, 8]
    assert run(out2.path, IMG[:4, :, :8, :8]).shape == (4, 3, 8, 8)
    _, rec3 = step("fix-shapes", out2, Context(workdir=tmp_path / "w3", target=t))
    assert not rec3.changed and rec3.summary == "nothing to change: every input shape was already static"
    bad = base.model_copy(update={"shapes": base.shapes.model_copy(update={"static": {"x": (1, 4, 8, 8)}})})
    with pytest.raises(StepError, match="shapes.static gives x shape"):
        step("fix-shapes", art, Context(workdir=tmp_path / "w4", target=bad))


# ---------------------------------------------------------------- guard

def test_guard_excludes_fragile_layer(tmp_path):
    art = matmul_net(tmp_path / "fragile.onnx", outlier=1000.0)
    x = RNG.normal(0, 1, (48, 64)).astype(np.float32)
    x[:, 0] *= 1000.0  # outlier feature: the int8 range of mm1's input is all outlier
    ref = run(art.path, x[32:])

    def evaluate(path: Path) -> float:
        return cosine(ref, run(path, x[32:]))

    ctx = ctx_for(tmp_path, Dataset({"x": x[:32]}))
    out, rec = guard_quantize(art, ctx, evaluate, reference_score=1.0, max_drop=0.01)
    d = rec.details
    assert d["scores"][0] < 0.99, d["scores"]  # plain int8 breaks
    # quant_pre_process fuses mm1 + add1 into a Gemm named "mm1/MatMulAddFusion"
    assert d["excluded"] == ["mm1/MatMulAddFusion"] and d["within_budget"] and d["scores"][-1] > 0.99
    # ranked first by the SQNR it loses (one debug pass), found in two trials: k = 0, then k = 1
    noise = d["noise_db"]
    assert max(noise, key=noise.get) == "mm1/MatMulAddFusion" and list(d["trials"]) == ["0", "1"], d
    assert rec.changed and d["stayed_float"] == ["mm1/MatMulAddFusion"] and "kept 1 node(s) float" in rec.summary
    assert evaluate(out.path) > 0.99
    assert onnxutil.metadata_of(onnx.load(str(out.path)))["author"] == "edgepack-test"

    _, rec2 = guard_quantize(art, ctx_for(tmp_path / "b", Dataset({"x": x[:32]})), evaluate, 1.0, 1e-9,
                             max_excluded=0)
    assert "budget NOT met" in rec2.summary and rec2.details["excluded"] == []


def pooled_net(path: Path) -> Artifact:
    """x[N,3,16,16] -> Conv 8 -> LeakyRelu -> MaxPool -> Conv 8 -> Relu -> GlobalAveragePool -> Flatten."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["r1"], name="lrelu1", alpha=0.1),
        helper.make_node("MaxPool", ["r1"], ["m1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    w1 = RNG.normal(0, 0.3, (8, 3, 3, 3))
    w1[:, 0] /= 500.0  # input channel 0 comes 500x larger and counts as much as the others
    inits = [_init("w1", w1), _init("b1", RNG.normal(0, 0.1, 8)),
             _init("w2", RNG.normal(0, 0.2, (8, 8, 3, 3))), _init("b2", RNG.normal(0, 0.1, 8))]
    g = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_the_ops_after_a_float_conv_stay_float_and_propagation_off_is_offered(tmp_path):
    """A first Conv whose input has an outlier channel is kept float; the LeakyRelu and MaxPool after it stay
    float too (ORT would run that MaxPool on uint8 in NCHW, its slow kernel), so int8 starts at conv2. ORT's QDQ
    propagation would still move conv2's QuantizeLinear up across the MaxPool: the backend offers the same model
    with it off, and only where that changes the graph ORT runs."""
    from edgepack.runtimes import get_backend
    from edgepack.steps.guard import followers
    from edgepack.types import Precision

    art = pooled_net(tmp_path / "pooled.onnx")
    x = RNG.normal(0, 1, (48, 3, 16, 16)).astype(np.float32)
    x[:, 0] *= 500.0  # the int8 range of conv1's input is all channel 0
    ref = run(art.path, x[32:])
    ctx = ctx_for(tmp_path, Dataset({"x": x[:32]}))
    out, rec = guard_quantize(art, ctx, lambda p: cosine(ref, run(p, x[32:])), reference_score=1.0, max_drop=0.001)
    d = rec.details
    assert d["excluded"] == ["conv1"] and d["within_budget"], d
    assert followers(onnx.load(str(art.path)), ["conv1"]) == ["lrelu1", "pool1"]
    assert any(n.startswith("2 op(s) after the float nodes stay float too") for n in d["notes"]), d["notes"]
    q = onnx.load(str(out.path))
    made = {o: n for n in q.graph.node for o in n.output}
    assert made[next(n for n in q.graph.node if n.name == "pool1").input[0]].name == "lrelu1"  # float in, float out
    assert made[next(n for n in q.graph.node if n.name == "conv2").input[0]].op_type == "DequantizeLinear"
    assert cosine(ref, run(out.path, x[32:])) > 0.999

    spec = ctx.target.runtimes[0]
    (suffix, off, note), = get_backend("onnxruntime").mixed_variants(out, spec, Precision.INT8)
    assert suffix == "noprop" and off.disabled_optimizers == ("QDQPropagationTransformer",) and "settings" in note
    assert get_backend("onnxruntime").settings(off, 1)["disabled_optimizers"] == ["QDQPropagationTransformer"]
    assert get_backend("onnxruntime").mixed_variants(out, off, Precision.INT8) == []  # already off
    plain = conv_net(tmp_path / "plain.onnx")  # nothing float in between: propagation changes nothing
    q2, _ = step("quantize-static", plain, ctx_for(tmp_path / "p", Dataset({"x": IMG})))
    assert get_backend("onnxruntime").mixed_variants(q2, spec, Precision.INT8) == []
    assert not list(out.path.parent.glob("optimized-*.onnx"))  # the graphs compared leave nothing behind


def test_dynamic_guard_keeps_the_fragile_matmul_float(tmp_path):
    """Dynamic int8 quantizes each activation at run time over the whole tensor: an outlier feature crushes mm1's
    input. The guard ranks by the noise each MatMul adds (tensors matched by name) and keeps mm1 float."""
    art = matmul_net(tmp_path / "fragile.onnx", outlier=1000.0)
    x = RNG.normal(0, 1, (48, 64)).astype(np.float32)
    x[:, 0] *= 1000.0
    ref = run(art.path, x[32:])

    def evaluate(path: Path) -> float:
        return cosine(ref, run(path, x[32:]))

    out, rec = guard_dynamic(art, ctx_for(tmp_path, Dataset({"x": x[:32]})), evaluate, 1.0, 0.01, ["MatMul"])
    d = rec.details
    assert d["scores"][0] < 0.99 and d["excluded"] == ["mm1"] and d["within_budget"], d
    assert max(d["noise_db"], key=d["noise_db"].get) == "mm1" and list(d["trials"]) == ["0", "1"], d
    ops = [n.op_type for n in onnx.load(str(out.path)).graph.node]
    assert "MatMulInteger" in ops and "MatMul" in ops  # mm2 int8, mm1 float
    assert evaluate(out.path) > 0.99 and "kept 1 node(s) float" in rec.summary


# ---------------------------------------------------------------- helpers

def test_onnxutil_external_data_and_counts(tmp_path):
    art = matmul_net(tmp_path / "mm.onnx")
    m = onnx.load(str(art.path))
    assert set(onnxutil.weight_tensors(m)) == {"w1", "b1", "w2"}  # w2 lives in a Constant node
    assert onnxutil.compute_split(m) == {"int_ops": 0, "float_ops": 2, "float_nodes": ["mm1", "mm2"]}
    files = onnxutil.save(m, tmp_path / "ext" / "model.onnx", external=True)
    assert [p.name for p in files] == ["model.onnx", "model.onnx.data"]
    assert onnxutil.files_of(files[0]) == files
    assert np.allclose(run(files[0], VEC), run(art.path, VEC))
    with pytest.raises(StepError, match="needs an ONNX model"):
        onnxutil.require_onnx(Artifact(path=tmp_path, format=ModelFormat.TORCH), "int4")
