"""ONNX Runtime backend: one InferenceSession on the target's execution provider."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError, RuntimeUnavailable
from ..host import availability
from ..types import Artifact, RuntimeName, TensorSpec
from . import Session, finish_profile, is_int_kernel, rss_mb

log = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
# ONNX tensor type strings as ORT reports them -> numpy dtype names.
_DTYPES = {"float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16",
           "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
           "uint32": "uint32", "int64": "int64", "uint64": "uint64", "bool": "bool", "string": "object"}


def _specs(args) -> list[TensorSpec]:
    out = []
    for a in args:
        kind = a.type[len("tensor("):-1] if a.type.startswith("tensor(") else a.type
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in (a.shape or ()))
        out.append(TensorSpec(a.name, _DTYPES.get(kind, kind), shape))
    return out


def _options(threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warnings would bypass logging
    # ORT's idle pool threads spin after each run (its default, kept: that is how users run it). bench.py
    # interleaves in blocks with settle runs so the spinning does not land on another runtime's timings.
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class OrtSession(Session):
    runtime = RuntimeName.ONNXRUNTIME.value

    def __init__(self, sess, *, path: Path, providers: list, **kw):
        self._sess, self._path, self._providers = sess, path, providers
        super().__init__(inputs=_specs(sess.get_inputs()), outputs=_specs(sess.get_outputs()), **kw)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._sess.run(None, feeds)
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"onnxruntime could not run {self._path.name} on these inputs: {first}",
                            hint="check the input shapes and values") from e

    def op_profile(self, feeds, iterations: int = 20) -> list[dict]:
        """Per-op-type time from ORT's profiler (a second session with profiling on; 1 warm-up run dropped)."""
        import onnxruntime as ort

        feeds = self.check(feeds)
        iterations = max(1, int(iterations))
        with tempfile.TemporaryDirectory(prefix="edgepack-prof-") as tmp:
            sess = ort.InferenceSession(str(self._path), sess_options=_options(self.threads, f"{tmp}/ort"),
                                        providers=self._providers)
            for _ in range(iterations + 1):
                sess.run(None, feeds)
            trace = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
        runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])
        after_warmup = runs[0]["ts"] + runs[0]["dur"] if runs else -1
        groups: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "int": False, "device": "", "calls": 0})
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_warmup:
                continue
            args = e.get("args", {})
            op = args.get("op_name", "?")
            g = groups[op]
            g["us"] += float(e.get("dur", 0))
            g["int"] = is_int_kernel(op)
            g["device"] = args.get("provider", self.device_used)
            g["calls"] += 1
        for g in groups.values():
            g["calls"] //= iterations
        return finish_profile(dict(groups), iterations)


def open_ort(artifact: Artifact, spec, *, threads: int, fallback: bool) -> OrtSession:
    import onnxruntime as ort

    wanted = spec.provider
    providers: list = [(wanted, {k: str(v) for k, v in spec.provider_options.items()})]
    reason = availability(RuntimeName.ONNXRUNTIME, wanted)
    if reason:
        if not fallback:
            raise RuntimeUnavailable(f"onnxruntime: {reason}",
                                     hint="run on a host that has it, or pass fallback to check fidelity on CPU")
        alt = spec.fallback if spec.fallback and not availability(RuntimeName.ONNXRUNTIME, spec.fallback) else _CPU
        log.info("%s absent here: running %s on %s (fidelity only)", wanted, artifact.path.name, alt)
        providers = [alt]
    before = rss_mb()
    t0 = time.perf_counter_ns()
    try:
        sess = ort.InferenceSession(str(artifact.path), sess_options=_options(threads), providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime could not load {artifact.path}: {first}",
                         hint="check the file with onnx.checker, or re-export the model") from e
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    used = sess.get_providers()[0]
    if not reason and used != wanted and not fallback:
        # ORT silently drops a provider that fails to initialise (missing CUDA libraries, ...).
        raise RuntimeUnavailable(f"onnxruntime: {wanted} failed to initialise (session runs on {used})",
                                 hint="check the provider's libraries and drivers")
    return OrtSession(sess, path=Path(artifact.path), providers=providers, device_used=used, requested=wanted,
                      load_ms=load_ms, threads=threads, rss_before=before)
