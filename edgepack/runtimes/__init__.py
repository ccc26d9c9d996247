"""Run a model through ONNX Runtime or OpenVINO: one `Session` shape for both runtimes.

``open_session(artifact, spec, threads=..., fallback=...)`` picks the backend from ``spec.runtime``.
Every session records:

- ``device_used``: the provider/device really running the model (after any fallback);
- ``load_ms``: session creation / compile time;
- ``first_ms``: the first inference (set by the first ``run`` call);
- ``memory_mb``: process RSS growth (psutil) from just before loading to just after the first run,
  the larger of the two readings after load and after the first run. It is process-wide, so anything
  else the process allocates meanwhile counts too; open sessions one at a time when it matters.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np

from ..errors import DataError, ModelError, RuntimeUnavailable
from ..types import Artifact, ModelFormat, RuntimeName, TensorSpec

log = logging.getLogger(__name__)

__all__ = ["Session", "open_session", "check_feeds", "kernel_summary", "is_int_kernel", "rss_mb"]

# ONNX Runtime ops that run integer arithmetic (QDQ models are fused into QLinear*/QGemm at load time).
_INT_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
            "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits", "QGemm", "QAttention",
            "QEmbedLayerNormalization", "QOrderedMatMul", "MatMulBnb4", "GatherBlockQuantized"}
# OpenVINO CPU exec types name the kernel precision last: "jit_avx512_I8", "brgemm_avx512_amx_u8", "ref_f32".
_INT_EXEC = re.compile(r"(^|_)[iu](8|4)($|_)", re.IGNORECASE)


def is_int_kernel(op: str, exec_type: str = "") -> bool:
    """Whether an op (ONNX Runtime op type, or OpenVINO node with its exec type) runs an integer kernel."""
    if exec_type:
        return bool(_INT_EXEC.search(exec_type))
    return op.startswith("QLinear") or op in _INT_OPS


def kernel_summary(profile: list[dict]) -> dict[str, Any]:
    """Count integer vs float op types in an `op_profile` and the share of time spent in integer kernels."""
    int_ms = sum(p["ms"] for p in profile if p["int"])
    total = sum(p["ms"] for p in profile)
    return {
        "int_ops": sum(1 for p in profile if p["int"]),
        "float_ops": sum(1 for p in profile if not p["int"]),
        "int_time_share": int_ms / total if total > 0 else 0.0,
    }


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _shape_str(shape: tuple) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def check_feeds(specs: list[TensorSpec], feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    """Match feeds to the model inputs: names, rank, fixed dims, dtype (safe casts only). Raises DataError."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DataError(f"input '{missing[0]}' is missing from the feeds",
                        hint=f"the model expects inputs {names}, got {sorted(feeds)}")
    unknown = [n for n in feeds if n not in names]
    if unknown:
        raise DataError(f"input '{unknown[0]}' is not an input of the model", hint=f"model inputs: {names}")
    out = {}
    for spec in specs:
        arr = np.asarray(feeds[spec.name])
        try:
            want = np.dtype(spec.dtype)
        except TypeError:  # a type numpy lacks (bfloat16): leave the check to the runtime
            want = arr.dtype
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, casting="same_kind"):
                raise DataError(f"input '{spec.name}' has dtype {arr.dtype} but the model expects {want}",
                                hint=f"convert the data to {want}")
            arr = arr.astype(want)
        bad = arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d >= 0 and d != n for d, n in zip(spec.shape, arr.shape))
        if bad:
            raise DataError(f"input '{spec.name}' has shape {tuple(arr.shape)} but the model expects "
                            f"{_shape_str(spec.shape)}", hint="'?' dims may take any size; reshape the data")
        out[spec.name] = arr
    return out


class Session:
    """A loaded model on one runtime/device. Backends implement `_run` and `op_profile`."""

    runtime: str = ""

    def __init__(self, *, inputs: list[TensorSpec], outputs: list[TensorSpec], device_used: str,
                 requested: str, load_ms: float, threads: int, rss_before: float):
        self.inputs, self.outputs = inputs, outputs
        self.device_used, self.requested = device_used, requested
        self.fell_back = device_used != requested
        self.load_ms, self.threads = load_ms, threads
        self.first_ms: float | None = None
        self._rss_before = rss_before
        self.memory_mb = max(0.0, rss_mb() - rss_before)
        self.notes: list[str] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.runtime}:{self.device_used} load={self.load_ms:.1f}ms>"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model is fixed to (dim 0 of its inputs), or None when it is dynamic."""
        dims = {s.shape[0] for s in self.inputs if s.shape}
        if len(dims) == 1:
            (d,) = dims
            if isinstance(d, int) and d > 0:
                return d
        return None

    def check(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        return check_feeds(self.inputs, feeds)

    def run(self, feeds: dict[str, Any]) -> list[np.ndarray]:
        """Run one inference; outputs as numpy arrays in the model's output order."""
        feeds = self.check(feeds)
        if self.first_ms is not None:
            return self._run(feeds)
        t0 = time.perf_counter_ns()
        out = self._run(feeds)
        self.first_ms = (time.perf_counter_ns() - t0) / 1e6
        self.memory_mb = max(self.memory_mb, rss_mb() - self._rss_before)
        return out

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def op_profile(self, feeds: dict[str, Any], iterations: int = 20) -> list[dict]:
        """Mean time per inference of each op type: [{"op","ms","share","int","device",...}], slowest first."""
        raise NotImplementedError


def finish_profile(groups: dict[str, dict], iterations: int) -> list[dict]:
    """Turn {op: {"us": total µs, "int": bool, "device": str, ...}} into op_profile entries."""
    total = sum(g["us"] for g in groups.values())
    rows = []
    for op, g in groups.items():
        ms = g.pop("us") / iterations / 1000.0
        rows.append({"op": op, "ms": ms, "share": (ms * iterations * 1000.0 / total) if total else 0.0, **g})
    return sorted(rows, key=lambda r: -r["ms"])


def resolve_threads(threads: int) -> int:
    from ..host import physical_cores

    return threads if threads and threads > 0 else physical_cores()


def open_session(artifact: Artifact, spec, *, threads: int, fallback: bool = False) -> Session:
    """Load `artifact` on the runtime/provider/device of `spec` (a target.RuntimeSpec).

    Raises RuntimeUnavailable when the provider/device is absent here and `fallback` is False; with
    `fallback=True` the model runs on the CPU provider/device instead (`device_used` says so).
    """
    if artifact.format is ModelFormat.TORCH:
        raise ModelError(f"{artifact.path}: a torch model cannot be run directly",
                         hint="export it to ONNX first (export_onnx)")
    if spec.runtime is RuntimeName.ONNXRUNTIME:
        if artifact.format is not ModelFormat.ONNX:
            raise ModelError(f"{artifact.path}: ONNX Runtime needs an ONNX model, got {artifact.format.value}",
                             hint="use an OpenVINO runtime entry for IR models")
        from .onnxruntime import open_ort

        return open_ort(artifact, spec, threads=resolve_threads(threads), fallback=fallback)
    if spec.runtime is RuntimeName.OPENVINO:
        from .openvino import open_ov

        return open_ov(artifact, spec, threads=resolve_threads(threads), fallback=fallback)
    raise RuntimeUnavailable(f"unknown runtime {spec.runtime!r}", hint="use onnxruntime or openvino")
