"""How closely a candidate's outputs follow the reference, judged per output by what the output is.

Each output gets a metric fitted to its kind, picked from its shape, name and the model's metadata (or set by
the user with `--metric NAME=KIND`):

- ``classes``: (N, C) class scores: top-1 agreement (and top-5 where C > 5);
- ``detection``: class/objectness scores of a detector: F1 of the anchors above the reference's threshold,
  and box IoU on those anchors when a box output exists, so pixel coordinates never drown the scores;
- ``sequence``: CTC / per-step logits (N, T, C) or time-major (T, N, C): identity of the greedy-decoded sequences;
- ``embedding``: vectors: cosine per sample (mean and minimum) and nearest-neighbour agreement;
- ``regression``: anything else (scores, probabilities, audio): SQNR in dB about the output's mean, and max abs
  diff relative to range; for a few scores per sample (a MOS), the worst error too must sit that many dB below
  the scores' spread;
- ``ignore``: not judged (a recurrent state output, say).

With labels, accuracy on the first classes output is the budget (as before); the per-output metrics are
reported beside it.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from edgepack.errors import DataError
from edgepack.types import Fidelity

log = logging.getLogger(__name__)

SCORE_VALUES = 4  # a regression output with at most this many values per sample is a set of scores (MOS, ratings)
KINDS = ("classes", "detection", "boxes", "sequence", "embedding", "regression", "ignore")
_EMBED = re.compile(r"embed|feature|hidden|pool|sentence|vector|descriptor|encod", re.I)
_BOX = re.compile(r"box|bbox|loc|coord|reg", re.I)
_SCORE = re.compile(r"score|conf|cls|class|obj|prob|logit|heat", re.I)
_SEQ = re.compile(r"ctc|seq|char|text|token|step", re.I)
_STATE = re.compile(r"state|^h[nt0-9]?$|^c[nt0-9]?$|_h$|_c$|hidden_out", re.I)


def _pad(batch: dict[str, np.ndarray], size: int, axes: dict[str, int | None]) -> tuple[dict[str, np.ndarray], int]:
    """Pad every input to `size` samples by repeating the last one; returns (padded, real count)."""
    n = next((v.shape[axes.get(k, 0)] for k, v in batch.items() if axes.get(k, 0) is not None), size)
    if n >= size:
        return batch, n
    out = {}
    for k, v in batch.items():
        ax = axes.get(k, 0)
        if ax is None:
            out[k] = v
            continue
        last = np.take(v, [-1], axis=ax)
        out[k] = np.concatenate([v, np.repeat(last, size - n, axis=ax)], axis=ax)
    return out, n


def run_dataset(session, dataset, batch_size: int, out_axes: dict[int, int | None] | None = None) -> list[np.ndarray]:
    """Run the whole dataset through the session; each output concatenated over all samples on its batch axis.

    When the model's batch is fixed (static shapes), that batch size is used instead of `batch_size` and the last
    batch is padded (repeating its last sample) and its outputs trimmed. `out_axes` maps output index to its
    batch axis (default 0; None: one value per batch, stacked).
    """
    axes = getattr(dataset, "axes", {}) or {}
    fixed = fixed_batch(session.inputs, axes)
    size = fixed or max(1, int(batch_size))
    out_axes = out_axes or {}
    parts: list[list[np.ndarray]] = []
    for batch in dataset.batches(size):
        feeds, n = _pad(batch, size, axes) if fixed else (batch, None)
        outs = session.run(feeds)
        if n is not None and n < size:
            outs = [o if out_axes.get(i, 0) is None or o.ndim == 0 else
                    np.take(o, range(n), axis=out_axes.get(i, 0)) for i, o in enumerate(outs)]
        parts.append(outs)
    if not parts:
        raise DataError(f"dataset {getattr(dataset, 'source', '')} has no samples", hint="give a non-empty data set")
    result = []
    for i in range(len(parts[0])):
        ax = out_axes.get(i, 0)
        if ax is None or parts[0][i].ndim == 0:
            result.append(np.stack([p[i] for p in parts]))
        else:
            result.append(np.concatenate([p[i] for p in parts], axis=ax) if len(parts) > 1 else parts[0][i])
    return result


def fixed_batch(specs, axes: dict[str, int | None]) -> int | None:
    """The batch size a model is fixed to (its inputs' batch dims), or None when it is dynamic."""
    dims = set()
    for s in specs:
        ax = axes.get(s.name, 0)
        if ax is not None and len(s.shape) > ax and isinstance(s.shape[ax], int) and s.shape[ax] > 0:
            dims.add(s.shape[ax])  # one input with a fixed batch fixes the model's (a state [4, 1, 64])
    return dims.pop() if len(dims) == 1 else None


# ---------------------------------------------------------------- kinds

def guess_kinds(names: list[str], ref: list[np.ndarray], axes: list[int | None],
                metadata: dict[str, str] | None = None, overrides: dict[str, str] | None = None,
                roles: dict[str, str] | None = None) -> list[str]:
    """The metric kind of every output, from its name, shape, values and what computed it (``roles``, from
    ``model.onnx.output_roles``), and the user's overrides."""
    overrides = {k: split_gate(v)[0] for k, v in (overrides or {}).items()}  # (gates_of reads the gates)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise DataError(f"--metric names no output {', '.join(unknown)}", hint=f"the model's outputs: {', '.join(names)}")
    bad = sorted({v for v in overrides.values() if v not in KINDS})
    if bad:
        raise DataError(f"--metric kind {', '.join(bad)} is unknown", hint=f"kinds: {', '.join(KINDS)}")
    text = " ".join(f"{k} {v}" for k, v in (metadata or {}).items()).lower()
    samples = [_by_sample(r, ax) for r, ax in zip(ref, axes)]
    boxes = _box_outputs(names, samples)
    heads = {} if boxes else _dense_heads(names, samples)
    kinds = []
    for i, (name, s) in enumerate(zip(names, samples)):
        kinds.append(overrides.get(name) or ("boxes" if i in boxes else heads.get(i)
                                             or _guess(name, s, bool(boxes), text, (roles or {}).get(name))))
    return kinds


GATE = 0.5  # the default threshold of a gate output (--metric pitch=regression@confidence)


def split_gate(value: str) -> tuple[str, tuple[str, float] | None]:
    """"regression@confidence>=0.7" -> ("regression", ("confidence", 0.7)); no "@": no gate."""
    kind, at, gate = value.partition("@")
    if not at:
        return kind, None
    name, _, thr = gate.partition(">=")
    hint = "OUTPUT=regression@GATE_OUTPUT or OUTPUT=regression@GATE_OUTPUT>=0.5"
    if not name.strip():
        raise DataError(f"--metric {value}: no gate output after '@'", hint=hint)
    try:
        return kind, (name.strip(), float(thr) if thr else GATE)
    except ValueError:
        raise DataError(f"--metric gate '{gate}' has no number after '>='", hint=hint) from None


def gates_of(names: list[str], overrides: dict[str, str]) -> dict[int, tuple[int, float]]:
    """{output index: (gate output index, threshold)}: an output judged only where the reference's gate output is
    at least the threshold (a pitch is meaningful only on voiced frames: where the voicing confidence says so)."""
    out = {}
    for name, value in overrides.items():
        kind, gate = split_gate(value)
        if gate is None or name not in names or kind not in KINDS:  # (guess_kinds names the unknown ones)
            continue
        if kind != "regression":
            raise DataError(f"--metric {name}={value}: only a regression output can be gated",
                            hint=f"{name}=regression@{gate[0]}")
        if gate[0] not in names or gate[0] == name:
            raise DataError(f"--metric {name}={value}: the gate '{gate[0]}' is not another output of the model",
                            hint=f"the model's outputs: {', '.join(names)}; a mark is written @GATE>=0.5")
        out[names.index(name)] = (names.index(gate[0]), gate[1])
    return out


def check_gates(names: list[str], ref: list[np.ndarray], axes: list[int | None],
                gates: dict[int, tuple[int, float]]) -> None:
    """DataError for a gate that keeps no value of the reference (a mark of 70 on a 0-1 confidence): it would
    judge nothing, and pass every candidate."""
    for i, (g, mark) in gates.items():
        values = np.asarray(_by_sample(np.asarray(ref[g]), axes[g]), dtype=np.float64)
        if not np.any(values >= mark):
            top = np.nanmax(values) if np.isfinite(values).any() else float("nan")
            raise DataError(f"--metric {names[i]}: the original's {names[g]} reaches {mark:g} nowhere on the "
                            f"evaluation data (at most {top:.4g}): the gate would judge nothing",
                            hint=f"lower the mark: {names[i]}=regression@{names[g]}>=T")


def _dense_heads(names: list[str], samples: list[np.ndarray]) -> dict[int, str]:
    """A dense detector's heads: two or more float (anchors, channels) outputs over the same anchors (PicoDet,
    YOLO-style per-stride heads). The head with the fewest channels holds the class scores ("detection"); the
    others (box offsets or their distributions) are judged as regression. A sequence model has one such output."""
    groups: dict[int, list[int]] = {}
    for i, (name, s) in enumerate(zip(names, samples)):
        if s.dtype.kind == "f" and s.ndim == 3 and s.shape[1] > 1 and not _STATE.search(name):
            groups.setdefault(s.shape[1], []).append(i)
    out = {}
    for members in groups.values():
        if len(members) >= 2 and len({samples[i].shape[-1] for i in members}) > 1:
            fewest = min(samples[i].shape[-1] for i in members)
            out.update({i: "detection" if samples[i].shape[-1] == fewest else "regression" for i in members})
    return out


def _box_outputs(names: list[str], samples: list[np.ndarray]) -> set[int]:
    """Outputs that are boxes of a detector: (anchors, 4) per sample, beside a score output with as many anchors."""
    found = set()
    for i, (name, s) in enumerate(zip(names, samples)):
        if s.ndim < 2 or s.shape[-1] != 4 or s.dtype.kind != "f" or _STATE.search(name) or _SCORE.search(name):
            continue
        anchors = int(np.prod(s.shape[1:-1]))
        for j, t in enumerate(samples):
            if j != i and t.ndim >= 2 and anchors in (int(np.prod(t.shape[1:-1])) if t.ndim > 2 else 1,
                                                      int(np.prod(t.shape[2:])) if t.ndim > 2 else t.shape[1]) \
                    and not (t.shape[-1] == 4 and t.ndim > 2):
                found.add(i)
    return found


def _by_sample(a: np.ndarray, axis: int | None) -> np.ndarray:
    """The array with its batch axis first (a rank-0 array becomes one sample)."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a.reshape(1)
    return np.moveaxis(a, axis, 0) if axis not in (None, 0) else a


def _guess(name: str, s: np.ndarray, has_boxes: bool, meta: str, role: str | None = None) -> str:
    if s.dtype.kind not in "f":
        return "regression" if s.dtype.kind in "iu" else "ignore"
    if _STATE.search(name):
        return "regression"
    if has_boxes and s.ndim >= 2 and s[0].size > 1:
        return "detection"
    if s.ndim == 3 and s.shape[-1] > 1 and s.shape[1] > 1:
        if _EMBED.search(name) or s.shape[-1] >= 128 and not _SEQ.search(name):
            return "embedding"
        return "sequence"
    if s.ndim == 2 and s.shape[1] > 1 and role is not None:
        by_role = _by_role(name, s.shape[1], role)
        if by_role:
            return by_role
    if s.ndim == 2 and s.shape[1] > 1:
        norms = np.linalg.norm(s.astype(np.float64), axis=1)
        unit = norms.size and np.allclose(norms, 1.0, atol=1e-3)
        if _EMBED.search(name) or unit or ("embedding" in meta and not _SCORE.search(name)):
            return "embedding"
        return "classes"
    return "regression"


def _by_role(name: str, width: int, role: str) -> str | None:
    """The kind of an (N, C) output from what computed it; None where the role does not decide."""
    if role == "softmax":
        return "classes"
    if role == "scaled-sigmoid":
        return "regression"  # a bounded score (a MOS in 1..5): its argmax means nothing
    if role == "linear":  # logits, or a handful of unnormalized scores (MOS, ratings, offsets)
        return "regression" if width <= 4 and not _SCORE.search(name) else None
    if role in ("pooled", "LayerNormalization"):  # a mean over positions, a normalized vector
        return "embedding" if width >= 16 else "regression"
    if role in ("sigmoid", "input"):
        return None
    return "regression"  # computed values (Exp, Where, ...): per-frame pitch, a gate


# ---------------------------------------------------------------- metrics

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _row_cos(r: np.ndarray, o: np.ndarray) -> np.ndarray:
    r, o = r.reshape(len(r), -1), o.reshape(len(o), -1)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    dot = np.sum(r * o, axis=1)
    both0 = (nr == 0) & (no == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(both0, 1.0, dot / np.maximum(nr * no, 1e-30))
    return np.clip(c, -1.0, 1.0)


def sqnr_db(r: np.ndarray, o: np.ndarray) -> float:
    noise = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0.0:
        return 120.0
    return float(min(120.0, 10.0 * np.log10(max(signal, 1e-30) / noise)))


def classes_metric(r: np.ndarray, o: np.ndarray) -> dict[str, Any]:
    top1 = float(np.mean(np.argmax(r, 1) == np.argmax(o, 1)))
    out = {"metric": "top-1 agreement", "value": top1, "top1_agreement": top1}
    if r.shape[1] > 5:
        k5 = np.argsort(-o, axis=1)[:, :5]
        out["top5_agreement"] = float(np.mean([a in row for a, row in zip(np.argmax(r, 1), k5)]))
    return out


def detection_metric(r: np.ndarray, o: np.ndarray, r_boxes=None, o_boxes=None) -> dict[str, Any]:
    """Agreement of the detected anchors: scores above half the reference's best score of each sample."""
    n = len(r)
    rs, os_ = r.reshape(n, -1, *(r.shape[-1:] if r.ndim > 2 else ())), o.reshape(n, -1, *(o.shape[-1:] if o.ndim > 2 else ()))
    tp = fp = fn = 0
    ious: list[float] = []
    max_ratio = []
    for i in range(n):
        ri, oi = rs[i], os_[i]
        thr = 0.5 * float(np.max(ri)) if np.max(ri) > 0 else float(np.max(ri)) + 1e-6
        rd, od = ri >= thr, oi >= thr
        tp += int(np.sum(rd & od))
        fp += int(np.sum(~rd & od))
        fn += int(np.sum(rd & ~od))
        if np.max(ri) > 0:
            max_ratio.append(float(np.max(oi) / np.max(ri)))
        if r_boxes is not None and o_boxes is not None:
            anchors = rd.reshape(rd.shape[0], -1).any(axis=1) if rd.ndim > 1 else rd
            rb, ob = np.asarray(r_boxes[i]).reshape(-1, 4), np.asarray(o_boxes[i]).reshape(-1, 4)
            if len(rb) == len(anchors):
                ious += list(_iou(rb[anchors], ob[anchors]))
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / max(1, 2 * tp + fp + fn)
    out = {"metric": "detection F1", "value": float(f1), "detected": tp + fn,
           "max_score_ratio": float(np.median(max_ratio)) if max_ratio else None}
    if ious:
        out["box_iou"] = float(np.mean(ious))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given as (x1, y1, x2, y2) or (cx, cy, w, h): corners are ordered first, either way."""
    def corners(x):
        x1, x2 = np.minimum(x[:, 0], x[:, 2]), np.maximum(x[:, 0], x[:, 2])
        y1, y2 = np.minimum(x[:, 1], x[:, 3]), np.maximum(x[:, 1], x[:, 3])
        return x1, y1, x2, y2
    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)


def decode(seq: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC-style decoding of (N, T, C) scores: argmax per step, repeats collapsed."""
    out = []
    for path in np.argmax(seq, axis=-1):
        collapsed = [int(c) for j, c in enumerate(path) if j == 0 or c != path[j - 1]]
        out.append(tuple(collapsed))
    return out


def sequence_metric(r: np.ndarray, o: np.ndarray) -> dict[str, Any]:
    same = float(np.mean([a == b for a, b in zip(decode(r), decode(o))]))
    steps = float(np.mean(np.argmax(r, -1) == np.argmax(o, -1)))
    return {"metric": "decoded-sequence identity", "value": same, "step_agreement": steps}


def embedding_metric(r: np.ndarray, o: np.ndarray) -> dict[str, Any]:
    cos = _row_cos(r.astype(np.float64), o.astype(np.float64))
    out = {"metric": "cosine per sample", "value": float(np.mean(cos)), "min_cosine": float(np.min(cos))}
    if len(r) >= 3:
        ref_sim, cand_sim = _similarity(r), _similarity(o)
        rows = np.arange(len(r))
        nearest, chosen = np.argmax(ref_sim, axis=1), np.argmax(cand_sim, axis=1)
        # the candidate's nearest neighbour counts as the same when it is as near in the reference (near-ties)
        out["nn_agreement"] = float(np.mean(ref_sim[rows, chosen] >= ref_sim[rows, nearest] - 0.01))
    return out


def _similarity(x: np.ndarray) -> np.ndarray:
    v = x.reshape(len(x), -1).astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    return sim


def regression_metric(r: np.ndarray, o: np.ndarray) -> dict[str, Any]:
    """SQNR about the output's mean (an offset carries no information: a MOS of 3 +- 0.3 off by 0.2 is a poor
    fit, though 3 / 0.2 alone would read as 24 dB), and max abs diff relative to the output's range."""
    span = float(np.ptp(r)) if r.size else 0.0
    diff = float(np.max(np.abs(r - o))) if r.size else 0.0
    mean = float(np.mean(r)) if r.size else 0.0
    spread = float(np.std(r)) if r.size else 0.0
    worst = 120.0 if diff == 0 else float(np.clip(20 * np.log10(max(spread, 1e-30) / diff), -120, 120))
    return {"metric": "SQNR dB", "value": sqnr_db(r - mean, o - mean), "max_abs_diff": diff, "worst_db": worst,
            "max_rel_diff": diff / span if span > 0 else (0.0 if diff == 0 else float("inf"))}


def gate_mask(r: np.ndarray, gate: np.ndarray, gate_name: str, threshold: float) -> np.ndarray:
    """Where the reference's gate output (same shape as the output it gates) is at least ``threshold``."""
    if gate.shape != r.shape:
        raise DataError(f"the gate output {gate_name} has shape {gate.shape[1:]} per sample but the output it gates "
                        f"has {r.shape[1:]}", hint="gate an output with another of the same shape")
    return gate >= threshold


def gated_metric(r: np.ndarray, o: np.ndarray, keep: np.ndarray, gate_name: str, threshold: float) -> dict[str, Any]:
    """regression_metric on the values ``keep`` marks (none kept: 0 dB, a failure, never a silent pass)."""
    row = regression_metric(r[keep], o[keep]) if keep.any() else {"value": 0.0, "worst_db": 0.0}
    return row | {"metric": f"SQNR dB where {gate_name} >= {threshold:g}", "gated_values": int(keep.sum()),
                  "values": int(keep.size)}


def thresholds_for(kind: str, t) -> float:
    """The pass mark of a kind's headline value (target [fidelity] thresholds)."""
    return {"classes": t.min_top1_agreement, "detection": t.min_detection_f1, "sequence": t.min_sequence_agreement,
            "embedding": t.min_embedding_cosine, "regression": t.min_sqnr_db, "boxes": t.min_box_iou}.get(kind, 0.0)


def judge_outputs(names: list[str], kinds: list[str], ref: list[np.ndarray], out: list[np.ndarray],
                  axes: list[int | None], thresholds,
                  gates: dict[int, tuple[int, float]] | None = None) -> list[dict[str, Any]]:
    """One row per output: its kind, metric, value, pass mark and whether it passes. A gated output (``gates``)
    is judged only on the values where the reference's gate output reaches its threshold."""
    samples_r = [_by_sample(np.asarray(x, dtype=np.float64) if np.asarray(x).dtype.kind in "fiub" else x, a)
                 for x, a in zip(ref, axes)]
    samples_o = [_by_sample(np.asarray(x, dtype=np.float64) if np.asarray(x).dtype.kind in "fiub" else x, a)
                 for x, a in zip(out, axes)]
    box_i = [i for i, k in enumerate(kinds) if k == "boxes"]
    rows = []
    for i, (name, kind) in enumerate(zip(names, kinds)):
        r, o = samples_r[i], samples_o[i]
        if kind == "ignore" or kind == "boxes":
            if kind == "boxes" and not any(k == "detection" for k in kinds):
                row = regression_metric(r, o) | {"metric": "SQNR dB"}
                rows.append({"output": name, "kind": "regression", **row,
                             "threshold": thresholds.min_sqnr_db, "passed": row["value"] >= thresholds.min_sqnr_db})
            else:
                rows.append({"output": name, "kind": kind, "metric": "not judged" if kind == "ignore" else
                             "judged with the scores", "value": None, "threshold": None, "passed": True})
            continue
        gated = (gates or {}).get(i)
        keep = None if gated is None else gate_mask(r, samples_r[gated[0]], names[gated[0]], gated[1])
        if not np.all(np.isfinite(o if keep is None else o[keep])):
            rows.append({"output": name, "kind": kind, "metric": "finite values", "value": 0.0,
                         "threshold": 1.0, "passed": False})
            continue
        if kind == "classes":
            row = classes_metric(r.reshape(len(r), -1), o.reshape(len(o), -1))
        elif kind == "detection":
            rb = samples_r[box_i[0]] if box_i else None
            ob = samples_o[box_i[0]] if box_i else None
            row = detection_metric(r, o, rb, ob)
        elif kind == "sequence":
            row = sequence_metric(r, o)
        elif kind == "embedding":
            row = embedding_metric(r, o)
        elif gated is not None and keep is not None:
            row = gated_metric(r, o, keep, names[gated[0]], gated[1])
        else:
            row = regression_metric(r, o)
        thr = thresholds_for(kind, thresholds)
        ok = row["value"] >= thr
        if kind == "detection" and row.get("box_iou") is not None:
            ok = ok and row["box_iou"] >= thresholds.min_box_iou
        if kind == "embedding" and row.get("nn_agreement") is not None:
            ok = ok and row["nn_agreement"] >= thresholds.min_nn_agreement
        if kind == "regression" and r[0].size <= SCORE_VALUES:  # each value is read: the worst one must hold too
            ok = ok and row["worst_db"] >= thr
            row["metric"] += " (and worst error dB)"
            row["worst_threshold"] = thr
        rows.append({"output": name, "kind": kind, **row, "threshold": thr, "passed": bool(ok)})
    return rows


def compare(reference: list[np.ndarray], outputs: list[np.ndarray], labels=None, *, names: list[str] | None = None,
            kinds: list[str] | None = None, axes: list[int | None] | None = None, thresholds=None,
            gates: dict[int, tuple[int, float]] | None = None) -> Fidelity:
    """Compare candidate outputs with the reference (same order and shapes).

    Without `kinds`/`thresholds` only the overall numbers are computed: top1_agreement on the first output
    when it is (N, classes) scores, cosine over all outputs flattened, max_abs_diff, and accuracy (argmax of
    the first output vs `labels`). With them, every output is judged by its kind (`outputs` field).
    Non-finite candidate values (e.g. fp16 overflow) give cosine 0 and max_abs_diff inf.
    """
    if len(reference) != len(outputs):
        raise DataError(f"the candidate has {len(outputs)} outputs but the reference has {len(reference)}",
                        hint="compare models with the same outputs")
    for i, (r, o) in enumerate(zip(reference, outputs)):
        if np.shape(r) != np.shape(o):
            raise DataError(f"output {i} has shape {np.shape(o)} but the reference has {np.shape(r)}",
                            hint="compare models with the same outputs")
    axes = axes if axes is not None else [0] * len(reference)
    ref = [np.asarray(r, dtype=np.float64).ravel() for r in reference]
    out = [np.asarray(o, dtype=np.float64).ravel() for o in outputs]
    a, b = np.concatenate(ref) if ref else np.zeros(0), np.concatenate(out) if out else np.zeros(0)
    first = _by_sample(np.asarray(reference[0]), axes[0]) if reference else np.zeros(0)
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
        pred = np.argmax(_by_sample(np.asarray(outputs[0]), axes[0]), axis=1)
        top1 = float(np.mean(np.argmax(first, axis=1) == pred))
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if not scores:
            raise DataError(f"labels were given but the first output has shape {first.shape}, not (N, classes)",
                            hint="use labels only with a classifier, or drop them to compare outputs only")
        if len(labels) != n:
            raise DataError(f"{len(labels)} labels for {n} samples", hint="give one label per sample")
        acc = float(np.mean(pred == labels))
    rows: tuple = ()
    if kinds is not None and thresholds is not None:
        names = names or [f"output_{i}" for i in range(len(reference))]
        rows = tuple(judge_outputs(names, kinds, reference, outputs, axes, thresholds, gates))
    return Fidelity(n=n, top1_agreement=top1, cosine=cosine, max_abs_diff=max_abs, accuracy=acc, outputs=rows)
