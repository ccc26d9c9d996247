"""edgepack: turn a trained model into a verified deployment bundle for a specific device."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["pack", "profile", "verify", "load_target", "Target", "Report", "EdgepackError", "__version__"]

from .errors import EdgepackError
from .target import Target, load_target
from .types import Report


def __getattr__(name: str):
    if name in ("pack", "profile", "verify"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
