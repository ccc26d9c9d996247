"""Real ONNX Runtime and OpenVINO sessions on tiny hand-built ONNX graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import DataError, ModelError, RuntimeUnavailable
from edgepack.runtimes import is_int_kernel, kernel_summary, open_session
from edgepack.target import RuntimeSpec
from edgepack.types import Artifact, ModelFormat

ORT_CPU = RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")
OV_F32 = RuntimeSpec(runtime="openvino", device="CPU", inference_precision="f32")
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 32)).astype(np.float32)
B1 = RNG.standard_normal(32).astype(np.float32)
W2 = RNG.standard_normal((32, 5)).astype(np.float32)


def mlp_numpy(x):
    return np.maximum(x @ W1 + B1, 0) @ W2


def save_mlp(path: Path, batch="N", w1=W1, b1=B1, w2=W2) -> Artifact:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "B1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["scores"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, w1.shape[0]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, w2.shape[1]])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return Artifact(path, ModelFormat.ONNX, (path,))


def save_two_inputs(path: Path) -> Artifact:
    """scores = mean(E[ids], axis=1) * scale: an int64 input and a float input."""
    emb = RNG.standard_normal((10, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"]),
             helper.make_node("ReduceMean", ["g"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Mul", ["m", "scale"], ["y"])]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
                       helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(emb, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return Artifact(path, ModelFormat.ONNX, (path,)), emb


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Artifact:
    return save_mlp(tmp_path_factory.mktemp("m") / "mlp.onnx")


@pytest.fixture(scope="module")
def ort_session(mlp):
    return open_session(mlp, ORT_CPU, threads=1)


@pytest.fixture(scope="module")
def ov_session(mlp):
    return open_session(mlp, OV_F32, threads=1)


X = RNG.standard_normal((3, 16)).astype(np.float32)


def test_ort_matches_numpy_and_records_load(ort_session):
    s = ort_session
    assert s.runtime == "onnxruntime" and s.device_used == "CPUExecutionProvider" and not s.fell_back
    assert [(i.name, i.dtype, i.shape) for i in s.inputs] == [("x", "float32", ("N", 16))]
    assert [(o.name, o.shape) for o in s.outputs] == [("scores", ("N", 5))]
    (y,) = s.run({"x": X})
    np.testing.assert_allclose(y, mlp_numpy(X), rtol=1e-5, atol=1e-5)
    assert s.load_ms > 0 and s.first_ms is not None and s.first_ms > 0 and s.memory_mb >= 0
    assert s.fixed_batch is None


def test_openvino_matches_numpy_with_f32_pinned(ov_session):
    s = ov_session
    assert s.runtime == "openvino" and s.device_used == "CPU"
    # The CPU plugin defaults to bf16 on AVX512-BF16/AMX CPUs: the pin must hold in the compiled model.
    assert s.precision_used == "f32"
    assert s.model.handle[1].get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert s.inputs[0].shape == (None, 16) and s.inputs[0].dtype == "float32"
    (y,) = s.run({"x": X})
    np.testing.assert_allclose(y, mlp_numpy(X), rtol=1e-4, atol=1e-4)
    assert s.load_ms > 0


def _ov_cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(not _ov_cpu_has_bf16(), reason="OpenVINO CPU has no bf16 here")
def test_openvino_bf16_pin_changes_numbers(mlp):
    import openvino as ov

    # Without a hint the CPU plugin picks bf16 on such CPUs (it does on this AVX512-BF16 host): the reason
    # edgepack always pins the precision.
    default = ov.Core().compile_model(str(mlp.path), "CPU").get_property("INFERENCE_PRECISION_HINT")
    assert default.get_type_name() in ("bf16", "f32")
    s = open_session(mlp, RuntimeSpec(runtime="openvino", device="CPU", inference_precision="bf16"), threads=1)
    assert s.precision_used == "bf16"
    err = np.abs(s.run({"x": X})[0] - mlp_numpy(X)).max()
    assert 1e-4 < err < 0.5  # bf16 has ~3 significant digits: visibly worse than f32, still close


def test_openvino_reads_ir(mlp, tmp_path):
    import openvino as ov

    xml = tmp_path / "mlp.xml"
    ov.save_model(ov.Core().read_model(str(mlp.path)), str(xml), compress_to_fp16=False)
    art = Artifact(xml, ModelFormat.OPENVINO, (xml, xml.with_suffix(".bin")))
    s = open_session(art, OV_F32, threads=1)
    np.testing.assert_allclose(s.run({"x": X})[0], mlp_numpy(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="onnxruntime cannot run a openvino model"):
        open_session(art, ORT_CPU, threads=1)


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_feed_errors_name_the_input(mlp, spec):
    s = open_session(mlp, spec, threads=1)
    with pytest.raises(DataError, match=r"unknown input 'y'; the model's inputs are: x"):
        s.run({"y": X})
    with pytest.raises(DataError, match=r"input 'x' is missing; expected float32 \[[\w?]+, 16\]"):
        s.run({})
    with pytest.raises(DataError, match=r"unknown input 'z'"):
        s.run({"x": X, "z": X})
    with pytest.raises(DataError, match=r"input 'x' has shape \[3, 16, 1\]; expected float32 \[[\w?]+, 16\]"):
        s.run({"x": X[..., None]})
    with pytest.raises(DataError, match=r"input 'x' has shape \[3, 8\]; expected float32 \[[\w?]+, 16\]"):
        s.run({"x": X[:, :8]})
    with pytest.raises(DataError, match=r"input 'x' has dtype complex64; expected float32"):
        s.run({"x": X.astype(np.complex64)})
    # float64 -> float32 is a safe cast
    np.testing.assert_allclose(s.run({"x": X.astype(np.float64)})[0], mlp_numpy(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_int_and_float_inputs(tmp_path, spec):
    art, emb = save_two_inputs(tmp_path / "two.onnx")
    s = open_session(art, spec, threads=1)
    assert {i.name: i.dtype for i in s.inputs} == {"ids": "int64", "scale": "float32"}
    ids = np.array([[0, 1, 2], [9, 9, 3]], dtype=np.int64)
    scale = np.array([[1.0], [2.0]], dtype=np.float32)
    (y,) = s.run({"ids": ids, "scale": scale})
    np.testing.assert_allclose(y, emb[ids].mean(axis=1) * scale, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"input 'ids' has dtype float32; expected int64"):
        s.run({"ids": ids.astype(np.float32), "scale": scale})


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_static_batch_model(tmp_path, spec):
    s = open_session(save_mlp(tmp_path / "static.onnx", batch=1), spec, threads=1)
    assert s.inputs[0].shape == (1, 16) and s.fixed_batch == 1
    np.testing.assert_allclose(s.run({"x": X[:1]})[0], mlp_numpy(X[:1]), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match=r"shape \[3, 16\]; expected float32 \[1, 16\]"):
        s.run({"x": X})


def test_absent_provider_raises_or_falls_back(mlp):
    cuda = RuntimeSpec(runtime="onnxruntime", provider="CUDAExecutionProvider")
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider not available on this host"):
        open_session(mlp, cuda, threads=1)
    s = open_session(mlp, cuda, threads=1, fallback=True)
    assert s.device_used == "CPUExecutionProvider" and s.requested == "CUDAExecutionProvider" and s.fell_back
    np.testing.assert_allclose(s.run({"x": X})[0], mlp_numpy(X), rtol=1e-5, atol=1e-5)


def test_absent_openvino_device_falls_back_to_cpu_f32(mlp):
    npu = RuntimeSpec(runtime="openvino", device="NPU", inference_precision="f16")
    with pytest.raises(RuntimeUnavailable, match="OpenVINO NPU device not available on this host"):
        open_session(mlp, npu, threads=1)
    s = open_session(mlp, npu, threads=1, fallback=True)
    assert s.device_used == "CPU" and s.precision_used == "f32" and s.fell_back
    np.testing.assert_allclose(s.run({"x": X})[0], mlp_numpy(X), rtol=1e-4, atol=1e-4)


def test_bad_artifacts(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    art = Artifact(bad, ModelFormat.ONNX, (bad,))
    with pytest.raises(ModelError, match="onnxruntime could not load the model"):
        open_session(art, ORT_CPU, threads=1)
    with pytest.raises(ModelError, match="openvino could not compile the model for CPU"):
        open_session(art, OV_F32, threads=1)
    with pytest.raises(ModelError, match="export it to ONNX first"):
        open_session(Artifact(tmp_path / "m.py", ModelFormat.TORCH), ORT_CPU, threads=1)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Artifact:
    """Large enough that kernels, not call overhead, dominate a run."""
    r = np.random.default_rng(1)
    return save_mlp(tmp_path_factory.mktemp("b") / "big.onnx", w1=r.standard_normal((512, 512)).astype(np.float32),
                    b1=r.standard_normal(512).astype(np.float32), w2=r.standard_normal((512, 10)).astype(np.float32))


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_op_profile_times_sum_near_run_time(big, spec):
    import time

    s = open_session(big, spec, threads=1)
    feeds = {"x": RNG.standard_normal((256, 512)).astype(np.float32)}
    prof = s.op_profile(feeds, iterations=30)
    assert prof and all(p["ms"] > 0 for p in prof)
    assert sum(p["share"] for p in prof) == pytest.approx(1.0)
    assert all(not p["int"] and p["device"] == s.device_used for p in prof)
    assert [p["ms"] for p in prof] == sorted((p["ms"] for p in prof), reverse=True)
    walls = []
    for _ in range(30):
        t0 = time.perf_counter()
        s.run(feeds)
        walls.append((time.perf_counter() - t0) * 1000)
    # Kernels are most of a run here; the bounds are loose because this 2-core host is shared and noisy.
    ratio = sum(p["ms"] for p in prof) / float(np.median(walls))
    assert 0.4 < ratio < 3.0, (prof, walls)
    ops = {p["op"] for p in prof}
    assert ("MatMul" in ops) if spec is ORT_CPU else ("FullyConnected" in ops)


@pytest.fixture(scope="module")
def quantized(big, tmp_path_factory):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": RNG.standard_normal((1, 512)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    d = tmp_path_factory.mktemp("q")
    quantize_dynamic(str(big.path), str(d / "dyn.onnx"))
    quantize_static(str(big.path), str(d / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {k: Artifact(d / f"{k}.onnx", ModelFormat.ONNX) for k in ("dyn", "qdq")}


def test_op_profile_sees_integer_kernels(quantized):
    feeds = {"x": RNG.standard_normal((8, 512)).astype(np.float32)}
    ort_dyn = open_session(quantized["dyn"], ORT_CPU, threads=1).op_profile(feeds, iterations=5)
    ints = {p["op"] for p in ort_dyn if p["int"]}
    assert ints and ints <= {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat"}
    ort_qdq = open_session(quantized["qdq"], ORT_CPU, threads=1).op_profile(feeds, iterations=5)
    assert any(p["op"] == "QLinearMatMul" and p["int"] for p in ort_qdq)
    ov_qdq = open_session(quantized["qdq"], OV_F32, threads=1).op_profile(feeds, iterations=5)
    fc = next(p for p in ov_qdq if p["op"] == "FullyConnected")
    assert fc["int"] and is_int_kernel("FullyConnected", fc["exec"]), fc
    summ = kernel_summary(ov_qdq)
    assert summ["int_ops"] >= 1 and 0.3 < summ["int_time_share"] <= 1.0
    assert summ["int_ops"] + summ["float_ops"] == len(ov_qdq)


def test_kernel_classification():
    assert is_int_kernel("QLinearConv") and is_int_kernel("MatMulNBits") and is_int_kernel("ConvInteger")
    assert not is_int_kernel("Conv") and not is_int_kernel("QuantizeLinear")
    assert is_int_kernel("Convolution", "jit_avx512_I8") and is_int_kernel("FullyConnected", "brgemm_avx512_amx_u8")
    assert not is_int_kernel("Convolution", "jit_avx512_f32") and not is_int_kernel("MatMul", "brgemm_avx512_bf16")
    prof = [{"op": "A", "ms": 3.0, "int": True}, {"op": "B", "ms": 1.0, "int": False}]
    assert kernel_summary(prof) == {"int_ops": 1, "float_ops": 1, "int_time_share": 0.75}
    assert kernel_summary([])["int_time_share"] == 0.0
