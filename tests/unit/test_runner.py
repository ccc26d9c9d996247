"""runner/run.py: standalone (no torch, no edgepack), selftest, --input/--output, input checks, benchmark."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle
from edgepack.runner import run as runner

RNG = np.random.default_rng(1)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = RNG.normal(size=3).astype(np.float32)
X = RNG.normal(size=(6, 4)).astype(np.float32)
SPECS = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]

# Run run.py isolated (-I: no PYTHONPATH, no user site, no cwd on sys.path) with a folder first on sys.path whose
# torch and edgepack packages raise ImportError: the runner must need neither.
WRAPPER = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.argv = ['run.py'] + sys.argv[2:]; "
           "runpy.run_path('run.py', run_name='__main__')")


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("blocker")
    (d / "torch.py").write_text("raise ImportError('torch is blocked: run.py must not import it')\n")
    (d / "edgepack").mkdir()
    (d / "edgepack" / "__init__.py").write_text("raise ImportError('edgepack is blocked: run.py must not import it')\n")
    return d


def run_py(bundle: Path, blocker: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", WRAPPER, str(blocker), *args], cwd=bundle,
                          capture_output=True, text=True, timeout=120)


def _gemm(path: Path, batch="batch") -> Path:
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def _manifest(runtime: dict, shape=("batch", 4)) -> dict:
    return {"name": "gemm", "target": {"name": "cpu-x86", "description": "test"}, "runtime": runtime,
            "precision": "fp32", "inputs": [{"name": "x", "dtype": "float32", "shape": list(shape)}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [shape[0], 3]}],
            "reference": {"rtol": 1e-4, "atol": 1e-5, "top1_min": 1.0}}


ORT_CPU = {"name": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
           "provider_options": {}}


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ort")
    model = _gemm(d / "gemm.onnx")
    return write_bundle(d / "bundle", model_files=[model], manifest=_manifest(ORT_CPU), reference_inputs={"x": X},
                        reference_outputs=[X @ W + B], report_files=[], selftest=False)


def test_summarize_numbers():
    s = runner.summarize([4.0, 1.0, 3.0, 2.0], batch=2)
    assert s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["iterations"] == 4
    assert s["mean"] == 2.5 and s["throughput"] == 800.0 and s["p90"] == pytest.approx(3.7)
    assert set(s) == {"iterations", "p50", "p90", "p99", "mean", "std", "min", "max", "p50_ci95", "cv", "throughput"}


def test_selftest_isolated(ort_bundle, blocker):
    p = run_py(ort_bundle, blocker, "--selftest", "--json", "st.json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("PASS selftest: 6 files match") and "CPUExecutionProvider" in p.stdout
    r = json.loads((ort_bundle / "st.json").read_text())
    (ort_bundle / "st.json").unlink()
    assert r["passed"] and r["max_abs_diff"] < 1e-5 and r["outputs"][0]["top1_agreement"] == 1.0
    # the wrapper really blocks them
    q = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(blocker)!r}); import torch"],
                       capture_output=True, text=True)
    assert q.returncode == 1 and "torch is blocked" in q.stderr


def test_input_output_isolated(ort_bundle, blocker, tmp_path):
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    p = run_py(ort_bundle, blocker, "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz"))
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "y.npz", allow_pickle=False) as z:
        assert z.files == ["y"]
        np.testing.assert_allclose(z["y"], x @ W + B, rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "xk.npz", x=x.astype(np.float64))  # key x, float64 cast safely to float32
    assert run_py(ort_bundle, blocker, "--input", str(tmp_path / "xk.npz"), "--output",
                  str(tmp_path / "y2.npz")).returncode == 0


@pytest.mark.parametrize("arr, key, msg", [
    (np.zeros((2, 5), np.float32), "x", "error: input 'x' has shape [2, 5]; expected float32 [batch, 4]"),
    (np.zeros((2, 4), np.complex64), "x", "error: input 'x' has dtype complex64; expected float32 [batch, 4]"),
    (np.zeros((2, 4), np.float32), "image", "error: unknown input 'image'; the model's inputs are: x"),
])
def test_bad_input_is_one_line_exit_2(ort_bundle, blocker, tmp_path, arr, key, msg):
    np.savez(tmp_path / "bad.npz", **{key: arr})
    p = run_py(ort_bundle, blocker, "--input", str(tmp_path / "bad.npz"), "--output", str(tmp_path / "y.npz"))
    assert p.returncode == 2 and p.stderr == msg + "\n" and not (tmp_path / "y.npz").exists()


def test_benchmark_json(ort_bundle, blocker, tmp_path):
    out = tmp_path / "profile.json"
    p = run_py(ort_bundle, blocker, "--benchmark", "--warmup", "3", "--iterations", "40", "--batch", "3",
               "--threads", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["schema_version"] == 2 and r["kind"] == "profile"
    assert r["bundle"] == {"name": "gemm", "target": "cpu-x86", "precision": "fp32"}
    assert set(r["host"]) == {"cpu", "arch", "cores", "features", "os", "python"} and r["host"]["cores"] >= 1
    assert r["runtime"] == "onnxruntime" and r["runtime_version"] == ort.__version__
    assert r["device_used"] == "CPUExecutionProvider" and r["threads"] == 1
    lat = r["latency"]
    assert lat["iterations"] == 40 and lat["batch"] == 3 and len(lat["samples_ms"]) == 40
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert lat["throughput"] == pytest.approx(3000.0 / lat["mean"])
    assert lat["load_ms"] > 0 and lat["first_ms"] > 0 and lat["peak_memory_mb"] >= 0
    assert p.stdout.startswith("p50 ") and "batch 3, 40 runs" in p.stdout


def test_selftest_fails_on_wrong_reference(tmp_path, blocker):
    b = write_bundle(tmp_path / "b", model_files=[_gemm(tmp_path / "g.onnx")], manifest=_manifest(ORT_CPU),
                     reference_inputs={"x": X}, reference_outputs=[X @ W + B + 0.01], report_files=[],
                     selftest=False)
    p = run_py(b, blocker, "--selftest")
    assert p.returncode == 1
    assert p.stdout.startswith("FAIL selftest: output 'y': 18 of 18 values outside rtol=0.0001 atol=1e-05 "
                               "(max abs diff 0.01")


def test_no_silent_provider_fallback(tmp_path, blocker):
    rt = {**ORT_CPU, "provider": "TensorrtExecutionProvider",
          "provider_options": {"trt_engine_cache_path": "trt-cache", "trt_fp16_enable": True}}
    b = write_bundle(tmp_path / "b", model_files=[_gemm(tmp_path / "g.onnx")], manifest=_manifest(rt),
                     reference_inputs={"x": X}, reference_outputs=[X @ W + B], report_files=[], selftest=False)
    p = run_py(b, blocker, "--selftest")
    assert p.returncode == 1 and p.stderr.startswith(
        "error: provider TensorrtExecutionProvider not available here; available: ")
    assert p.stderr.rstrip().endswith("pass --provider CPUExecutionProvider to run on CPU")
    p = run_py(b, blocker, "--selftest", "--provider", "CPUExecutionProvider")
    assert p.returncode == 0 and "on onnxruntime CPUExecutionProvider" in p.stdout
    opts = runner._abs_options(b.resolve(), rt["provider_options"])
    assert opts == {"trt_engine_cache_path": str(b.resolve() / "trt-cache"), "trt_fp16_enable": True}


def test_check_and_load_inputs(tmp_path):
    feeds = runner.check_inputs({"x": np.ones((2, 4), np.float64)}, SPECS)
    assert feeds["x"].dtype == np.float32 and feeds["x"].flags.c_contiguous
    fixed = [{"name": "x", "dtype": "int64", "shape": [2, 4]}]
    with pytest.raises(runner.InputError, match=r"^input 'x' has dtype float32; expected int64 \[2, 4\]$"):
        runner.check_inputs({"x": np.ones((2, 4), np.float32)}, fixed)
    assert runner.check_inputs({"x": np.ones((6, 4), np.int32)}, fixed, chunks=True)["x"].dtype == np.int64
    with pytest.raises(runner.InputError, match=r"shape \[6, 4\]; expected int64 \[2, 4\]$"):
        runner.check_inputs({"x": np.ones((6, 4), np.int64)}, fixed)
    with pytest.raises(runner.InputError, match=r"shape \[5, 4\]; expected int64 \[2, 4\] \(or a multiple of 2"):
        runner.check_inputs({"x": np.ones((5, 4), np.int64)}, fixed, chunks=True)
    with pytest.raises(runner.InputError, match=r"input 'x' is missing; expected float32 \[batch, 4\]"):
        runner.check_inputs({}, SPECS)
    two = SPECS + [{"name": "m", "dtype": "int64", "shape": [None, 4]}]
    np.save(tmp_path / "one.npy", np.ones((1, 4), np.float32))
    msg = r"holds one array but the model has 2 inputs; pass an .npz with keys x, m$"
    with pytest.raises(runner.InputError, match=msg):
        runner.load_inputs(tmp_path / "one.npy", two)
    with pytest.raises(runner.InputError, match="not found"):
        runner.load_inputs(tmp_path / "none.npz", SPECS)
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    for bad in ("empty.npy", "obj.npz"):
        with pytest.raises(runner.InputError, match=f"{bad} is not a readable .npy/.npz file without pickles"):
            runner.load_inputs(tmp_path / bad, SPECS)


def test_open_model_in_process(ort_bundle):
    m = runner.open_model(ort_bundle, threads=1)
    (y,) = m.run({"x": X})
    np.testing.assert_allclose(y, X @ W + B, rtol=1e-5, atol=1e-6)
    assert m.runtime == "onnxruntime" and m.device_used == "CPUExecutionProvider" and m.load_ms > 0


def test_openvino_ir_bundle(tmp_path, blocker):
    import openvino as ov

    xml = tmp_path / "ir" / "gemm.xml"
    ov.save_model(ov.convert_model(str(_gemm(tmp_path / "g.onnx", batch=2))), str(xml), compress_to_fp16=False)
    rt = {"name": "openvino", "version": ov.__version__.split("-")[0], "device": "CPU", "inference_precision": "f32"}
    b = write_bundle(tmp_path / "b", model_files=[xml, xml.with_suffix(".bin")], manifest=_manifest(rt, (2, 4)),
                     reference_inputs={"x": X}, reference_outputs=[X @ W + B], report_files=[], selftest=True)
    assert {"model.xml", "model.bin"} <= set(json.loads((b / "manifest.json").read_text())["files"])
    assert f"openvino=={rt['version']}" in (b / "requirements.txt").read_text()
    p = run_py(b, blocker, "--selftest")  # 6 samples run as 3 batches of the fixed batch 2
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("PASS selftest: 7 files match") and "on openvino CPU" in p.stdout
    assert verify_bundle(b)["selftest"]["max_abs_diff"] < 1e-5
    p = run_py(b, blocker, "--selftest", "--device", "NPU9")
    assert p.returncode == 1 and "device NPU9 not available here; available: CPU; pass --device CPU" in p.stderr
    p = run_py(b, blocker, "--benchmark", "--iterations", "5", "--batch", "3")
    assert p.returncode == 2 and "fixed batch of 2; pass --batch 2" in p.stderr
