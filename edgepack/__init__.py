"""edgepack: turn a trained model into a verified deployment bundle for a specific device."""
from __future__ import annotations

import sys as _sys

__version__ = "0.2.0"  # as pyproject.toml
# No telemetry: openvino_telemetry (imported by NNCF and OpenVINO's converter, each behind `except ImportError`)
# forks a process from a thread to send it, which can deadlock against ONNX Runtime's threads and hang the exit.
_sys.modules.setdefault("openvino_telemetry", None)
# ONNX Runtime keeps a device id and event database under ~/.cache/Microsoft on every session unless told not to
__import__("os").environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
__all__ = ["pack", "profile", "verify", "load_target", "Target", "Report", "EdgepackError", "__version__"]

_LAZY = {"pack": "api", "profile": "api", "verify": "api", "load_target": "target", "Target": "target",
         "Report": "types", "EdgepackError": "errors"}


def __getattr__(name: str):
    # Lazy, so that `edgepack --help` imports neither pydantic models nor any runtime.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
