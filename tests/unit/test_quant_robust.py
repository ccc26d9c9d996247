"""Quantizers on the graphs real models bring (issue 11): old opsets, integer inputs, Constant-node weights,
already-quantized models, models with nothing worth quantizing; every failure a clean StepError.

Tiny hand-built graphs, real quantizers and sessions, numbers checked against the float model.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgepack.steps.fp16
import edgepack.steps.graph
import edgepack.steps.int4  # noqa: F401  (registers the steps under test)
import edgepack.steps.quantize as quantize_mod
from edgepack.data import Dataset
from edgepack.errors import StepError
from edgepack.model import onnx as onnxutil
from edgepack.steps import STEPS, Context
from edgepack.steps.guard import guard_quantize
from edgepack.target import QuantScheme, load_target
from edgepack.types import Artifact, ModelFormat

RNG = np.random.default_rng(11)
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers

def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def save(path: Path, nodes, inputs, outputs, inits, opset: int = 17, extra_opsets=()) -> Artifact:
    g = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.metadata_props.add(key="author", value="edgepack-test")
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return Artifact(path=path, format=ModelFormat.ONNX, files=(path,), metadata={"author": "edgepack-test"})


def data(**arrays) -> Dataset:
    return Dataset(dict(arrays), None, "test.npz")


def ctx_for(tmp_path: Path, calib: Dataset | None = None, **quant) -> Context:
    target = load_target("cpu-x86")
    if quant:
        target = target.model_copy(update={"quantization": QuantScheme(**{**target.quantization.model_dump(), **quant})})
    return Context(workdir=tmp_path / "work", target=target, runtime=target.runtimes[0], calib=calib)


def step(kind: str, art: Artifact, ctx: Context, **params):
    s = STEPS[kind]
    return s.fn(art, s.config.model_validate(params), ctx)


def run(path: Path, feeds: dict) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(path: Path) -> dict[str, int]:
    return onnxutil.op_histogram(onnx.load(str(path)))


# ---------------------------------------------------------------- models

IMG = RNG.normal(0, 1, (40, 3, 16, 16)).astype(np.float32)


def conv_bn_net(path: Path, opset: int = 12) -> Artifact:
    """A Paddle-like opset-12 CNN: Conv -> BatchNormalization -> Relu -> Conv -> Relu -> GAP -> Flatten -> MatMul.

    quant_pre_process fuses Conv+BatchNormalization; per-channel QDQ then needs DequantizeLinear(axis), opset 13.
    """
    rng = np.random.default_rng(1)
    inits = [init("w1", f32(rng.normal(0, .3, (8, 3, 3, 3)))), init("g1", f32(rng.normal(1, .1, 8))),
             init("be1", f32(rng.normal(0, .1, 8))), init("m1", f32(rng.normal(0, .1, 8))),
             init("v1", f32(rng.uniform(.5, 1.5, 8))), init("w2", f32(rng.normal(0, .2, (8, 8, 3, 3)))),
             init("b2", f32(rng.normal(0, .1, 8))), init("wf", f32(rng.normal(0, .5, (8, 10))))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1"], name="bn1"),
             helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wf"], ["y"], name="fc")]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits, opset=opset)


V, D, S = 50, 32, 12


def int_input_net(path: Path, dtype=TensorProto.INT32) -> Artifact:
    """Token ids and lengths as integer inputs: Gather embedding -> MatMul -> masked mean (Cast of lengths) ->
    MatMul. The integer path (ids, lengths) must stay integer and the float path be quantized."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r", "ax1"], ["hs"], name="sum", keepdims=0),
             helper.make_node("Cast", ["len"], ["lenf"], name="cast_len", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["lenf", "ax1"], ["lenu"], name="unsq"),
             helper.make_node("Div", ["hs", "lenu"], ["hm"], name="mean"),
             helper.make_node("MatMul", ["hm", "w2"], ["y"], name="mm2")]
    inits = [init("emb", f32(rng.normal(0, 1, (V, D)))), init("w1", f32(rng.normal(0, .2, (D, 16)))),
             init("w2", f32(rng.normal(0, .25, (16, 4)))), init("ax1", np.array([1], np.int64))]
    return save(path, nodes, [helper.make_tensor_value_info("ids", dtype, ["N", S]),
                              helper.make_tensor_value_info("len", dtype, ["N"])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


IDS = RNG.integers(0, V, (40, S))
LENS = np.full(40, S)  # the mean divides the sum over all positions by the length


def constant_weights_net(path: Path) -> Artifact:
    """Every weight in a Constant node, as Paddle exports them: Conv(+bias) -> Relu -> GAP -> Flatten ->
    MatMul -> Add -> Relu -> Gemm(transB)."""
    rng = np.random.default_rng(3)
    consts = {"w1": f32(rng.normal(0, .3, (8, 3, 3, 3))), "b1": f32(rng.normal(0, .1, 8)),
              "wm": f32(rng.normal(0, .4, (8, 64))), "bm": f32(rng.normal(0, .1, 64)),
              "wg": f32(rng.normal(0, .15, (10, 64))), "bg": f32(rng.normal(0, .1, 10))}
    nodes = [helper.make_node("Constant", [], [k], name=f"{k}_const", value=numpy_helper.from_array(v))
             for k, v in consts.items()]
    nodes += [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
              helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("MatMul", ["f", "wm"], ["m"], name="mm"),
              helper.make_node("Add", ["m", "bm"], ["a"], name="add"),
              helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
              helper.make_node("Gemm", ["r2", "wg", "bg"], ["y"], name="head", transB=1)]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [])


H, T, C = 8, 6, 4
SEQ = RNG.normal(0, 1, (24, C, T)).astype(np.float32)


def conv_lstm_net(path: Path) -> Artifact:
    """x[N,4,6] -> Conv1d -> Relu -> LSTM(8) -> last hidden state -> MatMul 5."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["rt"], name="to_time_major", perm=[2, 0, 1]),
             helper.make_node("LSTM", ["rt", "W", "R", "B"], ["seq", "h"], name="lstm", hidden_size=H),
             helper.make_node("Squeeze", ["h", "ax0"], ["hs"], name="squeeze"),
             helper.make_node("MatMul", ["hs", "wf"], ["y"], name="fc")]
    inits = [init("wc", f32(rng.normal(0, .3, (8, C, 3)))), init("bc", f32(rng.normal(0, .1, 8))),
             init("W", f32(rng.normal(0, .3, (1, 4 * H, 8)))), init("R", f32(rng.normal(0, .3, (1, 4 * H, H)))),
             init("B", f32(rng.normal(0, .1, (1, 8 * H)))), init("wf", f32(rng.normal(0, .3, (H, 5)))),
             init("ax0", np.array([0], np.int64))]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, T])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)


def prequantized_net(tmp_path: Path) -> Artifact:
    """conv_lstm_net quantized by ONNX Runtime itself: ConvInteger, DynamicQuantizeLSTM, MatMulInteger."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = conv_lstm_net(tmp_path / "float.onnx")
    out = tmp_path / "prequantized.onnx"
    quantize_dynamic(str(src.path), str(out), op_types_to_quantize=["Conv", "MatMul", "LSTM"],
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return Artifact(path=out, format=ModelFormat.ONNX, files=(out,), metadata={})


# ---------------------------------------------------------------- 1. old opsets

def test_opset12_conv_bn_per_channel_upgrades_to_opset13(tmp_path):
    art = conv_bn_net(tmp_path / "cbn12.onnx")
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=IMG[:16])))
    assert rec.changed and rec.details["quantized"] == 3
    assert rec.summary == ("quantized 3 of 3 Conv/MatMul/Gemm nodes; "
                           "upgraded the graph from opset 12 to 13 for per-channel QDQ")
    m = onnx.load(str(out.path))
    assert onnxutil.opset_version(m) == 13
    # per-channel weights (DequantizeLinear with axis), and the BatchNormalization was folded into conv1
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(per_channel) >= 3 and "BatchNormalization" not in ops(out.path)
    assert cosine(run(art.path, {"x": IMG}), run(out.path, {"x": IMG})) > 0.999
    assert onnxutil.metadata_of(m)["author"] == "edgepack-test"
    assert not any(p.name.startswith("opset13") for p in out.path.parent.iterdir())  # the upgraded copy is gone


def test_opset_upgrade_failure_falls_back_to_per_tensor(tmp_path, monkeypatch):
    def refuse(model, version):
        raise RuntimeError("No Adapter For Current Version $12 for BatchNormalization")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    art = conv_bn_net(tmp_path / "cbn12.onnx")
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=IMG[:16])))
    note = ("per-tensor weights: cannot convert the graph from opset 12 to 13: No Adapter For Current Version "
            "$12 for BatchNormalization (per-channel QDQ needs opset 13)")
    assert rec.changed and rec.summary == f"quantized 3 of 3 Conv/MatMul/Gemm nodes; {note}"
    assert note in rec.details["notes"]
    m = onnx.load(str(out.path))
    assert onnxutil.opset_version(m) == 12
    assert not any(a.name == "axis" for n in m.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    assert cosine(run(art.path, {"x": IMG}), run(out.path, {"x": IMG})) > 0.995


def test_upgrade_opset_helper(tmp_path):
    art = conv_bn_net(tmp_path / "cbn9.onnx", opset=9)
    m = onnx.load(str(art.path))
    up = onnxutil.upgrade_opset(m, 13)
    assert onnxutil.opset_version(m) == 9 and onnxutil.opset_version(up) == 13  # the input is left as it was
    assert np.allclose(run(art.path, {"x": IMG[:4]}),
                       ort.InferenceSession(up.SerializeToString()).run(None, {"x": IMG[:4]})[0], atol=1e-5)


# ---------------------------------------------------------------- 2. integer inputs

@pytest.mark.parametrize("dtype", [TensorProto.INT32, TensorProto.INT64])
def test_integer_inputs_static_dynamic_int4(tmp_path, dtype):
    npdt = np.int32 if dtype == TensorProto.INT32 else np.int64
    art = int_input_net(tmp_path / "ids.onnx", dtype)
    assert onnxutil.integer_inputs(onnx.load(str(art.path))) == {"ids": npdt.__name__, "len": npdt.__name__}
    feeds = {"ids": IDS.astype(npdt), "len": LENS.astype(npdt)}
    ref = run(art.path, feeds)
    # calibration data saved as int64 (numpy's default) while the model wants int32: cast, never refused
    calib = data(ids=IDS[:16].astype(np.int64), len=LENS[:16].astype(np.int64))
    reader = quantize_mod.CalibReader(calib, onnx.load(str(art.path)), 8)
    first = reader.get_next()
    assert len(reader) == 8 and first["ids"].dtype == npdt and first["len"].dtype == npdt and first["ids"].shape == (1, S)

    out, rec = step("quantize-static", art, ctx_for(tmp_path / "s", calib))
    assert rec.changed and rec.details["quantized"] == 2 and rec.summary == "quantized 2 of 2 Conv/MatMul/Gemm nodes"
    m = onnx.load(str(out.path))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [dtype, dtype]
    assert ops(out.path)["Gather"] == 1 and ops(out.path)["Cast"] >= 1
    assert cosine(ref, run(out.path, feeds)) > 0.99

    out, rec = step("quantize-dynamic", art, ctx_for(tmp_path / "d"))
    assert rec.changed and ops(out.path)["MatMulInteger"] == 2 and cosine(ref, run(out.path, feeds)) > 0.99

    out, rec = step("int4", art, ctx_for(tmp_path / "i"))
    assert rec.changed and ops(out.path)["MatMulNBits"] == 2 and cosine(ref, run(out.path, feeds)) > 0.98


def test_calibration_data_not_fitting_integer_inputs_gets_the_right_hint(tmp_path):
    art = int_input_net(tmp_path / "ids.onnx")
    short = data(ids=IDS[:8, :10].astype(np.int32), len=LENS[:8].astype(np.int32))  # 10 tokens, model takes 12
    with pytest.raises(StepError) as err:
        step("quantize-static", art, ctx_for(tmp_path, short))
    msg, hint = err.value.args[0], err.value.hint
    assert msg.startswith("ONNX Runtime static quantization failed: [ONNXRuntimeError]")
    assert "Got invalid dimensions for input: ids for the following indices: index: 1 Got: 10 Expected: 12" in msg
    assert "\n" not in msg
    assert hint == "the calibration data must match the model inputs (ids int32['N', 12], len int32['N'])"
    assert "16-bit" not in str(err.value)


def test_quantizer_value_error_on_integer_model_gets_the_right_hint(tmp_path, monkeypatch):
    """ORT's "truth value of an array ... is ambiguous" once came with a hint about 16-bit types."""
    import onnxruntime.quantization as ortq

    def broken(*args, **kwargs):
        raise ValueError("The truth value of an array with more than one element is ambiguous. "
                         "Use a.any() or a.all()\nmore lines")

    monkeypatch.setattr(ortq, "quantize_static", broken)
    art = int_input_net(tmp_path / "ids.onnx")
    with pytest.raises(StepError) as err:
        step("quantize-static", art, ctx_for(tmp_path, data(ids=IDS[:8].astype(np.int32), len=LENS[:8].astype(np.int32))))
    assert err.value.args[0] == ("ONNX Runtime static quantization failed: The truth value of an array with more "
                                 "than one element is ambiguous. Use a.any() or a.all()")
    assert err.value.hint.startswith("the quantizer could not compute a range on the path of the integer input(s) "
                                     "ids (int32), len (int32)")
    assert "16-bit" not in err.value.hint


def test_16bit_hint_only_for_16bit_schemes(tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    def broken(*args, **kwargs):
        raise ValueError("Only QDQ format supports 16-bit integer types (uint16)")

    monkeypatch.setattr(ortq, "quantize_static", broken)
    art = conv_bn_net(tmp_path / "cbn.onnx", opset=13)
    with pytest.raises(StepError, match='16-bit types need format = "qdq"'):
        step("quantize-static", art, ctx_for(tmp_path, data(x=IMG[:4]), activation_type="uint16", format="qoperator"))


def test_rank0_and_state_inputs_in_calibration(tmp_path):
    """A rank-0 input (a threshold) gets one value for all batches; a state batched on axis 1 is cut there."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"], name="scale_x"),
             helper.make_node("MatMul", ["xs", "w"], ["m"], name="mm"),
             helper.make_node("ReduceSum", ["h", "ax0"], ["hsum"], name="sum_state", keepdims=0),
             helper.make_node("Add", ["m", "hsum"], ["y"], name="add_state")]
    art = save(tmp_path / "state.onnx", nodes,
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, "N", 8])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
               [init("w", f32(rng.normal(0, .3, (16, 8)))), init("ax0", np.array([0], np.int64))])
    x, h = f32(rng.normal(0, 1, (12, 16))), f32(rng.normal(0, 1, (2, 12, 8)))
    calib = Dataset({"x": x, "scale": np.array(0.5, np.float32), "h": h}, None, "test.npz",
                    {"x": 0, "scale": None, "h": 1})
    reader = quantize_mod.CalibReader(calib, onnx.load(str(art.path)), 12)
    feeds = [reader.get_next() for _ in range(len(reader))]
    assert len(feeds) == 12 and feeds[3]["scale"].shape == () and feeds[3]["h"].shape == (2, 1, 8)
    assert np.array_equal(feeds[3]["h"][:, 0], h[:, 3]) and np.array_equal(feeds[3]["x"], x[3:4])
    out, rec = step("quantize-static", art, ctx_for(tmp_path, calib))
    assert rec.changed and rec.details["quantized"] == 1
    ref = run(art.path, {"x": x, "scale": np.array(0.5, np.float32), "h": h})
    assert cosine(ref, run(out.path, {"x": x, "scale": np.array(0.5, np.float32), "h": h})) > 0.99


# ---------------------------------------------------------------- 3. weights in Constant nodes

def test_constant_node_weights_static_dynamic_int4(tmp_path):
    art = constant_weights_net(tmp_path / "paddle.onnx")
    assert ops(art.path)["Constant"] == 6
    ref = run(art.path, {"x": IMG})

    out, rec = step("quantize-static", art, ctx_for(tmp_path / "s", data(x=IMG[:16])))
    assert rec.changed and rec.details["quantized"] == 3 and rec.details["stayed_float"] == []
    m = onnx.load(str(out.path))
    w = onnxutil.weight_tensors(m)
    int8_weights = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in w and w[n.input[0]].dtype == np.int8 and w[n.input[0]].ndim >= 2}
    assert len(int8_weights) == 3  # conv, MatMul and Gemm weights quantized as int8 weights, not as activations
    assert "Constant" not in ops(out.path)
    assert cosine(ref, run(out.path, {"x": IMG})) > 0.99

    out, rec = step("quantize-dynamic", art, ctx_for(tmp_path / "d"))
    assert rec.changed and ops(out.path)["MatMulInteger"] == 2 and rec.details["quantized"] == 2
    assert rec.summary == "quantized 2 of 3 Conv/MatMul/Gemm nodes; float: conv1"
    assert cosine(ref, run(out.path, {"x": IMG})) > 0.99

    out, rec = step("int4", art, ctx_for(tmp_path / "i"))
    assert rec.changed and rec.details["matmul_nbits"] == 2 and rec.details["gemm_as_matmul"] == 1
    assert rec.summary == "2 of 2 MatMul nodes now 4-bit MatMulNBits (block 32); 1 Gemm node(s) rewritten as MatMul first"
    h = ops(out.path)
    assert h["MatMulNBits"] == 2 and "MatMul" not in h and "Gemm" not in h and h["Conv"] == 1
    assert cosine(ref, run(out.path, {"x": IMG})) > 0.98  # 4-bit weights, blocks of 32 over K = 8 and 64


def test_int4_skips_cnns_whose_only_matmul_is_the_head(tmp_path):
    art = conv_bn_net(tmp_path / "cnn.onnx", opset=13)
    same, rec = step("int4", art, ctx_for(tmp_path / "a"))
    assert same is art and not rec.changed
    assert rec.summary == ("nothing to change: MatMul/Gemm hold 9.2% of the weights (int4 weight-only pays off "
                           "from 50%; set min_weight_share to go below)")
    out, rec = step("int4", art, ctx_for(tmp_path / "b"), min_weight_share=0.0)
    assert rec.changed and ops(out.path)["MatMulNBits"] == 1


def test_int4_keeps_gemm_when_asked(tmp_path):
    art = constant_weights_net(tmp_path / "paddle.onnx")
    out, rec = step("int4", art, ctx_for(tmp_path), gemm_as_matmul=False)
    assert rec.details["matmul_nbits"] == 1 and ops(out.path)["Gemm"] == 1


# ---------------------------------------------------------------- 4. already-quantized models

def test_quantized_ops_helper(tmp_path):
    pre = prequantized_net(tmp_path)
    found = onnxutil.quantized_ops(onnx.load(str(pre.path)))
    assert found == {"ConvInteger": 1, "DynamicQuantizeLSTM": 1, "DynamicQuantizeLinear": 2, "MatMulInteger": 1}
    assert onnxutil.describe_ops(found) == "2 DynamicQuantizeLinear, 1 ConvInteger, 1 DynamicQuantizeLSTM, 1 MatMulInteger"
    assert onnxutil.quantized_ops(onnx.load(str(conv_lstm_net(tmp_path / "f.onnx").path))) == {}


def test_matmul_weight_share(tmp_path):
    """What int4 weight-only can compress: the plan offers int4 to MatMul-heavy models."""
    tiny = onnx.load(str(ROOT / "samples" / "tiny-transformer" / "model.onnx"))
    assert onnxutil.matmul_weight_share(tiny) == 1.0
    cnn = onnx.load(str(conv_bn_net(tmp_path / "cnn.onnx").path))
    assert onnxutil.matmul_weight_share(cnn) == pytest.approx(80 / (216 + 576 + 80))
    rnn = onnx.load(str(conv_lstm_net(tmp_path / "rnn.onnx").path))  # LSTM weights count, and are not MatMul
    assert onnxutil.matmul_weight_share(rnn) == pytest.approx(40 / (96 + 256 + 256 + 40))
    paddle = onnx.load(str(constant_weights_net(tmp_path / "paddle.onnx").path))  # weights in Constant nodes
    assert onnxutil.matmul_weight_share(paddle) == pytest.approx((512 + 640) / (216 + 512 + 640))


@pytest.mark.parametrize("kind", ["quantize-static", "quantize-dynamic", "int4", "fp16"])
def test_prequantized_model_is_left_as_given(tmp_path, kind):
    pre = prequantized_net(tmp_path)
    same, rec = step(kind, pre, ctx_for(tmp_path, data(x=SEQ[:8])))
    assert same is pre and not rec.changed
    assert rec.summary == ("nothing to change: the model is already quantized (2 DynamicQuantizeLinear, "
                           "1 ConvInteger, 1 DynamicQuantizeLSTM, 1 MatMulInteger)")
    assert rec.details["already_quantized"]["MatMulInteger"] == 1
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # returned before any work


def test_prequantized_qdq_model_and_the_fp32_path(tmp_path):
    """A QDQ model (what quantize-static writes) is detected too, and the fp32 candidate runs it as given."""
    art = conv_bn_net(tmp_path / "cbn.onnx", opset=13)
    qdq, _ = step("quantize-static", art, ctx_for(tmp_path / "q", data(x=IMG[:16])))
    assert set(onnxutil.quantized_ops(onnx.load(str(qdq.path)))) == {"DequantizeLinear", "QuantizeLinear"}
    for kind in ("quantize-static", "quantize-dynamic", "int4"):
        same, rec = step(kind, qdq, ctx_for(tmp_path / kind, data(x=IMG[:8])))
        assert same is qdq and not rec.changed and rec.summary.startswith("nothing to change: the model is already quantized (")
    with pytest.raises(StepError, match=r"^the model is already quantized \(\d+ DequantizeLinear, \d+ QuantizeLinear\)"):
        guard_quantize(qdq, ctx_for(tmp_path / "g", data(x=IMG[:8])), lambda p: 1.0, 1.0, 0.01)

    pre = prequantized_net(tmp_path)
    out, rec = step("optimize-graph", pre, ctx_for(tmp_path / "o"), level="extended")  # the ORT fp32 candidate
    assert np.array_equal(run(pre.path, {"x": SEQ}), run(out.path, {"x": SEQ}))
    assert onnxutil.quantized_ops(onnx.load(str(out.path)))  # still the given int8 model


def test_prequantized_model_on_openvino(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import edgepack.steps.openvino  # noqa: F401

    pre = prequantized_net(tmp_path)
    ctx = ctx_for(tmp_path, data(x=SEQ[:8]))
    ctx.runtime = ctx.target.runtimes[1]  # OpenVINO CPU
    ir, rec = step("convert-ir", pre, ctx)
    assert rec.changed  # OpenVINO runs the given model (its quantization folded into float ops)
    for kind in ("nncf-int8", "nncf-int4"):
        same, rec = step(kind, ir, ctx)
        assert same is ir and not rec.changed
        assert rec.summary == ("nothing to change: the model is already quantized (ONNX: 2 DynamicQuantizeLinear, "
                               "1 ConvInteger, 1 DynamicQuantizeLSTM, 1 MatMulInteger)")


# ---------------------------------------------------------------- 5. what ORT CPU accelerates

def test_dynamic_skips_models_without_matmul_without_running_the_quantizer(tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    monkeypatch.setattr(ortq, "quantize_dynamic", lambda *a, **k: pytest.fail("the quantizer ran"))
    art = conv_bn_net(tmp_path / "cnn.onnx", opset=13)
    m = onnx.load(str(art.path))
    m.graph.node.pop()  # drop the MatMul head: a pure CNN
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 8]))
    onnx.save(m, str(art.path))
    same, rec = step("quantize-dynamic", art, ctx_for(tmp_path))
    assert same is art and not rec.changed
    assert rec.summary == "nothing to change: no MatMul/Gemm/Attention/LSTM to quantize"
    assert rec.seconds < 1.0 and not (tmp_path / "work").exists()


def test_dynamic_quantizes_matmul_and_lstm_not_conv(tmp_path):
    art = conv_lstm_net(tmp_path / "lstm.onnx")
    out, rec = step("quantize-dynamic", art, ctx_for(tmp_path))
    h = ops(out.path)
    assert h["DynamicQuantizeLSTM"] == 1 and h["MatMulInteger"] == 1 and h["Conv"] == 1 and "ConvInteger" not in h
    assert rec.summary == "quantized 1 of 2 Conv/MatMul/Gemm nodes; 1 LSTM -> DynamicQuantizeLSTM; float: conv"
    assert cosine(run(art.path, {"x": SEQ}), run(out.path, {"x": SEQ})) > 0.999


# ---------------------------------------------------------------- 6. int4 on the tiny transformer

def test_int4_on_tiny_transformer_sample(tmp_path):
    path = ROOT / "samples" / "tiny-transformer" / "model.onnx"
    art = Artifact(path=path, format=ModelFormat.ONNX, files=(path,), metadata={})
    ev = np.load(ROOT / "samples" / "tiny-transformer" / "eval.npz")
    out, rec = step("int4", art, ctx_for(tmp_path))
    assert rec.details["eligible"] == 14 and rec.details["matmul_nbits"] == 14  # 13 MatMul + the Gemm head
    assert rec.details["stayed_float"] == ["/blocks.0/MatMul", "/blocks.0/MatMul_1", "/blocks.1/MatMul",
                                           "/blocks.1/MatMul_1"]  # attention scores: no constant weight
    ref, got = run(path, {"input": ev["x"]}), run(out.path, {"input": ev["x"]})
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.97 and cosine(ref, got) > 0.99
    assert (got.argmax(-1) == ev["y"]).mean() >= (ref.argmax(-1) == ev["y"]).mean() - 0.01


def test_nncf_int4_on_tiny_transformer_ir(tmp_path):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import edgepack.steps.openvino  # noqa: F401

    path = ROOT / "samples" / "tiny-transformer" / "model.onnx"
    art = Artifact(path=path, format=ModelFormat.ONNX, files=(path,), metadata={})
    ev = np.load(ROOT / "samples" / "tiny-transformer" / "eval.npz")
    ctx = ctx_for(tmp_path)
    ctx.runtime = ctx.target.runtimes[1]
    ir, _ = step("convert-ir", art, ctx)
    out, rec = step("nncf-int4", ir, ctx)
    assert rec.changed and sum(rec.details["compressed"].values()) >= 13
    compiled = ov.Core().compile_model(str(out.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got, ref = compiled({0: ev["x"]})[0], run(path, {"input": ev["x"]})
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.97 and cosine(ref, got) > 0.99


# ---------------------------------------------------------------- 7. clean failures, CWD

def test_quantizers_leave_the_working_directory_alone(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    art = int_input_net(tmp_path / "ids.onnx")
    calib = data(ids=IDS[:8].astype(np.int32), len=LENS[:8].astype(np.int32))
    for kind in ("quantize-static", "quantize-dynamic", "int4"):
        step(kind, art, ctx_for(tmp_path / kind, calib))
        assert Path(os.getcwd()) == cwd and list(cwd.iterdir()) == [], kind


def test_quantizer_exceptions_become_one_line_step_errors(tmp_path, monkeypatch, capsys):
    import onnxruntime.quantization as ortq
    from onnxruntime.quantization import matmul_nbits_quantizer

    monkeypatch.setattr(ortq, "quantize_static", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    monkeypatch.setattr(ortq, "quantize_dynamic", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
        "Unable to find data type for weight_name='c'.\nshape_inference failed")))

    def nbits_fails(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(matmul_nbits_quantizer.MatMulNBitsQuantizer, "process", nbits_fails)
    art = int_input_net(tmp_path / "ids.onnx")
    calib = data(ids=IDS[:8].astype(np.int32), len=LENS[:8].astype(np.int32))
    with pytest.raises(StepError) as e1:
        step("quantize-static", art, ctx_for(tmp_path / "s", calib))
    assert e1.value.args[0] == "ONNX Runtime static quantization failed: AssertionError"
    assert e1.value.hint.startswith("the graph has a construct ONNX Runtime's quantizer does not handle")
    with pytest.raises(StepError) as e2:
        step("quantize-dynamic", art, ctx_for(tmp_path / "d"))
    assert e2.value.args[0] == ("ONNX Runtime dynamic quantization failed: Unable to find data type for "
                                "weight_name='c'.")
    assert e2.value.hint == "exclude the failing node with exclude_nodes, or rely on the static int8 and fp32 candidates"
    with pytest.raises(StepError) as e3:
        step("int4", art, ctx_for(tmp_path / "i"))
    assert e3.value.args[0] == "4-bit weight quantization failed: list index out of range"
    assert capsys.readouterr().out == ""  # nothing of the quantizers on stdout


def test_histogram_calibration_keeps_stdout_clean(tmp_path, capsys):
    art = conv_bn_net(tmp_path / "cbn.onnx", opset=13)
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=IMG[:8]), calibration_method="entropy"))
    assert rec.changed and capsys.readouterr().out == ""  # ORT prints "Collecting tensor data ..." otherwise


def test_shared_bias_does_not_collide_with_existing_names(tmp_path):
    """ORT names its copy of a bias shared by two Convs "<bias><n+1>" (n: the largest such initializer suffix),
    without looking at node outputs: with "b1" an initializer and "b2" a node output (tf2onnx names tensors
    like that) the quantized graph had two producers of "b2" and did not load (basic-pitch's nmp.onnx)."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["x"], ["b2"], name="pool"),  # a node output named "b2"
             helper.make_node("Mul", ["b2", "b1"], ["b2s"], name="scale"),
             helper.make_node("Add", ["c1", "b2s"], ["c1b"], name="add"),
             helper.make_node("Conv", ["c1b", "w2", "b"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    art = save(tmp_path / "shared.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
               [init("w1", f32(rng.normal(0, .3, (4, 4, 3, 3)))), init("w2", f32(rng.normal(0, .3, (4, 4, 3, 3)))),
                init("b", f32(rng.normal(0, .1, 4))), init("b1", f32(rng.normal(0, 1, (1, 4, 1, 1))))])
    m = onnx.load(str(art.path))
    assert onnxutil.unshare_biases(m) == 1 and [n.input[2] for n in m.graph.node if n.op_type == "Conv"] == ["b", "b_copy1"]
    x = f32(rng.normal(0, 1, (16, 4, 8, 8)))
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=x[:8])))
    assert rec.changed and rec.details["quantized"] == 2
    assert cosine(run(art.path, {"x": x}), run(out.path, {"x": x})) > 0.99


def test_float64_softmax_and_infinite_ranges_stay_float(tmp_path):
    """DSP graphs (swift-f0): a Softmax computed in float64 made ORT fail ("Only an existing tensor can be
    modified"), and a log of zero (-inf) gave a tensor an infinite range, an inf scale and NaN outputs."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu"),
             helper.make_node("Log", ["r1"], ["lg"], name="log"),  # -inf wherever relu is 0
             helper.make_node("Pad", ["lg", "pads"], ["lp"], name="pad"),  # quantizable, reads lg
             helper.make_node("Max", ["lp", "lo"], ["lc"], name="floor"),
             helper.make_node("Cast", ["lc"], ["ld"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Softmax", ["ld"], ["sd"], name="softmax_f64", axis=-1),
             helper.make_node("Cast", ["sd"], ["sf"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["sf", "w2"], ["y"], name="mm2")]
    art = save(tmp_path / "dsp.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
               [init("w1", f32(rng.normal(0, .5, (16, 32)))), init("w2", f32(rng.normal(0, 1, (34, 8)))),
                init("lo", np.array(-8.0, np.float32)), init("pads", np.array([0, 1, 0, 1], np.int64))])
    x = f32(rng.normal(0, 1, (32, 16)))
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=x[:16])))
    assert rec.changed and rec.details["quantized"] == 2
    kept = rec.details["notes"][-1]
    assert kept.startswith("kept float: softmax_f64, log, pad (")
    y = run(out.path, {"x": x})
    assert np.isfinite(y).all() and cosine(run(art.path, {"x": x}), y) > 0.98


def test_calibration_subset_sized_to_the_activations(monkeypatch):
    """ORT holds every activation of every calibration sample: the subset shrinks when they are large."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "g", [x], [y])
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert onnxutil.activation_bytes(model) == 2 * 1000 * 4  # h and y, one sample
    data = Dataset({"x": np.zeros((100, 1000), np.float32)}, None, "calib.npz")
    assert quantize_mod.CalibReader(data, model, 128).samples == 100 and \
        quantize_mod.CalibReader(data, model, 128).note is None
    monkeypatch.setattr(quantize_mod, "CALIB_MEMORY", 20 * 8000)
    r = quantize_mod.CalibReader(data, model, 128)
    assert r.samples == 20 and r.note == "calibrated on 20 of 100 samples: the model's activations take about 0 MB per sample"


# ---------------------------------------------------------------- 6. DSP inside the graph

def spectrogram_net(tmp_path: Path) -> tuple[Artifact, np.ndarray]:
    """A power spectrum from fixed cos/sin tables, a log, then a small learned head (dnsmos, swift-f0 style)."""
    n, bins = 128, 32
    t = np.arange(n)[:, None] * np.arange(bins)[None, :] * 2 * np.pi / n
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "cos"], ["re"], name="dft_re"),
             helper.make_node("MatMul", ["x", "sin"], ["im"], name="dft_im"),
             helper.make_node("Mul", ["re", "re"], ["re2"], name="re2"),
             helper.make_node("Mul", ["im", "im"], ["im2"], name="im2"),
             helper.make_node("Add", ["re2", "im2"], ["pw"], name="power"),
             helper.make_node("Add", ["pw", "eps"], ["pe"], name="floor"),
             helper.make_node("Log", ["pe"], ["lg"], name="log"),
             helper.make_node("MatMul", ["lg", "w1"], ["h"], name="dense1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="dense2")]
    art = save(tmp_path / "spec.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
               [init("cos", f32(np.cos(t))), init("sin", f32(np.sin(t))), init("eps", np.array(1e-6, np.float32)),
                init("w1", f32(rng.normal(0, .3, (bins, 16)))), init("w2", f32(rng.normal(0, .3, (16, 4))))])
    # tones of very different loudness: most bins hold little energy, a few hold a lot
    k = rng.integers(1, bins - 1, (64, 1))
    x = np.sin(2 * np.pi * k * np.arange(n)[None, :] / n) * rng.uniform(0.01, 10, (64, 1))
    return art, f32(x + rng.normal(0, 1e-3, x.shape))


FRONT = ["dft_im", "dft_re", "floor", "im2", "log", "power", "re2"]


def test_signal_front_end_found_only_without_learned_activations():
    from edgepack.steps.frontend import front_end

    dsp = [("dft", "MatMul", []), ("mag", "Mul", ["dft", "dft"]), ("log", "Log", ["mag"]),
           ("dense", "MatMul", ["log"]), ("relu", "Relu", ["dense"])]
    assert front_end(dsp) == ["dft", "mag", "log"]
    deep = [("conv", "Conv", []), ("relu", "Relu", ["conv"]), ("log", "Log", ["relu"])]  # a log inside the network
    assert front_end(deep) == []


def test_static_int8_keeps_the_signal_front_end_float(tmp_path):
    """Quantizing an in-graph spectrogram to 8 bits crushed dnsmos/swift-f0/basic-pitch (SQNR 7-10 dB):
    the front-end up to the Log stays float, the learned layers after it are quantized."""
    art, x = spectrogram_net(tmp_path)
    out, rec = step("quantize-static", art, ctx_for(tmp_path, data(x=x[:32])))
    assert rec.changed and rec.details["quantized"] == 2  # dense1, dense2
    assert "kept the signal front-end float (7 nodes up to the Log, 2 of them Conv/MatMul" in rec.summary
    q = onnx.load(str(out.path))
    quantized_inputs = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    front = [n for n in q.graph.node if n.name in FRONT]
    assert len(front) == 7 and not any(set(n.input) & quantized_inputs for n in front)
    ref, y = run(art.path, {"x": x[32:]}), run(out.path, {"x": x[32:]})
    assert cosine(ref, y) > 0.995


def test_nncf_int8_keeps_the_signal_front_end_float(tmp_path):
    pytest.importorskip("nncf")
    import edgepack.steps.openvino  # noqa: F401
    from edgepack.runner.run import open_openvino  # noqa: F401

    art, x = spectrogram_net(tmp_path)
    ctx = ctx_for(tmp_path, data(x=x[:32]))
    ctx.runtime = ctx.target.runtimes[1]  # OpenVINO CPU
    ir, _ = step("convert-ir", art, ctx)
    q, rec = step("nncf-int8", ir, ctx)
    assert rec.changed and "kept the signal front-end float" in rec.summary
    import openvino as ov

    # f32 as the targets pin it: unpinned, OpenVINO runs bf16 on CPUs with AVX512_BF16 (cosine 0.969 there)
    compiled = ov.Core().compile_model(str(q.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    y = compiled({"x": x[32:]})[0]
    assert cosine(run(art.path, {"x": x[32:]}), y) > 0.995


def test_symbolic_shape_inference_only_where_onnx_shape_inference_leaves_gaps(tmp_path):
    """onnxruntime's symbolic shape inference (sympy) runs only when onnx's own leaves a node output without a
    rank, or the graph has subgraphs; a plain CNN/MLP with a symbolic batch dim is fully shaped already."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    plain = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [x], [y], [w])
    assert onnxutil.fully_shaped(helper.make_model(plain, opset_imports=[helper.make_opsetid("", 17)]))
    # a Reshape to a computed shape: onnx cannot tell the rank of its output
    shape = helper.make_tensor_value_info("s", TensorProto.INT64, [None])
    gap = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g", [x, shape], [y])
    assert not onnxutil.fully_shaped(helper.make_model(gap, opset_imports=[helper.make_opsetid("", 17)]))
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "b", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])])
    sub = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                            "g", [x, c], [y])
    assert not onnxutil.fully_shaped(helper.make_model(sub, opset_imports=[helper.make_opsetid("", 17)]))
    # and pre-processing the fully shaped graph (no symbolic pass) keeps every node, with no note
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(plain, opset_imports=[helper.make_opsetid("", 17)]), path)
    out, notes = quantize_mod._preprocess(Artifact(path, ModelFormat.ONNX, (path,)), tmp_path)
    assert not notes and [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Relu"]
