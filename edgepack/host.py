"""What this host is and can run: the runner's fingerprint (CPU, features, OS) plus each runtime's devices."""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class HostInfo:
    cpu: str
    arch: str
    cores: int  # physical
    features: tuple[str, ...]
    os: str
    python: str
    runtimes: dict[str, dict] = field(default_factory=dict)  # name -> {"version": str|None, "devices": [...]}

    def to_dict(self) -> dict:
        return asdict(self)


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    return os.cpu_count() or 1


def runtimes_info() -> dict[str, dict]:
    """Every registered runtime: its version here (None when not installed) and its providers/devices."""
    from edgepack.runtimes import BACKENDS, get_backend

    out = {}
    for name in BACKENDS:
        version, devices = get_backend(name).info()
        out[name] = {"version": version, "devices": list(devices)}
    return out


@functools.lru_cache(maxsize=1)
def host_info() -> HostInfo:
    from edgepack.runner.run import host_fingerprint

    h = host_fingerprint()
    return HostInfo(cpu=h["cpu"], arch=h["arch"], cores=physical_cores(), features=tuple(h["features"]), os=h["os"],
                    python=h["python"], runtimes=runtimes_info())
