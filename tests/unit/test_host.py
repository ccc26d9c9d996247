"""Host detection: CPU flags, runtimes and devices, and the reason a provider/device cannot run here."""
from __future__ import annotations

import pytest

from edgepack import host
from edgepack.types import RuntimeName


@pytest.fixture
def fake_runtimes(monkeypatch):
    def set_(ort=("1.32.0", ("CPUExecutionProvider",)), ov=("2026.4.1", ("CPU", "GPU.0", "GPU.1"))):
        monkeypatch.setattr(host, "ort_info", lambda: ort)
        monkeypatch.setattr(host, "ov_info", lambda: ov)
    return set_


def test_availability_onnxruntime(fake_runtimes):
    fake_runtimes()
    assert host.availability(RuntimeName.ONNXRUNTIME, "CPUExecutionProvider") is None
    assert host.availability(RuntimeName.ONNXRUNTIME, "CUDAExecutionProvider") == \
        "CUDAExecutionProvider not available on this host"
    fake_runtimes(ort=(None, ()))
    assert host.availability(RuntimeName.ONNXRUNTIME, "CPUExecutionProvider") == "onnxruntime is not installed"


def test_availability_openvino_matches_numbered_devices(fake_runtimes):
    fake_runtimes()
    assert host.availability(RuntimeName.OPENVINO, "CPU") is None
    assert host.availability(RuntimeName.OPENVINO, "GPU") is None  # GPU.0 / GPU.1 count as GPU
    assert host.availability(RuntimeName.OPENVINO, "GPU.1") is None
    assert host.availability(RuntimeName.OPENVINO, "NPU") == "OpenVINO NPU device not available on this host"
    assert host.availability(RuntimeName.OPENVINO, "GP") is not None  # a prefix is not a device
    fake_runtimes(ov=(None, ()))
    assert host.availability(RuntimeName.OPENVINO, "CPU") == "openvino is not installed"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    model, flags = host._cpu_model_and_flags()
    assert model == "Test CPU 9000"
    assert {"avx2", "avx512f", "avx512_vnni", "amx_tile"} <= flags and "sse" in flags  # first 'flags' line only


def test_host_info_on_this_machine():
    h = host.host_info()
    d = h.to_dict()
    assert set(d) >= {"cpu", "arch", "cores", "features", "ort_providers", "ov_devices"}
    assert h.cores >= 1 and h.arch
    assert set(h.features) <= set(host._FEATURES)
    assert "CPUExecutionProvider" in h.ort_providers
    assert "CPU" in h.ov_devices
