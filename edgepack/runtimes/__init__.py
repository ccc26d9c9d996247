"""Runtimes behind one seam: the `Backend` protocol and the `BACKENDS` registry.

A backend owns everything that differs between runtimes: whether its provider/device is present here,
opening a session, the candidate steps for each precision, its manifest section, its requirements line
and the run.py flag that overrides its device. Nothing outside this package branches on a runtime's
name. Adding a runtime is one module here, one entry in `BACKENDS`, a target TOML and its tests
(docs/backends.md).

Sessions are opened through the bundle runner's own code (runner/run.py: settings → session options),
so pack times a candidate exactly as `run.py --benchmark` will run it. Every session records:

- ``device_used``: the provider/device really running the model (after any fallback);
- ``load_ms``: session creation / compile time; ``first_ms``: the first inference;
- ``memory_mb``: process RSS growth from just before loading to just after the first run.
"""
from __future__ import annotations

import importlib
import logging
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgepack.errors import DataError, ModelError, RuntimeUnavailable, TargetError, first_line
from edgepack.runner import run as runner
from edgepack.types import Artifact, ModelFormat, TensorSpec

if TYPE_CHECKING:
    from edgepack.recipe import StepSpec
    from edgepack.target import RuntimeSpec
    from edgepack.types import Precision

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Backend", "Session", "availability", "get_backend", "is_int_kernel", "kernel_summary",
           "open_session", "reference_spec", "rss_mb"]

# runtime name (as written in target TOMLs and manifests) -> module defining BACKEND
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgepack.runtimes.onnxruntime",
    "openvino": "edgepack.runtimes.openvino",
}


class Backend(Protocol):
    name: str  # key in BACKENDS, target TOMLs and manifests
    short: str  # prefix of candidate names ("ort-cpu-int8")
    package: str  # the pip package that carries it (requirements.txt)
    extra: str | None  # edgepack's pip extra that installs it, None when it is a base dependency
    runner_flag: str  # run.py's flag that overrides the provider/device
    formats: tuple[ModelFormat, ...]  # model formats it can open

    def check_spec(self, spec: RuntimeSpec) -> None: ...
    def fallback_settings(self) -> dict[str, Any]: ...  # settings override for the CPU fallback  # ValueError naming what a target entry lacks
    def device(self, spec: RuntimeSpec) -> str: ...  # the provider/device the entry asks for
    def cpu_device(self) -> str: ...  # where fidelity is checked when the real device is absent
    def info(self) -> tuple[str | None, tuple[str, ...]]: ...  # version (None: not installed), devices
    def availability(self, device: str) -> str | None: ...  # None when present, else why not
    def settings(self, spec: RuntimeSpec, threads: int) -> dict[str, Any]: ...  # runner settings
    def open(self, artifact: Artifact, spec: RuntimeSpec, device: str, settings: dict) -> Session: ...
    def candidate_steps(self, spec: RuntimeSpec, precision: Precision) -> tuple[StepSpec, ...] | None: ...
    def guard_steps(self, spec: RuntimeSpec, precision: Precision) -> tuple[StepSpec, ...] | None: ...  # int8 within budget
    def mixed_variants(self, artifact: Artifact, spec: RuntimeSpec,
                       precision: Precision) -> list[tuple[str, RuntimeSpec, str]]: ...  # other settings to time
    def spec_for(self, spec: RuntimeSpec, precision: Precision) -> tuple[RuntimeSpec | None, str | None]: ...
    def manifest_section(self, spec: RuntimeSpec, settings: dict) -> dict[str, Any]: ...
    def requirement(self, section: dict) -> tuple[str, str | None]: ...  # pip package, and a note on why it
    def copy_model(self, files: list[Path], dest: Path) -> str: ...  # into a bundle; returns the file name


def get_backend(name: str) -> Backend:
    """The backend registered under `name`; TargetError listing the known ones otherwise."""
    module = BACKENDS.get(str(name))
    if module is None:
        raise TargetError(f"unknown runtime {name!r}", hint=f"known runtimes: {', '.join(BACKENDS)}")
    return importlib.import_module(module).BACKEND


def host_arch() -> str:
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def availability(spec: RuntimeSpec, arch: str = "any") -> str | None:
    """None when this host can run `spec` as the target means it, else the reason it cannot."""
    here = host_arch()
    if arch != "any" and arch != here:
        return f"this host is {here}, the target is {arch}"
    backend = get_backend(spec.runtime)
    if backend.info()[0] is None:
        return f"{backend.name} is not installed" + (f" (pip install edgepack[{backend.extra}])" if backend.extra else "")
    return backend.availability(backend.device(spec))


def reference_spec() -> RuntimeSpec:
    """Where the fp32 reference runs: ONNX Runtime on the CPU (a base dependency, on every host)."""
    from edgepack.target import RuntimeSpec

    return RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")


# ---------------------------------------------------------------- kernels

# ONNX Runtime ops that run integer arithmetic (QDQ models are fused into QLinear*/QGemm at load time).
_INT_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
            "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits", "QGemm", "QAttention",
            "QEmbedLayerNormalization", "QOrderedMatMul", "MatMulBnb4", "GatherBlockQuantized"}
_INT_TYPES = ("int8", "uint8", "int4", "uint4", "i8", "u8", "i4", "u4")


def is_int_kernel(op: str, exec_type: str = "", input_types: tuple[str, ...] = ()) -> bool:
    """Whether a kernel runs integer arithmetic: an integer op by name (QLinear*, DynamicQuantizeMatMul), one
    whose data input is an integer tensor (an NhwcMaxPool on uint8), or an OpenVINO kernel whose exec type
    ends in its integer precision ("jit_avx512_I8")."""
    if exec_type:
        return exec_type.lower().replace("-", "_").split("_")[-1] in _INT_TYPES
    if op.startswith("QLinear") or op in _INT_OPS:
        return True
    return bool(input_types) and input_types[0].lower() in _INT_TYPES


def kernel_summary(profile: list[dict]) -> dict[str, Any]:
    """Count integer vs float op types in an `op_profile` and the share of time spent in integer kernels."""
    int_ms = sum(p["ms"] for p in profile if p["int"])
    total = sum(p["ms"] for p in profile)
    return {
        "int_ops": sum(1 for p in profile if p["int"]),
        "float_ops": sum(1 for p in profile if not p["int"]),
        "int_time_share": int_ms / total if total > 0 else 0.0,
    }


def finish_profile(groups: dict[str, dict], iterations: int) -> list[dict]:
    """Turn {op: {"runs": [µs per run], "int": bool, "device": str, ...}} into op_profile entries, slowest first:
    each op's time is its median over the runs (a median is not pulled by the odd slow run, so the ops add
    up to about the model's p50)."""
    rows = []
    for op, g in groups.items():
        runs = list(g.pop("runs"))
        runs += [0.0] * max(0, iterations - len(runs))  # runs where the op did not appear
        rows.append({"op": op, "ms": float(np.median(runs)) / 1000.0, **g})
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    return sorted(rows, key=lambda r: -r["ms"])


PROFILE_RUNS = 50  # runs an operator profile takes its medians over


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------- sessions

class Session:
    """A loaded model on one runtime/device: the runner's Model plus what pack needs around it."""

    runtime: str = ""

    def __init__(self, model: runner.Model, *, inputs: list[TensorSpec], outputs: list[TensorSpec], requested: str,
                 settings: dict, rss_before: float):
        self.model, self.inputs, self.outputs, self.settings = model, inputs, outputs, settings
        self.device_used, self.requested = model.device_used, requested
        self.fell_back = self.device_used != requested
        self.load_ms = model.load_ms
        self.threads = int(settings.get("threads") or 0)
        self.first_ms: float | None = None
        self._rss_before = rss_before
        self.memory_mb = max(0.0, rss_mb() - rss_before)
        self.notes: list[str] = []
        self.path: Path | None = None  # the model file, set by the backend
        self._specs = [s.to_dict() for s in inputs]

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
        """Feeds matched to the inputs by the runner's own check (names, rank, fixed dims, safe casts)."""
        try:
            return runner.check_inputs(feeds, self._specs)
        except runner.InputError as e:
            raise DataError(str(e)) from None

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
        try:
            return [np.asarray(o) for o in self.model.run(feeds)]
        except Exception as e:  # the runtimes raise their own exception types
            raise DataError(f"{self.runtime} could not run the model on these inputs: {first_line(e)}",
                            hint="check the input shapes and values") from e

    def op_profile(self, feeds: dict[str, Any], iterations: int = 20) -> list[dict]:
        """Time per op type per inference: [{"op","ms","share","int","device",...}], slowest first."""
        raise RuntimeUnavailable(f"{self.runtime} has no operator profiler in edgepack")


def open_session(artifact: Artifact, spec: RuntimeSpec, *, threads: int = 0, fallback: bool = False,
                 settings: dict | None = None) -> Session:
    """Load `artifact` on the runtime/provider/device of `spec` with the runner's settings for it.

    Raises RuntimeUnavailable when the provider/device is absent here and `fallback` is False; with
    `fallback=True` the model runs on the entry's fallback (else the CPU) instead (`device_used` says so).
    """
    backend = get_backend(spec.runtime)
    if artifact.format not in backend.formats:
        raise ModelError(f"{artifact.path}: {backend.name} cannot run a {artifact.format.value} model",
                         hint="export it to ONNX first" if artifact.format is ModelFormat.TORCH
                         else "use a runtime entry that reads this format")
    if backend.info()[0] is None:
        raise RuntimeUnavailable(f"{backend.name} is not installed",
                                 hint=f"pip install edgepack[{backend.extra}]" if backend.extra else None)
    device = backend.device(spec)
    reason = backend.availability(device)
    settings = settings if settings is not None else backend.settings(spec, threads)
    if reason:
        if not fallback:
            raise RuntimeUnavailable(f"{backend.name}: {reason}",
                                     hint="run on a host that has it; `verify --provider` checks on the CPU")
        alt = spec.fallback if spec.fallback and not backend.availability(spec.fallback) else backend.cpu_device()
        log.info("%s absent here: running %s on %s (fidelity only)", device, artifact.path.name, alt)
        return backend.open(artifact, spec, alt, {**settings, **backend.fallback_settings()})
    return backend.open(artifact, spec, device, settings)


def call_runner(artifact: Artifact, opener) -> runner.Model:
    """Call one of the runner's openers; its RunError becomes RuntimeUnavailable or ModelError."""
    try:
        return opener()
    except runner.RunError as e:
        text = str(e)
        if "not available here" in text or "did not enable" in text or "not installed" in text:
            raise RuntimeUnavailable(text) from None
        raise ModelError(f"{text} ({artifact.path})",
                         hint="check the file with onnx.checker, or re-export the model") from None
