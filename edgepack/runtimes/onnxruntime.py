"""ONNX Runtime backend: one InferenceSession on the target's execution provider."""
from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from edgepack.recipe import StepSpec
from edgepack.runner import run as runner
from edgepack.runtimes import PROFILE_RUNS, Session, call_runner, finish_profile, is_int_kernel, rss_mb
from edgepack.types import Artifact, ModelFormat, Precision, TensorSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# ONNX tensor type strings as ORT reports them -> numpy dtype names.
_DTYPES = {"float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16",
           "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
           "uint32": "uint32", "int64": "int64", "uint64": "uint64", "bool": "bool", "string": "object"}
# pip package that carries each provider (the plain wheel has CPU only, plus CoreML/XNNPACK on some)
_PACKAGES = {
    "CUDAExecutionProvider": ("onnxruntime-gpu", "the CUDA provider ships in onnxruntime-gpu, not onnxruntime"),
    "TensorrtExecutionProvider": ("onnxruntime-gpu", "the TensorRT provider ships in onnxruntime-gpu (needs TensorRT)"),
    "QNNExecutionProvider": ("onnxruntime-qnn", "the QNN provider ships in onnxruntime-qnn, not onnxruntime"),
    "DmlExecutionProvider": ("onnxruntime-directml", "DirectML ships in onnxruntime-directml"),
    "OpenVINOExecutionProvider": ("onnxruntime-openvino", "the OpenVINO provider ships in onnxruntime-openvino"),
}


def _specs(args) -> list[TensorSpec]:
    out = []
    for a in args:
        kind = a.type[len("tensor("):-1] if a.type.startswith("tensor(") else a.type
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in (a.shape or ()))
        out.append(TensorSpec(a.name, _DTYPES.get(kind, kind), shape))
    return out


NO_PROPAGATION = "QDQPropagationTransformer"


def _optimized_ops(path: Path, spec) -> list[str]:
    """The op types of the graph ONNX Runtime's CPU provider runs for this model and spec (written beside it)."""
    import onnx
    import onnxruntime as ort

    out = Path(path).with_name(f"optimized-{len(spec.disabled_optimizers)}.onnx")
    so = ort.SessionOptions()
    so.log_severity_level, so.optimized_model_filepath = 3, str(out)
    ort.InferenceSession(str(path), so, providers=[CPU], disabled_optimizers=list(spec.disabled_optimizers))
    try:
        return [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    finally:
        out.unlink(missing_ok=True)


class OrtSession(Session):
    runtime = "onnxruntime"

    def op_profile(self, feeds, iterations: int = PROFILE_RUNS) -> list[dict]:
        """Per-op-type time from ORT's profiler (a second session with profiling on; 1 warm-up run dropped):
        each op's time summed within a run, then its median over the runs; integer or float by the op's
        input tensor types."""
        import onnxruntime as ort

        feeds = self.check(feeds)
        iterations = max(1, int(iterations))
        sess = self.model.handle
        with tempfile.TemporaryDirectory(prefix=f"edgepack-prof-{os.getpid()}-") as tmp:
            so = runner.ort_session_options(self.settings)
            so.enable_profiling = True
            so.profile_file_prefix = f"{tmp}/ort"
            prof = ort.InferenceSession(str(self.path), sess_options=so, providers=sess.get_providers(),
                                        **runner.ort_session_kwargs(self.settings))
            for _ in range(iterations + 1):
                prof.run(None, feeds)
            trace = json.loads(Path(prof.end_profiling()).read_text(encoding="utf-8"))
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                       if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]  # warm-up dropped
        starts = [t0 for t0, _ in runs]
        groups: dict[str, dict] = defaultdict(lambda: {"runs": defaultdict(float), "int": False, "device": "",
                                                       "calls": 0})
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            run = bisect.bisect_right(starts, e["ts"]) - 1  # the last run that started before this event
            if run < 0 or e["ts"] > runs[run][1]:
                continue
            args = e.get("args", {})
            op = args.get("op_name", "?")
            g = groups[op]
            g["runs"][run] += float(e.get("dur", 0))
            types = tuple(t["type"] for t in _shapes(args.get("input_type_shape")))
            g["int"] = g["int"] or is_int_kernel(op, input_types=types)
            g["device"] = args.get("provider", self.device_used)
            g["calls"] += 1
        for g in groups.values():
            g["calls"] //= max(1, len(runs))
            g["runs"] = list(g["runs"].values())
        return finish_profile(dict(groups), len(runs) or iterations)


def _shapes(value) -> list[dict]:
    """ORT's input_type_shape: [{"float": [1, 3]}, ...] -> [{"type": "float"}, ...]."""
    out = []
    for item in value or []:
        if isinstance(item, dict):
            out += [{"type": k} for k in item]
    return out


class OnnxRuntimeBackend:
    name = "onnxruntime"
    short = "ort"
    package = "onnxruntime"
    extra = None  # a base dependency (onnxruntime-gpu users: see the gpu extra)
    runner_flag = "--provider"
    formats = (ModelFormat.ONNX,)

    def check_spec(self, spec) -> None:
        if not spec.provider:
            raise ValueError("an onnxruntime entry needs 'provider'")

    def device(self, spec) -> str:
        return spec.provider

    def cpu_device(self) -> str:
        return CPU

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one backend object per process
    def info(self) -> tuple[str | None, tuple[str, ...]]:
        try:
            import onnxruntime as ort
        except ImportError:
            return None, ()
        return ort.__version__, tuple(ort.get_available_providers())

    def availability(self, device: str) -> str | None:
        version, providers = self.info()
        if version is None:
            return "onnxruntime is not installed"
        return None if device in providers else f"{device} not available on this host"

    def settings(self, spec, threads: int) -> dict[str, Any]:
        return {"threads": int(threads or 0), "inter_op_threads": 1, "execution_mode": "sequential",
                "graph_optimization_level": "all", "allow_spinning": True, "pin_threads": False,
                **({"disabled_optimizers": list(spec.disabled_optimizers)} if spec.disabled_optimizers else {})}

    def fallback_settings(self) -> dict[str, Any]:
        return {}

    def open(self, artifact: Artifact, spec, device: str, settings: dict) -> OrtSession:
        before = rss_mb()
        options = {k: str(v) for k, v in spec.provider_options.items()} if device == spec.provider else {}
        model = call_runner(artifact, lambda: runner.open_onnxruntime(artifact.path, device, settings, options=options))
        sess = model.handle
        session = OrtSession(model, inputs=_specs(sess.get_inputs()), outputs=_specs(sess.get_outputs()),
                             requested=self.device(spec), settings=settings, rss_before=before)
        session.path = Path(artifact.path)
        return session

    def candidate_steps(self, spec, precision: Precision) -> tuple[StepSpec, ...] | None:
        level = "extended" if spec.provider == CPU else "basic"
        table = {
            Precision.FP32: (StepSpec(kind="optimize-graph", params={"level": level}),),
            Precision.INT8: (StepSpec(kind="quantize-static"),),
            Precision.INT8_DYNAMIC: (StepSpec(kind="quantize-dynamic"),),
            Precision.FP16: (StepSpec(kind="fp16"),),
            Precision.INT4: (StepSpec(kind="int4"),),
        }
        return table.get(precision)

    def spec_for(self, spec, precision: Precision):
        return spec, None

    def guard_steps(self, spec, precision: Precision) -> tuple[StepSpec, ...] | None:
        kind = {Precision.INT8: "quantize-guarded", Precision.INT8_DYNAMIC: "quantize-dynamic-guarded"}.get(precision)
        return (StepSpec(kind=kind),) if kind else None

    def mixed_variants(self, artifact: Artifact, spec, precision: Precision) -> list:
        """A guarded (mixed-precision) QDQ model, also with QDQ propagation off, where that changes the graph
        ONNX Runtime runs: around the layers kept float it moves QuantizeLinear across pooling and reshapes,
        which can then run an integer kernel slower than the float one (aecmos: a uint8 MaxPool in NCHW took
        4.5 of 12.7 ms; off: 8.2 ms). Which is faster depends on the model, so both are timed."""
        if precision is not Precision.INT8 or NO_PROPAGATION in spec.disabled_optimizers:
            return []
        off = spec.model_copy(update={"disabled_optimizers": (*spec.disabled_optimizers, NO_PROPAGATION)})
        try:
            if _optimized_ops(artifact.path, spec) == _optimized_ops(artifact.path, off):
                return []
        except Exception as e:  # ORT raises its own types; a variant is an extra, never a failure
            log.debug("no QDQ propagation variant of %s: %s", artifact.path.name, e)
            return []
        return [("noprop", off, f"the same model with ONNX Runtime's {NO_PROPAGATION} off (the manifest's "
                 "settings.disabled_optimizers): quantization stays where the guard put it")]

    def manifest_section(self, spec, settings: dict) -> dict[str, Any]:
        return {"name": self.name, "version": self.info()[0], "provider": spec.provider,
                "provider_options": dict(spec.provider_options), "fallback": spec.fallback,
                "model": "model.onnx", "settings": settings}

    def requirement(self, section: dict) -> tuple[str, str | None]:
        """The pip package (and why it is not the plain one) that the bundle's requirements.txt pins."""
        return _PACKAGES.get(section.get("provider") or "", (self.package, None))

    def copy_model(self, files: list[Path], dest: Path) -> str:
        import onnx
        from onnx.external_data_helper import uses_external_data

        main = Path(files[0])
        proto = onnx.load(str(main), load_external_data=False)
        if any(uses_external_data(t) for t in proto.graph.initializer):
            # re-save so the external-data locations point at the new file name
            full = onnx.load(str(main), load_external_data=True)
            onnx.save(full, str(dest / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data", size_threshold=0)
        else:
            shutil.copyfile(main, dest / "model.onnx")
        return "model.onnx"


BACKEND = OnnxRuntimeBackend()
