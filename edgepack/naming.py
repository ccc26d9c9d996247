"""Names, shapes and paths as shipped files show them: a model always has a name, symbolic dims read as the
user wrote them (`batch`, not `floor(1.0*batch)`), and no absolute path of the packing host leaves it."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

GENERIC = {"", "model", "build", "net", "network", "main"}  # file or factory names that name nothing
_ATOM = r"(?:[A-Za-z_][\w.]*|\d+)"
_RULES = (  # applied anywhere in the text until nothing changes
    (re.compile(rf"(?<![\w.]){'1'}(?:\.0*)?\s*\*\s*({_ATOM})"), r"\1"),  # 1.0*batch -> batch
    (re.compile(rf"({_ATOM})\s*\*\s*1(?:\.0*)?(?![\w.])"), r"\1"),  # batch*1 -> batch
    (re.compile(rf"({_ATOM})\s*/\s*1(?:\.0*)?(?![\w.])"), r"\1"),  # batch/1 -> batch
    (re.compile(rf"(?<![\w.])(?:floor|ceil|Floor|Ceil|int)?\(\s*({_ATOM})\s*\)"), r"\1"),  # floor(batch) -> batch
)
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+-]+/)+([\w.@+-]+)")


def simplify_dim(dim: Any) -> Any:
    """A symbolic dimension as simple as it gets: 'floor(1.0*batch)' -> 'batch', '(4)' -> 4; others as they are."""
    if not isinstance(dim, str):
        return dim
    text, before = dim.strip(), None
    while text != before:
        before = text
        for pattern, repl in _RULES:
            text = pattern.sub(repl, text)
    return int(text) if text.isdigit() else text


def simplify_shape(shape) -> list:
    return [simplify_dim(d) for d in shape]


def model_name(path: str | Path, module: Any = None) -> str:
    """The model's file stem; for generic stems (model.onnx, model.py) its folder's name; else the torch
    module's class name; never empty."""
    p = Path(re.sub(r"\.py:\w+$", ".py", str(path)))
    if p.stem.lower() not in GENERIC:
        return p.stem
    folder = p.parent.name or Path.cwd().name
    if folder not in GENERIC and folder not in (".", ".."):
        return folder
    if module is not None:
        return type(module).__name__
    return p.stem or "model"


def shipped_path(path: str | Path | None) -> str | None:
    """A path for a file that ships: relative paths as given, absolute ones as their file name only."""
    if path is None:
        return None
    text = str(path)
    return Path(text).name if Path(text).is_absolute() else text


def scrub_paths(text: str) -> str:
    """Absolute paths of this machine inside free text replaced by their last component. A path-like name whose
    first folder does not exist here (a torch.onnx node name: /encoder/layer.0/MatMul) is not a path."""
    return _ABS_PATH.sub(lambda m: m.group(1) if _is_root_folder(m.group(0).split("/")[1]) else m.group(0), text)


@functools.lru_cache(maxsize=256)
def _is_root_folder(name: str) -> bool:
    return Path("/" + name).is_dir()
