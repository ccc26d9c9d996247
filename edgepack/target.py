"""Target profiles: validated, frozen descriptions of a device and the compression that suits it.

Profiles live in ``targets/*.toml`` (shipped inside the package as ``edgepack/targets``); a user's own
TOML file is accepted by path, and ``extends = "cpu-x86"`` derives one profile from another.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.errors import TargetError, validation_message
from edgepack.safeio import check_regular, parse_toml, read_text
from edgepack.types import Precision

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # a target name: never a path
_LIBRARY_OPTIONS = ("backend_path",)  # a shared library the system loader finds by name (runner/run.py too)


def is_identifier(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name


def _option_path_problem(key: str, value) -> str | None:
    """Provider options that name files must stay inside the bundle (relative, no '..'); libraries by name."""
    if not isinstance(value, str) or not value:
        return None
    if key in _LIBRARY_OPTIONS:
        return None if "/" not in value and "\\" not in value else "give a library name (e.g. libQnnHtp.so), not a path"
    if key.endswith(("_path", "_dir", "_file")):
        pure = PurePath(value.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or value.startswith(("/", "~")) or ":" in value:
            return "a path here must be relative and stay inside the bundle"
    return None
QType = Literal["int8", "uint8", "int16", "uint16"]


class RuntimeSpec(BaseModel):
    """One way to run the target: a runtime plus its provider (ONNX Runtime) or device (OpenVINO)."""

    model_config = _FROZEN
    runtime: str  # a key of edgepack.runtimes.BACKENDS
    provider: str | None = None  # ONNX Runtime execution provider, e.g. "CUDAExecutionProvider"
    provider_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    device: str | None = None  # OpenVINO device: "CPU", "GPU", "NPU"
    inference_precision: Literal["f32", "f16", "bf16"] | None = None  # OpenVINO hint, always pinned
    fallback: str | None = None  # provider/device used to check fidelity when the real one is absent
    disabled_optimizers: tuple[str, ...] = ()  # ONNX Runtime graph optimizers turned off by name

    @model_validator(mode="after")
    def _check(self) -> RuntimeSpec:
        from edgepack.runtimes import BACKENDS, get_backend

        if self.runtime not in BACKENDS:
            raise ValueError(f"unknown runtime {self.runtime!r}; known: {', '.join(BACKENDS)}")
        for k, v in self.provider_options.items():
            why = _option_path_problem(k, v)
            if why:
                raise ValueError(f"provider_options.{k} = {v!r}: {why}")
        if self.disabled_optimizers and self.runtime != "onnxruntime":
            raise ValueError("disabled_optimizers is an onnxruntime setting")
        get_backend(self.runtime).check_spec(self)
        return self

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.provider or self.device}"


class QuantScheme(BaseModel):
    model_config = _FROZEN
    activation_type: QType = "uint8"
    weight_type: QType = "int8"
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    per_channel: bool = True
    format: Literal["qdq", "qoperator"] = "qdq"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()  # empty: the quantizer's default set
    calibration_samples: int = 128


class ShapePolicy(BaseModel):
    model_config = _FROZEN
    policy: Literal["dynamic", "static"] = "dynamic"
    batch: int = 1  # the batch size fixed when policy is static
    static: dict[str, tuple[int, ...]] = Field(default_factory=dict)  # explicit shapes per input


class OpsetRange(BaseModel):
    model_config = _FROZEN
    min: int = 13
    max: int = 21


class BenchSettings(BaseModel):
    model_config = _FROZEN
    threads: int = 0  # 0: all physical cores of the host
    warmup: int = 10
    min_iterations: int = 20
    max_iterations: int = 2000
    time_budget_s: float = 2.0  # pack: shared by the candidates in the race; profile: per model


class Budgets(BaseModel):
    model_config = _FROZEN
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None


class FidelityThresholds(BaseModel):
    """Used when no labels exist: a candidate must agree with fp32 at least this well."""

    model_config = _FROZEN
    min_top1_agreement: float = 0.99  # class scores
    min_cosine: float = 0.999  # all outputs flattened (reported; judged only when no output kind applies)
    min_detection_f1: float = 0.9  # detector scores: anchors above half the best score, reference vs candidate
    min_box_iou: float = 0.85  # detector boxes on the detected anchors
    min_sequence_agreement: float = 0.98  # share of identical greedy-decoded sequences
    min_embedding_cosine: float = 0.99  # mean cosine per sample
    min_nn_agreement: float = 0.9  # nearest-neighbour agreement of embeddings
    min_sqnr_db: float = 20.0  # regression outputs: signal-to-quantization-noise ratio


class Target(BaseModel):
    """A device profile. Read from TOML; unknown keys and wrong types are errors."""

    model_config = _FROZEN
    name: str
    description: str
    extends: str | None = None
    arch: Literal["any", "x86_64", "aarch64"] = "any"  # CPU architecture latency is only valid on
    runtimes: tuple[RuntimeSpec, ...]
    precisions: tuple[Precision, ...]  # candidates to build, in order of preference
    quantization: QuantScheme = QuantScheme()
    shapes: ShapePolicy = ShapePolicy()
    opset: OpsetRange = OpsetRange()
    bench: BenchSettings = BenchSettings()
    budgets: Budgets = Budgets()
    fidelity: FidelityThresholds = FidelityThresholds()
    source: str = ""  # file it was read from (filled by load_target)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not is_identifier(v):
            raise ValueError(f"{v!r} is not a plain name (letters, digits, '-', '_', '.', at most 64; "
                             "it names output folders)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Target:
        if not self.runtimes:
            raise ValueError("'runtimes' must name at least one runtime")
        if not self.precisions:
            raise ValueError("'precisions' must name at least one precision")
        if self.opset.min > self.opset.max:
            raise ValueError("opset.min is above opset.max")
        return self


def targets_dir() -> Path:
    """Directory of the shipped profiles (inside the package when installed, else the repo's targets/)."""
    inside = Path(__file__).parent / "targets"
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / "targets"


def list_targets() -> list[Target]:
    return [load_target(p.stem) for p in sorted(targets_dir().glob("*.toml"))]


def target_names() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        return parse_toml(read_text(path, "target file", TargetError))
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from e


def _locate(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not (p.exists() or p.is_symlink()):
            raise TargetError(f"target file {p} does not exist")
        check_regular(p, "target file", TargetError)
        return p
    shipped = targets_dir() / f"{name_or_path}.toml"
    if not is_identifier(str(name_or_path)) or not shipped.is_file():
        known = ", ".join(target_names())
        raise TargetError(
            f"unknown target '{name_or_path}'", hint=f"known targets: {known}; or give a path to a .toml file"
        )
    return shipped


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _extends(path: Path, parent: str, root: Path) -> Path:
    """The file `extends = parent` names: a shipped target by name, or a .toml file inside `root` (the folder
    of the file the user named); never any other path."""
    if not parent.endswith(".toml"):
        if not is_identifier(parent):
            raise TargetError(f"{path}: extends = {parent!r}: not a target name; name a shipped target or a .toml "
                              f"file next to {path.name}")
        shipped = targets_dir() / f"{parent}.toml"  # never a file in the working directory
        if not shipped.is_file():
            raise TargetError(f"unknown target '{parent}'",
                              hint=f"known targets: {', '.join(target_names())}; or give a path to a .toml file")
        return shipped
    pure = PurePath(parent)
    candidate = (path.parent / parent).resolve()
    if pure.is_absolute() or ".." in pure.parts or not candidate.is_relative_to(root.resolve()):
        raise TargetError(f"{path}: extends = {parent!r}: only .toml files in {root.resolve()} (the folder of the "
                          "target file you named) or shipped target names are allowed")
    return _locate(path.parent / parent)


def _resolve(path: Path, chain: tuple[str, ...], root: Path | None = None) -> dict:
    root = root if root is not None else path.parent
    raw = _read_toml(path)
    key = str(path.resolve())
    if key in chain:
        cycle = " -> ".join(Path(c).stem for c in chain + (key,))
        raise TargetError(f"{path}: 'extends' forms a cycle: {cycle}")
    parent = raw.get("extends")
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise TargetError(f"{path}: 'extends' must be a target name or a path")
    try:
        base_path = _extends(path, parent, root)
    except TargetError as e:
        raise (e if str(e).startswith(f"{path}: ") else TargetError(f"{path}: extends = {parent!r}: {e}")) from None
    base = _resolve(base_path, chain + (key,), root if base_path.resolve().is_relative_to(root.resolve())
                    else base_path.parent)
    base.pop("name", None)  # a derived profile is named by its own file
    return _merge(base, raw)


def load_target(name_or_path: str | Path) -> Target:
    """Load a profile by shipped name (``cpu-x86``) or by path to a TOML file."""
    path = _locate(name_or_path)
    data = _resolve(path, ())
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    try:
        return Target.model_validate(data)
    except ValidationError as e:
        raise TargetError(validation_message(e, str(path))) from e
