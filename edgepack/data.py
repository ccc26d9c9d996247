"""Calibration, evaluation and training data: .npz/.npy files (or a folder of them) checked against the model.

Every check names the file, the input and what was expected, so a user can fix the data without guessing.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import DataError
from edgepack.types import TensorSpec

log = logging.getLogger(__name__)

KIND_NAMES = {"calib": "calibration data", "eval": "evaluation data", "train": "training data"}


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]  # input name -> array, axis 0 = samples
    labels: np.ndarray | None  # int64 class ids, shape (N,)
    source: str  # path, for messages

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of `batch_size` samples; the last one may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        """The first `n` samples (all of them when there are fewer)."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)


def load_dataset(path, specs: list[TensorSpec], *, kind: str, require_labels: bool = False,
                 num_classes: int | None = None) -> Dataset:
    """Read `path` (.npz, .npy or a folder of them) for a model with inputs `specs`; DataError on any mismatch."""
    what = KIND_NAMES.get(kind, f"{kind} data")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise DataError(f"{what} folder {path} has no .npz or .npy files")
    else:
        files = [path]
    parts = [_read_file(f, specs, what, num_classes) for f in files]
    with_labels = [p[1] is not None for p in parts]
    if any(with_labels) and not all(with_labels):
        missing = next(f for f, has in zip(files, with_labels) if not has)
        raise DataError(f"{what} in {path}: {missing.name} has no labels 'y' but other files do; "
                        "give every file labels or none")
    inputs = {s.name: np.concatenate([p[0][s.name] for p in parts]) if len(parts) > 1 else parts[0][0][s.name]
              for s in specs}
    labels = None
    if all(with_labels):
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    if require_labels and labels is None:
        raise DataError(f"{what} {path} has no labels: store class ids as key 'y' in the .npz "
                        "(np.savez(path, x=inputs, y=labels))")
    ds = Dataset(inputs, labels, str(path))
    log.info("%s: %d samples from %d file(s) in %s", what, len(ds), len(files), path)
    return ds


def _read_file(file: Path, specs: list[TensorSpec], what: str, num_classes):
    """One file's inputs (cast to the model's dtypes) and labels (or None)."""
    if file.stat().st_size == 0:
        raise DataError(f"{what} {file} is empty")
    try:
        loaded = np.load(file, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{what} {file} holds Python objects (an object array); "
                        "save plain numeric arrays with np.savez") from e
    except Exception as e:
        raise DataError(f"{what} {file} is not a readable .npy/.npz file: {e}") from e
    if isinstance(loaded, np.ndarray):
        arrays = {specs[0].name: loaded} if len(specs) == 1 else None
        if arrays is None:
            raise DataError(f"{what} {file}: a .npy file holds one array but the model has {len(specs)} inputs "
                            f"({', '.join(s.name for s in specs)}); use an .npz with one key per input")
    else:
        with loaded:
            try:
                arrays = {k: loaded[k] for k in loaded.files}
            except ValueError as e:
                raise DataError(f"{what} {file} holds Python objects (an object array); "
                                "save plain numeric arrays with np.savez") from e
        if not arrays:
            raise DataError(f"{what} {file} is empty (no arrays in the .npz)")
    labels = arrays.pop("y", None)
    names = [s.name for s in specs]
    if len(specs) == 1 and "x" in arrays and names[0] not in arrays:
        arrays[names[0]] = arrays.pop("x")
    unknown = sorted(set(arrays) - set(names))
    missing = [n for n in names if n not in arrays]
    expected = ", ".join(names) + (" (or 'x')" if len(names) == 1 else "")
    if unknown:
        raise DataError(f"{what} {file}: unknown key(s) {', '.join(unknown)}; the model's inputs are {expected}, "
                        "labels go in 'y'")
    if missing:
        raise DataError(f"{what} {file}: input '{missing[0]}' is missing; the model's inputs are {expected}")
    out = {s.name: _check_input(arrays[s.name], s, file, what) for s in specs}
    counts = {k: len(v) for k, v in out.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} {file}: inputs have different numbers of samples: {counts}")
    n = next(iter(counts.values()))
    if labels is not None:
        labels = _check_labels(labels, n, num_classes, f"{what} {file}")
    return out, labels


def _check_input(a: np.ndarray, spec: TensorSpec, file: Path, what: str) -> np.ndarray:
    where = f"{what} {file}: input '{spec.name}'"
    want = "[" + ", ".join("N" if i == 0 else str(d) if d is not None else "?" for i, d in enumerate(spec.shape)) + "]"
    if a.ndim != len(spec.shape):
        raise DataError(f"{where} has shape {list(a.shape)}, expected rank {len(spec.shape)} {want} "
                        "(axis 0 = samples)")
    if a.shape[0] == 0:
        raise DataError(f"{where} is empty (0 samples)")
    for axis, (got, dim) in enumerate(zip(a.shape, spec.shape)):
        if axis > 0 and isinstance(dim, int) and dim > 0 and got != dim:
            raise DataError(f"{where} has shape {list(a.shape)}, expected {want}: axis {axis} is {got}, not {dim}")
    target = _np_dtype(spec.dtype)
    if target is not None and a.dtype != target:
        if a.dtype.kind not in "biuf" or not np.can_cast(a.dtype, target, casting="same_kind"):
            raise DataError(f"{where} is {a.dtype}, the model takes {target}; that cast would lose values "
                            f"(save the data as {target})")
        if target.kind in "iu" and a.size:
            info = np.iinfo(target)
            if a.min() < info.min or a.max() > info.max:
                raise DataError(f"{where} has values outside the range of {target}")
        a = a.astype(target)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            sample = int(np.argwhere(bad)[0][0])
            raise DataError(f"{where} has {int(bad.sum())} NaN/Inf values (first in sample {sample})")
    return a


def _check_labels(y: np.ndarray, n: int, num_classes: int | None, where: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels 'y' must be integer class ids, got {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{where}: labels 'y' must have shape (N,), got {list(y.shape)}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} samples")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise DataError(f"{where}: label {int(y.max())} is out of range: the model has {num_classes} classes "
                        f"(labels 0..{num_classes - 1})")
    return y.astype(np.int64)


def _np_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        return None


def synthetic_inputs(specs: list[TensorSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` random samples per input, for models without data: floats ~ N(0, 1), integers in [0, 10).

    Axis 0 is the sample axis; every other dim must be a number (else pass --input-shape).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        rest = s.shape[1:]
        if any(not isinstance(d, int) or d < 0 for d in rest):
            raise DataError(f"input '{s.name}' has shape {list(s.shape)} with unknown dims beyond the batch; "
                            "pass --input-shape (e.g. 1,3,224,224) or give calibration/eval data")
        shape = (n, *(int(d) for d in rest)) if s.shape else (n,)  # type: ignore[call-overload]
        dtype = _np_dtype(s.dtype) or np.dtype("float32")
        if dtype.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[s.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DataError(f"input '{s.name}' is {dtype}; edgepack cannot make random data of that type")
    return out


def dataset_from_arrays(inputs: dict[str, np.ndarray], labels: np.ndarray | None = None, source: str = "") -> Dataset:
    """A Dataset from arrays already in memory (all with the same number of samples)."""
    if not inputs:
        raise DataError(f"no inputs given{' in ' + source if source else ''}")
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{source or 'data'}: inputs have different numbers of samples: {counts}")
    if labels is not None:
        labels = _check_labels(np.asarray(labels), next(iter(counts.values())), None, source or "data")
    return Dataset(arrays, labels, source)
