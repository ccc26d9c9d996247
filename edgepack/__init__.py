"""edgepack: turn a trained model into a verified deployment bundle for a specific device."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["pack", "profile", "verify", "load_target", "Target", "Report", "EdgepackError", "__version__"]

_LAZY = {"pack": "api", "profile": "api", "verify": "api", "load_target": "target", "Target": "target",
         "Report": "types", "EdgepackError": "errors"}


def __getattr__(name: str):
    # Lazy, so that `edgepack --help` imports neither pydantic models nor any runtime.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
