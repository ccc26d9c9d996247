"""How closely a candidate's outputs follow the fp32 reference: top-1 agreement, cosine, max abs diff,
and accuracy when labels exist."""
from __future__ import annotations

import logging

import numpy as np

from edgepack.errors import DataError
from edgepack.types import Fidelity

log = logging.getLogger(__name__)


def _pad(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """Pad every input to `size` samples by repeating the last one; returns (padded, real count)."""
    n = len(next(iter(batch.values())))
    if n >= size:
        return batch, n
    return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, n


def run_dataset(session, dataset, batch_size: int) -> list[np.ndarray]:
    """Run the whole dataset through the session; returns each output concatenated over all samples.

    When the model's batch dim is fixed (static shapes), that batch size is used instead of `batch_size`
    and the last batch is padded (repeating its last sample) and its outputs trimmed.
    """
    fixed = getattr(session, "fixed_batch", None)
    size = fixed or max(1, int(batch_size))
    if fixed and batch_size != fixed:
        log.debug("model batch is fixed to %d: running in batches of %d", fixed, fixed)
    parts: list[list[np.ndarray]] = []
    for batch in dataset.batches(size):
        feeds, n = _pad(batch, size) if fixed else (batch, None)
        outs = session.run(feeds)
        if n is not None:
            outs = [o[:n] if o.ndim and o.shape[0] == size else o for o in outs]
        parts.append(outs)
    if not parts:
        raise DataError(f"dataset {getattr(dataset, 'source', '')} has no samples", hint="give a non-empty data set")
    return [np.concatenate([np.atleast_1d(p[i]) for p in parts]) for i in range(len(parts[0]))]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def compare(reference: list[np.ndarray], outputs: list[np.ndarray], labels=None) -> Fidelity:
    """Compare candidate outputs with the reference (same order and shapes).

    top1_agreement: on the first output when it is (N, classes) scores, else None. cosine: over all
    outputs flattened into one vector. accuracy: argmax of the first output vs `labels` when given.
    Non-finite candidate values (e.g. fp16 overflow) give cosine 0 and max_abs_diff inf.
    """
    if len(reference) != len(outputs):
        raise DataError(f"the candidate has {len(outputs)} outputs but the reference has {len(reference)}",
                        hint="compare models with the same outputs")
    for i, (r, o) in enumerate(zip(reference, outputs)):
        if np.shape(r) != np.shape(o):
            raise DataError(f"output {i} has shape {np.shape(o)} but the reference has {np.shape(r)}",
                            hint="compare models with the same outputs")
    ref = [np.asarray(r, dtype=np.float64).ravel() for r in reference]
    out = [np.asarray(o, dtype=np.float64).ravel() for o in outputs]
    a, b = np.concatenate(ref) if ref else np.zeros(0), np.concatenate(out) if out else np.zeros(0)
    first = np.asarray(reference[0]) if reference else np.zeros(0)
    n = int(first.shape[0]) if first.ndim else 1
    if not np.all(np.isfinite(b)):
        log.warning("candidate outputs contain NaN/Inf")
        cosine, max_abs = 0.0, float("inf")
    else:
        cosine = _cosine(a, b)
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scores = first.ndim == 2 and np.shape(first)[1] > 1
    top1 = acc = None
    if scores:
        pred = np.argmax(np.asarray(outputs[0]), axis=1)
        top1 = float(np.mean(np.argmax(first, axis=1) == pred))
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if not scores:
            raise DataError(f"labels were given but the first output has shape {first.shape}, not (N, classes)",
                            hint="use labels only with a classifier, or drop them to compare outputs only")
        if len(labels) != n:
            raise DataError(f"{len(labels)} labels for {n} samples", hint="give one label per sample")
        acc = float(np.mean(pred == labels))
    return Fidelity(n=n, top1_agreement=top1, cosine=cosine, max_abs_diff=max_abs, accuracy=acc)
