"""Calibration, evaluation and training data: .npz/.npy files (or a folder of them) checked against the model.

Every check names the file, the input and what was expected, so a user can fix the data without guessing.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.errors import DataError
from edgepack.types import TensorSpec

log = logging.getLogger(__name__)

KIND_NAMES = {"calib": "calibration data", "eval": "evaluation data", "train": "training data"}


BATCH_NAMES = ("batch", "batch_size", "n", "b", "bs", "n_batch", "num_samples")


def batch_axes(specs: list[TensorSpec], overrides: dict[str, int] | None = None) -> dict[str, int | None]:
    """Each input's sample (batch) axis: the user's override, else the axis that carries the model's batch
    symbol (a dim name shared by the inputs, like 'batch' or 'N'), else axis 0; None for rank-0 inputs."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {s.name for s in specs})
    if unknown:
        raise DataError(f"--batch-axis names no input {', '.join(unknown)}",
                        hint=f"the model's inputs are {', '.join(s.name for s in specs)}")
    symbol = batch_symbol(specs)
    out: dict[str, int | None] = {}
    for s in specs:
        if s.name in overrides:
            ax = overrides[s.name]
            if not -len(s.shape) <= ax < max(1, len(s.shape)) or not s.shape:
                raise DataError(f"--batch-axis {s.name}={ax}: input '{s.name}' has rank {len(s.shape)}")
            out[s.name] = ax % len(s.shape)
        elif not s.shape:
            out[s.name] = None
        elif symbol is not None and symbol in s.shape:
            out[s.name] = s.shape.index(symbol)
        else:
            out[s.name] = 0
    return out


def batch_symbol(specs: list[TensorSpec]) -> str | None:
    """The symbolic dim that counts samples: a conventional name, else the first symbol of the first input."""
    names = [d for s in specs for d in s.shape if isinstance(d, str)]
    for d in names:
        if d.lower() in BATCH_NAMES or "batch" in d.lower():
            return d
    first = specs[0].shape if specs else ()
    return first[0] if first and isinstance(first[0], str) else None


def output_axes(outputs: list[TensorSpec], inputs: list[TensorSpec], fixed: int | None = None) -> dict[str, int | None]:
    """Each output's sample axis: where the inputs' batch symbol sits (a time-major (T, N, C) output gets 1),
    else axis 0; None (one value per run, stacked) for rank-0 outputs and, in a model of fixed batch `fixed`,
    for outputs whose first dim is not that batch."""
    symbol = batch_symbol(inputs)
    out: dict[str, int | None] = {}
    for o in outputs:
        if not o.shape:
            out[o.name] = None
        elif symbol is not None and symbol in o.shape:
            out[o.name] = o.shape.index(symbol)
        elif fixed is not None and isinstance(o.shape[0], int) and o.shape[0] != fixed:
            out[o.name] = None
        else:
            out[o.name] = 0
    return out


def take_along(a: np.ndarray, axis: int | None, start: int, stop: int) -> np.ndarray:
    """Samples start..stop of an array along its batch axis (a constant input is returned as it is)."""
    if axis is None:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]  # input name -> array with the samples on its batch axis
    labels: np.ndarray | None  # int64 class ids, shape (N,)
    source: str  # path, for messages
    axes: dict[str, int | None] = field(default_factory=dict)  # batch axis per input; None: one value for all

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    def __len__(self) -> int:
        for k, v in self.inputs.items():
            ax = self.axis(k)
            if ax is not None:
                return int(v.shape[ax])
        return 1 if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of `batch_size` samples; the last one may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: take_along(v, self.axis(k), start, start + batch_size) for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        """The first `n` samples (all of them when there are fewer)."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: take_along(v, self.axis(k), 0, n) for k, v in self.inputs.items()}, labels, self.source,
                       dict(self.axes))


def load_dataset(path, specs: list[TensorSpec], *, kind: str, require_labels: bool = False,
                 num_classes: int | None = None, axes: dict[str, int | None] | None = None) -> Dataset:
    """Read `path` (.npz, .npy, or a folder of them: one file per sample or per batch) for a model with inputs
    `specs`; each input's samples lie on its batch axis (`axes`, default batch_axes(specs)); an array that
    is one sample (no batch axis) or one value for all samples (a rank-0 input, a fixed state) is accepted.
    DataError on any mismatch."""
    what = KIND_NAMES.get(kind, f"{kind} data")
    axes = batch_axes(specs) if axes is None else axes
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise DataError(f"{what} folder {path} has no .npz or .npy files")
    else:
        files = [path]
    parts = [_read_file(f, specs, what, num_classes, axes) for f in files]
    with_labels = [p[1] is not None for p in parts]
    if any(with_labels) and not all(with_labels):
        missing = next(f for f, has in zip(files, with_labels) if not has)
        raise DataError(f"{what} in {path}: {missing.name} has no labels 'y' but other files do; "
                        "give every file labels or none")
    inputs, used = {}, {}
    for s in specs:
        arrays = [p[0][s.name] for p in parts]
        ax = next((p[2][s.name] for p in parts if p[2][s.name] is not None), None)  # as read (may be inferred)
        if ax is not None:  # files that gave one value for all samples: repeat it once per sample of that file
            arrays = [a if p[2][s.name] is not None else np.expand_dims(a, ax).repeat(_count(p), ax)
                      for a, p in zip(arrays, parts)]
        inputs[s.name] = arrays[0] if len(arrays) == 1 or ax is None else np.concatenate(arrays, axis=ax)
        used[s.name] = ax
    labels = None
    if all(with_labels):
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    if require_labels and labels is None:
        raise DataError(f"{what} {path} has no labels: store class ids as key 'y' in the .npz "
                        "(np.savez(path, x=inputs, y=labels))")
    ds = Dataset(inputs, labels, str(path), used)
    log.info("%s: %d samples from %d file(s) in %s", what, len(ds), len(files), path)
    return ds


def _count(part) -> int:
    arrays, _, axes = part
    return next((int(arrays[k].shape[ax]) for k, ax in axes.items() if ax is not None), 1)


def _read_file(file: Path, specs: list[TensorSpec], what: str, num_classes, axes: dict[str, int | None]):
    """One file's inputs (cast to the model's dtypes), labels (or None), and each input's batch axis here
    (None when the file gives one value for all samples)."""
    from edgepack.safeio import check_regular, load_arrays

    if check_regular(file, what, DataError).st_size == 0:  # a FIFO must not be stat-ed as empty
        raise DataError(f"{what} {file} is empty")
    loaded = load_arrays(file, what, DataError)  # size caps, zip-bomb and header checks, no pickles
    if isinstance(loaded, np.ndarray):
        arrays = {specs[0].name: loaded} if len(specs) == 1 else None
        if arrays is None:
            raise DataError(f"{what} {file}: a .npy file holds one array but the model has {len(specs)} inputs "
                            f"({', '.join(s.name for s in specs)}); use an .npz with one key per input")
    else:
        arrays = dict(loaded)
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
    out, used = {}, {}
    for s in specs:
        out[s.name], used[s.name] = _check_input(arrays[s.name], s, file, what, axes.get(s.name, 0))
    counts = {k: int(out[k].shape[ax]) for k, ax in used.items() if ax is not None}
    n_max = max(counts.values(), default=1)
    for k, c in list(counts.items()):  # one value (a start state) for many samples: the same for each
        if c == 1 and n_max > 1:
            out[k], counts[k] = np.repeat(out[k], n_max, axis=used[k]), n_max
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} {file}: inputs have different numbers of samples: {counts}")
    n = next(iter(counts.values()), 1)
    if labels is not None:
        labels = _check_labels(labels, n, num_classes, f"{what} {file}")
    return out, labels, used


def _check_input(a: np.ndarray, spec: TensorSpec, file: Path, what: str, axis: int | None):
    """The array cast to the model's dtype, and its batch axis: `axis`, or None when it holds one value for
    every sample (rank-0 inputs; an array shaped exactly like a fixed-shape input). One sample without its
    batch axis gets the axis added."""
    where = f"{what} {file}: input '{spec.name}'"
    rank = len(spec.shape)
    want = "[" + ", ".join("N" if i == axis else str(d) if d is not None else "?" for i, d in enumerate(spec.shape)) + "]"
    if axis is not None and a.ndim == rank:  # all dims fixed (a state [4, 1, 64]): the one dim of 1 that differs
        off = [i for i, (n, d) in enumerate(zip(a.shape, spec.shape)) if isinstance(d, int) and d > 0 and n != d]
        if len(off) == 1 and off[0] != axis and spec.shape[off[0]] == 1 and \
                isinstance(spec.shape[axis], int) and spec.shape[axis] == a.shape[axis]:
            axis = off[0]
    rest = [d for i, d in enumerate(spec.shape) if i != axis]
    one_sample = axis is not None and a.ndim == rank - 1 and all(
        not isinstance(d, int) or d <= 0 or d == n for d, n in zip(rest, a.shape))
    if one_sample:  # one sample, without its batch axis
        a = np.expand_dims(a, axis)
    if a.ndim != rank:
        raise DataError(f"{where} has shape {list(a.shape)}, expected rank {rank} {want}"
                        + (f" (axis {axis} = samples; set another with --batch-axis {spec.name}=AXIS)"
                           if axis is not None else ""))
    if axis is not None and a.shape[axis] == 0:
        raise DataError(f"{where} is empty (0 samples)")
    for i, (got, dim) in enumerate(zip(a.shape, spec.shape)):
        if i != axis and isinstance(dim, int) and dim > 0 and got != dim:
            raise DataError(f"{where} has shape {list(a.shape)}, expected {want}: axis {i} is {got}, not {dim}")
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
            sample = int(np.argwhere(bad)[0][axis or 0]) if a.ndim else 0
            raise DataError(f"{where} has {int(bad.sum())} NaN/Inf values (first in sample {sample})")
    return a, axis


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


def synthetic_inputs(specs: list[TensorSpec], n: int, seed: int,
                     axes: dict[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """`n` random samples per input on its batch axis, for models without data: floats ~ N(0, 1), integers in
    [0, 10); a rank-0 input gets one value. Every other dim must be a number (else pass --input-shape)."""
    rng = np.random.default_rng(seed)
    axes = batch_axes(specs) if axes is None else axes
    out = {}
    for s in specs:
        ax = axes.get(s.name, 0)
        rest = [d for i, d in enumerate(s.shape) if i != ax]
        if any(not isinstance(d, int) or d < 0 for d in rest):
            raise DataError(f"input '{s.name}' has shape {list(s.shape)} with unknown dims beyond the batch; "
                            f"pass --input-shape {s.name}=1,3,224,224 (its full shape) or give calibration/eval data")
        shape = [int(d) for d in rest]
        if ax is not None:
            shape.insert(ax, n)
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


def dataset_from_arrays(inputs: dict[str, np.ndarray], labels: np.ndarray | None = None, source: str = "",
                        axes: dict[str, int | None] | None = None) -> Dataset:
    """A Dataset from arrays already in memory (all with the same number of samples on their batch axes)."""
    if not inputs:
        raise DataError(f"no inputs given{' in ' + source if source else ''}")
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    axes = {k: (axes or {}).get(k, 0 if v.ndim else None) for k, v in arrays.items()}
    counts = {k: int(v.shape[axes[k]]) for k, v in arrays.items() if axes[k] is not None}
    if len(set(counts.values())) > 1:
        raise DataError(f"{source or 'data'}: inputs have different numbers of samples: {counts}")
    if labels is not None:
        labels = _check_labels(np.asarray(labels), next(iter(counts.values()), 1), None, source or "data")
    return Dataset(arrays, labels, source, axes)
