"""Plain run-time types shared by every module (made at run time, never read from files)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.runner.run import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Artifact", "BenchResult", "CandidateResult", "Fidelity", "ModelFormat", "Precision",
           "Report", "StepRecord", "TensorSpec"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # compute precision of a runtime that has it (OpenVINO CPU on AVX512-BF16/AMX)
    INT8 = "int8"  # static, calibrated
    INT8_DYNAMIC = "int8-dynamic"
    INT4 = "int4"  # weight-only


class ModelFormat(str, enum.Enum):
    ONNX = "onnx"
    OPENVINO = "openvino"  # IR: .xml + .bin
    TORCH = "torch"  # an in-memory torch.nn.Module (from TorchScript, .pt2 or a factory)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str | None, ...]  # ints, symbolic names, or None for unknown

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Artifact:
    """A model at one point of the pipeline.

    path: the main file (.onnx, .xml) or the source file for torch models.
    files: every file that belongs to the model (external data, .bin), path included.
    module: the torch.nn.Module when format is TORCH (None otherwise).
    example_inputs: for TORCH, a tuple of example tensors used for export (may be None).
    """

    path: Path
    format: ModelFormat
    files: tuple[Path, ...] = ()
    module: Any = None
    example_inputs: Any = None
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props, carried to the bundle
    notes: tuple[str, ...] = ()

    def with_notes(self, *notes: str) -> Artifact:
        from dataclasses import replace

        return replace(self, notes=self.notes + tuple(notes))


@dataclass(frozen=True)
class StepRecord:
    """What one step did: shown in the report and the manifest."""

    kind: str
    params: dict[str, Any]
    changed: bool  # False when the step found nothing to change
    summary: str  # one line: "quantized 12 of 14 Conv/MatMul nodes", "nothing to change: no MatMul"
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class BenchResult:
    """Latency of one model on one runtime/device. All times in milliseconds."""

    runtime: str
    device: str  # provider or device actually used
    batch: int
    threads: int
    warmup: int
    iterations: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    p50_ci95: tuple[float, float]
    throughput: float  # samples per second (batch / mean)
    load_ms: float  # session creation / compile time
    first_ms: float  # first inference
    peak_memory_mb: float  # RSS growth while loading and running
    cv: float  # coefficient of variation (std / mean)
    samples_ms: tuple[float, ...] = ()  # raw per-iteration times (for plots)
    block_sizes: tuple[int, ...] = ()  # runs per interleaved timing block, in order (samples_ms split by them)
    block_rounds: tuple[int, ...] = ()  # per block, the timing round it ran in (the j-th blocks of a round: side by side)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["p50_ci95"] = list(self.p50_ci95)
        d["samples_ms"] = [round(x, 4) for x in self.samples_ms]
        d["block_sizes"] = list(self.block_sizes)
        d["block_rounds"] = list(self.block_rounds)
        return d


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a candidate's outputs with the fp32 reference (and accuracy when labels exist)."""

    n: int
    top1_agreement: float | None
    cosine: float
    max_abs_diff: float
    accuracy: float | None = None  # with labels
    outputs: tuple[dict[str, Any], ...] = ()  # per output: kind, metric, value, threshold, passed (fidelity.py)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class CandidateResult:
    """One candidate as built and measured. status: "ok", "failed" (error says why) or "skipped"."""

    name: str  # e.g. "onnxruntime-int8"
    runtime: str
    device: str  # provider/device the target asks for
    precision: str
    status: str
    steps: tuple[StepRecord, ...] = ()
    error: str | None = None
    size_bytes: int = 0
    compressed_bytes: int = 0
    fidelity: Fidelity | None = None
    latency: BenchResult | None = None
    latency_note: str | None = None  # "not measured: CUDAExecutionProvider not available on this host"
    kernels: dict[str, Any] | None = None  # {"int_ops": n, "float_ops": n, "int_time_share": x, ...}
    within_budget: bool | None = None
    notes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # model files, relative to the candidate's directory


@dataclass(frozen=True)
class Report:
    """Everything pack measured; written as report.json (schema below), report.md and report.html."""

    schema_version: int
    edgepack_version: str
    created: str  # ISO 8601 UTC
    target: dict[str, Any]  # name, description, source, runtimes
    host: dict[str, Any]  # HostInfo.to_dict() plus threads used
    model: dict[str, Any]  # source, sha256, format, inputs, outputs, parameters, metadata
    budget: dict[str, Any]  # {"max_drop": 0.01, "metric": "accuracy"|"fidelity", ...}
    candidates: tuple[CandidateResult, ...]
    baseline: str | None  # name of the fp32 reference candidate
    chosen: str | None
    reason: str
    op_profile: tuple[dict[str, Any], ...] = ()  # chosen candidate: [{"op": "Conv", "ms": .., "share": .., "int": bool, "device": ..}]
    batch_sweep: tuple[dict[str, Any], ...] = ()  # [{"candidate":.., "batch":.., "p50":.., "throughput":..}]
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # technique-specific sections (pruning, distillation, ...)
