"""The files a job reads: their hashes, the job digest (what resume compares), and copying them to a worker."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InputFile:
    root: str  # the folder it is shipped relative to
    rel: str
    sha256: str
    size: int

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.rel)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def input_files(files: dict[str, str]) -> list[InputFile]:
    """Every file behind the job's paths: folders in full, ONNX external data, sibling .py/.toml files."""
    seen: dict[str, InputFile] = {}
    for role, p in files.items():
        path = Path(p)
        if path.is_dir():
            root, members = path, sorted(q for q in path.rglob("*") if q.is_file())
        else:
            root, members = path.parent, [path]
            if role == "model" and path.suffix == ".onnx":
                members += [root / loc for loc in _external_data(path)]
            elif role == "model" and path.suffix == ".py":
                members += sorted(root.glob("*.py"))
            elif role == "target":
                members += sorted(root.glob("*.toml"))  # a profile may extend a sibling
        for q in members:
            if q.is_file() and str(q) not in seen:
                seen[str(q)] = InputFile(str(root), os.path.relpath(q, root), sha256_file(q), q.stat().st_size)
    return list(seen.values())


def _external_data(model: Path) -> list[str]:
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        proto = onnx.load(str(model), load_external_data=False)
        return sorted({e.value for t in _get_all_tensors(proto) if uses_external_data(t)
                       for e in t.external_data if e.key == "location"})
    except Exception:  # not parseable here: pack will say why; hash the file alone
        return []


def root_ids(inputs: list[InputFile]) -> dict[str, str]:
    """Each root folder named by its contents, so a digest does not change when a project moves."""
    by_root: dict[str, list] = {}
    for f in inputs:
        by_root.setdefault(f.root, []).append((f.rel, f.sha256))
    return {r: hashlib.sha256(json.dumps(sorted(v)).encode()).hexdigest()[:16] for r, v in by_root.items()}


def remap(value: str, mapping: dict[str, str]) -> str:
    """Replace a leading root folder (longest first) in a path-like argument."""
    for old in sorted(mapping, key=len, reverse=True):
        if value == old or value.startswith(old + os.sep):
            return mapping[old] + value[len(old):]
    return value


def job_digest(model_ref: str, args: list[str], inputs: list[InputFile], profile: dict, version: str) -> str:
    """sha256 of everything that decides the bundle: files, flags, resolved target profile, edgepack version."""
    ids = {r: f"<{i}>" for r, i in root_ids(inputs).items()}
    doc = {
        "edgepack": version,
        "target": profile,
        "model": remap(model_ref, ids),
        "args": [remap(a, ids) for a in args],
        "files": sorted((ids[f.root], f.rel, f.sha256) for f in inputs),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def localize(inputs: list[InputFile], fetch: Callable[[InputFile], bytes], dest: Path) -> dict[str, str]:
    """On a worker: keep roots whose files are here unchanged, copy the others under `dest`; old -> new root."""
    ids = root_ids(inputs)
    moved: dict[str, str] = {}
    for root, rid in ids.items():
        files = [f for f in inputs if f.root == root]
        if all(_same(f) for f in files):
            continue
        new = dest / rid
        for f in files:
            target = new / f.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fetch(f))
        moved[root] = str(new)
    return moved


def _same(f: InputFile) -> bool:
    try:
        return os.path.getsize(f.path) == f.size and sha256_file(f.path) == f.sha256
    except OSError:
        return False
