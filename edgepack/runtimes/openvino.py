"""OpenVINO backend: a model (ONNX or IR .xml) compiled on one device with its precision pinned.

The CPU plugin picks bf16 by default on CPUs with AVX512-BF16/AMX; edgepack always pins
INFERENCE_PRECISION_HINT to the target's value and reads it back from the compiled model
(`precision_used`), so an "f32" candidate is really measured in f32. openvino is an optional extra.
"""
from __future__ import annotations

import functools
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import BundleError
from edgepack.recipe import StepSpec
from edgepack.runner import run as runner
from edgepack.runtimes import PROFILE_RUNS, Session, call_runner, finish_profile, is_int_kernel, rss_mb
from edgepack.runtimes.sigstack import keep_sigaltstack
from edgepack.types import Artifact, ModelFormat, Precision, TensorSpec

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


def _precision_name(value) -> str:
    """ov.Type (or its string) -> "f32"/"f16"/"bf16"/..."""
    s = getattr(value, "get_type_name", lambda: str(value))().lower()
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(s, s)


class OvSession(Session):
    runtime = "openvino"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        _, compiled, self._request = model.handle
        self.precision = kw["settings"].get("inference_precision", "f32")  # what was asked
        self.precision_used = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.precision_used != self.precision:
            self.notes.append(f"OpenVINO {self.device_used} runs in {self.precision_used}, not {self.precision}")
            log.warning(self.notes[-1])

    def runtime_latencies(self, feeds, iterations: int) -> list[float]:
        """OpenVINO's own per-inference latency (ms, InferRequest.latency, measured inside C++ as
        benchmark_app reports it): the wall time minus the cost of calling from Python."""
        feeds = self.check(feeds)
        out = []
        for _ in range(iterations):
            self._request.infer(feeds, share_inputs=True)
            out.append(float(self._request.latency))
        return out

    def op_profile(self, feeds, iterations: int = PROFILE_RUNS) -> list[dict]:
        """Per-node-type time from OpenVINO's performance counters (PERF_COUNT), 1 warm-up run dropped."""
        import openvino as ov

        feeds = self.check(feeds)
        iterations = max(1, int(iterations))
        core = self.model.handle[0]
        config = {**runner.ov_config({**self.settings, "inference_precision": self.precision_used_hint}),
                  "PERF_COUNT": True}
        with keep_sigaltstack():  # see runtimes/sigstack.py
            prof = core.compile_model(str(self.path), self.device_used, config)
        req = prof.create_infer_request()
        req.infer(feeds)
        groups: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "int_us": 0.0, "exec": set(), "calls": 0,
                                                       "runs": defaultdict(float)})
        for run in range(iterations):
            req.infer(feeds)
            for info in req.get_profiling_info():
                if info.status != ov.ProfilingInfo.Status.EXECUTED:
                    continue
                us = info.real_time.total_seconds() * 1e6
                g = groups[info.node_type]
                g["us"] += us
                g["runs"][run] += us
                g["calls"] += 1
                g["exec"].add(info.exec_type)
                if is_int_kernel(info.node_type, info.exec_type):
                    g["int_us"] += us
        rows = {}
        for op, g in groups.items():
            rows[op] = {"runs": list(g["runs"].values()), "int": g["int_us"] > 0.5 * g["us"] if g["us"] else False,
                        "device": self.device_used, "exec": ",".join(sorted(g["exec"])),
                        "calls": g["calls"] // iterations}
        return finish_profile(rows, iterations)

    @property
    def precision_used_hint(self) -> str:
        return self.precision_used if self.precision_used in ("f32", "f16", "bf16") else self.precision


class OpenVinoBackend:
    name = "openvino"
    short = "ov"
    package = "openvino"
    extra = "openvino"
    runner_flag = "--device"
    formats = (ModelFormat.ONNX, ModelFormat.OPENVINO)

    def check_spec(self, spec) -> None:
        if not spec.device:
            raise ValueError("an openvino entry needs 'device'")
        if not spec.inference_precision:
            raise ValueError("an openvino entry needs 'inference_precision' (f32, f16 or bf16)")

    def device(self, spec) -> str:
        return spec.device

    def cpu_device(self) -> str:
        return "CPU"

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one backend object per process
    def info(self) -> tuple[str | None, tuple[str, ...]]:
        try:
            import openvino as ov
        except ImportError:
            return None, ()
        try:
            devices = tuple(ov.Core().available_devices)
        except RuntimeError:
            devices = ()
        return ov.__version__.split("-")[0], devices

    def availability(self, device: str) -> str | None:
        version, devices = self.info()
        if version is None:
            return "openvino is not installed (pip install edgepack[openvino])"
        if not any(d == device or d.startswith(device + ".") for d in devices):
            return f"OpenVINO {device} device not available on this host"
        return None

    def settings(self, spec, threads: int) -> dict[str, Any]:
        s = {"threads": int(threads or 0), "performance_hint": "LATENCY", "num_streams": 1,
             "inference_precision": spec.inference_precision or "f32"}
        if spec.device.split(".")[0] == "CPU":
            # Unpinned threads: pinned ones stall whenever another thread (another runtime's spinning pool, another
            # process) holds their core, which on a shared or 2-core host made OpenVINO look 3-10x slower.
            s["cpu_pinning"] = False
        return s

    def fallback_settings(self) -> dict[str, Any]:
        return {"inference_precision": "f32", "cpu_pinning": False}  # the CPU fallback checks fidelity in f32

    def open(self, artifact: Artifact, spec, device: str, settings: dict) -> OvSession:
        before = rss_mb()
        with keep_sigaltstack():  # see runtimes/sigstack.py
            model = call_runner(artifact, lambda: runner.open_openvino(artifact.path, device, settings))
        _, compiled, _ = model.handle
        session = OvSession(model, inputs=_specs(compiled.inputs), outputs=_specs(compiled.outputs),
                            requested=self.device(spec), settings=settings, rss_before=before)
        session.path = Path(artifact.path)
        return session

    def candidate_steps(self, spec, precision: Precision) -> tuple[StepSpec, ...] | None:
        preset = {"preset": "performance" if spec.device == "NPU" else "mixed"}
        table = {
            Precision.FP32: (StepSpec(kind="convert-ir"),),
            Precision.FP16: (StepSpec(kind="convert-ir", params={"compress_to_fp16": True}),),
            Precision.BF16: (StepSpec(kind="convert-ir"),),  # bf16 is a compute precision: see spec_for()
            Precision.INT8: (StepSpec(kind="convert-ir"), StepSpec(kind="nncf-int8", params=preset)),
            Precision.INT4: (StepSpec(kind="convert-ir"), StepSpec(kind="nncf-int4")),
        }
        return table.get(precision)

    def spec_for(self, spec, precision: Precision):
        """The entry a candidate of `precision` runs with (bf16: the inference precision pinned to bf16), or
        None with the reason when this host cannot run it."""
        if precision is not Precision.BF16:
            return spec, None
        from edgepack.host import host_info

        features = set(host_info().features)
        if spec.device.split(".")[0] == "CPU" and not features & {"avx512_bf16", "amx_bf16"}:
            return None, "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
        return spec.model_copy(update={"inference_precision": "bf16"}), None

    def guard_steps(self, spec, precision: Precision) -> tuple[StepSpec, ...] | None:
        if precision is not Precision.INT8:
            return None
        return (StepSpec(kind="convert-ir"), StepSpec(kind="nncf-int8-guarded"))

    def mixed_variants(self, artifact: Artifact, spec, precision: Precision) -> list:
        return []

    def manifest_section(self, spec, settings: dict) -> dict[str, Any]:
        return {"name": self.name, "version": self.info()[0], "device": spec.device,
                "inference_precision": settings.get("inference_precision"), "fallback": spec.fallback,
                "model": "model.xml", "settings": settings}

    def requirement(self, section: dict) -> tuple[str, str | None]:
        """The pip package (and why it is not the plain one) that the bundle's requirements.txt pins."""
        return (self.package, None)

    def copy_model(self, files: list[Path], dest: Path) -> str:
        main = Path(files[0])
        if main.suffix == ".onnx":  # the original as given: OpenVINO reads ONNX directly
            from edgepack.runtimes.onnxruntime import BACKEND as onnx_files

            return onnx_files.copy_model(files, dest)
        bins = [Path(p) for p in files[1:] if Path(p).suffix == ".bin"] or [main.with_suffix(".bin")]
        if not bins[0].is_file():
            raise BundleError(f"OpenVINO weights {bins[0]} not found next to {main}")
        shutil.copyfile(main, dest / "model.xml")
        shutil.copyfile(bins[0], dest / "model.bin")
        return "model.xml"


BACKEND = OpenVinoBackend()
