"""Use libraries that pull in PyTorch for features edgepack does not use, without loading it."""
from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def torch_hidden() -> Iterator[None]:
    """While inside, `import torch` raises ImportError, unless torch is already loaded.

    NNCF (its torch tensor backend, its model-type probes) and onnxruntime.tools (an export helper) import
    torch when it is installed, each behind `except ImportError`. For ONNX/OpenVINO models that costs
    ~230 MB of memory and ~1 s, so it is hidden.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def import_without_torch(*names: str) -> None:
    with torch_hidden():
        for n in names:
            importlib.import_module(n)
