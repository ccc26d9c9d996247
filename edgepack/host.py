"""What this host can run: CPU features, ONNX Runtime providers, OpenVINO devices."""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from .types import RuntimeName

_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
             "neon", "asimd", "asimddp", "i8mm", "sve")


@dataclass(frozen=True)
class HostInfo:
    cpu: str
    arch: str
    cores: int
    features: tuple[str, ...]
    os: str
    python: str
    ort_version: str | None
    ort_providers: tuple[str, ...]
    ov_version: str | None
    ov_devices: tuple[str, ...]

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def ort_info() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ()
    return ort.__version__, tuple(ort.get_available_providers())


@functools.lru_cache(maxsize=1)
def ov_info() -> tuple[str | None, tuple[str, ...]]:
    try:
        import openvino as ov
    except ImportError:
        return None, ()
    try:
        devices = tuple(ov.Core().available_devices)
    except RuntimeError:
        devices = ()
    return ov.__version__.split("-")[0], devices


@functools.lru_cache(maxsize=1)
def host_info() -> HostInfo:
    model, flags = _cpu_model_and_flags()
    ort_v, providers = ort_info()
    ov_v, devices = ov_info()
    return HostInfo(
        cpu=model,
        arch=platform.machine(),
        cores=physical_cores(),
        features=tuple(f for f in _FEATURES if f in flags),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        ort_version=ort_v,
        ort_providers=providers,
        ov_version=ov_v,
        ov_devices=devices,
    )


def availability(runtime: RuntimeName, provider_or_device: str, arch: str = "any") -> str | None:
    """None when the runtime and its provider/device exist here, else the reason it cannot run."""
    here = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    if arch != "any" and arch != here:
        return f"this host is {here}, the target is {arch}"
    if runtime is RuntimeName.ONNXRUNTIME:
        version, providers = ort_info()
        if version is None:
            return "onnxruntime is not installed"
        if provider_or_device not in providers:
            return f"{provider_or_device} not available on this host"
        return None
    version, devices = ov_info()
    if version is None:
        return "openvino is not installed"
    if not any(d == provider_or_device or d.startswith(provider_or_device + ".") for d in devices):
        return f"OpenVINO {provider_or_device} device not available on this host"
    return None
