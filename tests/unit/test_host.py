"""Host detection and the runtime seam: availability through the backends, every registry resolves."""
from __future__ import annotations

import pytest

from edgepack import host
from edgepack.runner import run as runner
from edgepack.runtimes import BACKENDS, availability, get_backend
from edgepack.target import RuntimeSpec, list_targets


@pytest.fixture
def fake_runtimes(monkeypatch):
    def set_(ort=("1.32.0", ("CPUExecutionProvider",)), ov=("2026.4.1", ("CPU", "GPU.0", "GPU.1"))):
        monkeypatch.setattr(type(get_backend("onnxruntime")), "info", lambda self: ort)
        monkeypatch.setattr(type(get_backend("openvino")), "info", lambda self: ov)
    return set_


ORT = RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")


def ov(device: str) -> RuntimeSpec:
    return RuntimeSpec(runtime="openvino", device=device, inference_precision="f32")


def test_availability_onnxruntime(fake_runtimes):
    fake_runtimes()
    assert availability(ORT) is None
    assert availability(ORT.model_copy(update={"provider": "CUDAExecutionProvider"})) == \
        "CUDAExecutionProvider not available on this host"
    fake_runtimes(ort=(None, ()))
    assert availability(ORT) == "onnxruntime is not installed"


def test_availability_openvino_matches_numbered_devices(fake_runtimes):
    fake_runtimes()
    assert availability(ov("CPU")) is None
    assert availability(ov("GPU")) is None  # GPU.0 / GPU.1 count as GPU
    assert availability(ov("GPU.1")) is None
    assert availability(ov("NPU")) == "OpenVINO NPU device not available on this host"
    assert availability(ov("GP")) is not None  # a prefix is not a device
    fake_runtimes(ov=(None, ()))
    assert availability(ov("CPU")) == "openvino is not installed (pip install edgepack[openvino])"


def test_arch_mismatch_is_said_first():
    other = "aarch64" if runner.host_fingerprint()["arch"] == "x86_64" else "x86_64"
    assert availability(ORT, other).startswith("this host is ")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    h = runner.host_fingerprint()
    assert h["cpu"] == "Test CPU 9000"
    assert set(h["features"]) == {"avx2", "avx512f", "avx512_vnni", "amx_tile"}  # first 'flags' line only


def test_host_info_on_this_machine():
    h = host.host_info()
    d = h.to_dict()
    assert set(d) >= {"cpu", "arch", "cores", "features", "runtimes"}
    assert h.cores >= 1 and h.arch
    assert set(d["runtimes"]) == set(BACKENDS)
    assert "CPUExecutionProvider" in d["runtimes"]["onnxruntime"]["devices"]


def test_every_target_runtime_and_step_resolves_through_the_registries():
    """A new runtime is one module in BACKENDS; a new compression one registered step: both must resolve."""
    from edgepack.recipe import Recipe, plan
    from edgepack.steps import STEPS, get_step, load_steps
    from edgepack.types import ModelFormat

    load_steps()
    for t in list_targets():
        for r in t.runtimes:
            backend = get_backend(r.runtime)
            assert backend.name == r.runtime and backend.device(r)
        p = plan(t, Recipe(target=t.name), model_format=ModelFormat.ONNX, has_calib=True, has_train=False,
                 has_eval=True)
        for c in p.candidates:
            for s in c.steps + (get_backend(c.runtime.runtime).guard_steps(c.runtime, c.precision) or ()):
                assert get_step(s.kind).kind == s.kind
    assert {"quantize-guarded", "quantize-dynamic-guarded", "distill", "structured-prune", "prune", "export-onnx"} <= set(STEPS)
    with pytest.raises(Exception, match="unknown runtime 'tflite'"):
        RuntimeSpec(runtime="tflite", provider="x")


def test_every_package_ships_in_the_wheel():
    """pyproject lists the packages explicitly (targets/ and samples/ are mapped in): none may be missed."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "edgepack").rglob("__init__.py")}
    assert found | {"edgepack.targets", "edgepack.samples"} == listed
