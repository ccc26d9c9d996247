"""OpenVINO backend: a model (ONNX or IR .xml) compiled on one device with its precision pinned.

The CPU plugin picks bf16 by default on CPUs with AVX512-BF16/AMX; edgepack always pins
INFERENCE_PRECISION_HINT to the target's value and reads it back from the compiled model
(`precision_used`), so an "f32" candidate is really measured in f32.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError, RuntimeUnavailable
from ..host import availability
from ..sigstack import keep_sigaltstack
from ..types import Artifact, RuntimeName, TensorSpec
from . import Session, finish_profile, is_int_kernel, rss_mb

log = logging.getLogger(__name__)


def _specs(ports) -> list[TensorSpec]:
    out = []
    for p in ports:
        shape = tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape())
        try:
            dtype = np.dtype(p.get_element_type().to_dtype()).name
        except (TypeError, RuntimeError):
            dtype = p.get_element_type().get_type_name()
        out.append(TensorSpec(p.get_any_name(), dtype, shape))
    return out


def _config(precision: str, threads: int, profile: bool = False) -> dict:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    types = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}
    cfg = {
        hints.inference_precision: types[precision],
        props.inference_num_threads: threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
    }
    if profile:
        cfg[props.enable_profiling] = True
    return cfg


def _precision_name(value) -> str:
    """ov.Type (or its string) -> "f32"/"f16"/"bf16"/..."""
    s = getattr(value, "get_type_name", lambda: str(value))().lower()
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(s, s)


class OvSession(Session):
    runtime = RuntimeName.OPENVINO.value

    def __init__(self, core, model, compiled, *, precision: str, **kw):
        self._core, self._model, self._compiled = core, model, compiled
        self._request = compiled.create_infer_request()
        self.precision = precision  # what was asked
        self.precision_used = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        super().__init__(inputs=_specs(compiled.inputs), outputs=_specs(compiled.outputs), **kw)
        if self.precision_used != precision:
            self.notes.append(f"OpenVINO {self.device_used} runs in {self.precision_used}, not {precision}")
            log.warning(self.notes[-1])

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            res = self._request.infer(feeds, share_inputs=True)  # no input copy: infer is synchronous
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"OpenVINO could not run the model on these inputs: {first}",
                            hint="check the input shapes and values") from e
        return [np.asarray(res[o]) for o in self._compiled.outputs]

    def runtime_latencies(self, feeds, iterations: int) -> list[float]:
        """OpenVINO's own per-inference latency (ms, InferRequest.latency, measured inside C++ as
        benchmark_app reports it): the wall time minus the cost of calling from Python."""
        feeds = self.check(feeds)
        out = []
        for _ in range(iterations):
            self._request.infer(feeds, share_inputs=True)
            out.append(float(self._request.latency))
        return out

    def op_profile(self, feeds, iterations: int = 20) -> list[dict]:
        """Per-node-type time from OpenVINO's performance counters (PERF_COUNT), 1 warm-up run dropped."""
        import openvino as ov

        feeds = self.check(feeds)
        iterations = max(1, int(iterations))
        with keep_sigaltstack():  # see edgepack/sigstack.py
            compiled = self._core.compile_model(self._model, self.device_used,
                                                _config(self.precision_used_hint, self.threads, profile=True))
        req = compiled.create_infer_request()
        req.infer(feeds)
        groups: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "int_us": 0.0, "exec": set(), "calls": 0})
        for _ in range(iterations):
            req.infer(feeds)
            for info in req.get_profiling_info():
                if info.status != ov.ProfilingInfo.Status.EXECUTED:
                    continue
                us = info.real_time.total_seconds() * 1e6
                g = groups[info.node_type]
                g["us"] += us
                g["calls"] += 1
                g["exec"].add(info.exec_type)
                if is_int_kernel(info.node_type, info.exec_type):
                    g["int_us"] += us
        rows = {}
        for op, g in groups.items():
            rows[op] = {"us": g["us"], "int": g["int_us"] > 0.5 * g["us"] if g["us"] else False,
                        "device": self.device_used, "exec": ",".join(sorted(g["exec"])),
                        "calls": g["calls"] // iterations}
        return finish_profile(rows, iterations)

    @property
    def precision_used_hint(self) -> str:
        return self.precision_used if self.precision_used in ("f32", "f16", "bf16") else self.precision


def open_ov(artifact: Artifact, spec, *, threads: int, fallback: bool) -> OvSession:
    import openvino as ov

    device, precision = spec.device, spec.inference_precision
    reason = availability(RuntimeName.OPENVINO, device)
    if reason:
        if not fallback:
            raise RuntimeUnavailable(reason, hint="run on a host that has it, or pass fallback to check fidelity on CPU")
        alt = spec.fallback if spec.fallback and not availability(RuntimeName.OPENVINO, spec.fallback) else "CPU"
        log.info("OpenVINO %s absent here: running %s on %s in f32 (fidelity only)", device, artifact.path.name, alt)
        device, precision = alt, "f32"
    path = Path(artifact.path)
    before = rss_mb()
    t0 = time.perf_counter_ns()
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise ModelError(f"OpenVINO could not read {path}: {first}",
                         hint="give an .onnx file or an IR .xml with its .bin next to it") from e
    try:
        with keep_sigaltstack():  # see edgepack/sigstack.py
            compiled = core.compile_model(model, device, _config(precision, threads))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "compile failed"
        raise ModelError(f"OpenVINO could not compile {path.name} for {device}: {first}",
                         hint="the device may not support an op of this model; try the CPU device") from e
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    return OvSession(core, model, compiled, precision=precision, device_used=device, requested=spec.device,
                     load_ms=load_ms, threads=threads, rss_before=before)
