"""jobs.toml: models (with their data and recipe) and targets, their product or a list of jobs, per-job overrides.

    [defaults]                    # optional; any option below, for every job
    bench_time = 0.5

    [[models]]
    name = "digits"               # the folder under --out
    model = "samples/digits/model.onnx"
    calib = "samples/digits/calib.npz"
    eval = "samples/digits/eval.npz"

    targets = ["cpu-x86", "intel-cpu"]          # or [[targets]] tables: name, profile = "my.toml", options

    [[jobs]]                      # optional: without it, every model × every target
    model = "digits"
    target = "intel-cpu"
    max_drop = 0.5                # overrides for this job

Options (at every level; the most specific wins: defaults < model < target < job): recipe, precision,
max_drop, bench_time, seed, guard, batch, strict, allow_pickle, input_shape, args (extra pack flags,
verbatim), timeout (seconds), gpus. Relative paths are relative to the jobs file.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import EdgepackError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RESERVED = ("--out", "-o", "--json", "--force", "--target", "-t", "--threads", "--dry-run", "--save-recipe")


class JobsFileError(EdgepackError):
    """jobs.toml is missing, not TOML, or names a bad key or file."""


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: Optional[str] = None
    precision: Optional[list[str]] = None
    max_drop: Optional[float] = Field(default=None, ge=0, le=100)
    bench_time: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = None
    guard: Optional[bool] = None
    batch: Optional[list[int]] = None
    strict: Optional[bool] = None
    allow_pickle: Optional[bool] = None
    input_shape: Optional[dict[str, list[int]]] = None
    args: Optional[list[str]] = None
    timeout: Optional[float] = Field(default=None, gt=0)
    gpus: Optional[int] = Field(default=None, ge=0)


class ModelEntry(Options):
    name: str
    model: str
    calib: Optional[str] = None
    eval: Optional[str] = None
    train: Optional[str] = None
    weights: Optional[str] = None


class TargetEntry(Options):
    name: str
    profile: Optional[str] = None  # a target .toml; default: `name` is a shipped target


class JobEntry(Options):
    model: str
    target: str


class JobsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaults: Options = Options()
    models: list[ModelEntry] = Field(min_length=1)
    targets: list[Union[str, TargetEntry]] = []
    jobs: list[JobEntry] = []
    product: Optional[bool] = None  # default: true without [[jobs]]


@dataclass(frozen=True)
class JobPlan:
    """One job before hashing: names, what pack gets, and the files it reads (role -> path)."""

    model: str
    target: str
    model_ref: str
    target_ref: str
    files: dict[str, str]  # role (model, calib, eval, train, weights, recipe, target) -> absolute path
    options: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.model}/{self.target}"


def load_jobs(path: Path) -> list[JobPlan]:
    """Parse and check jobs.toml; every error names the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobsFileError(f"{path}: no such jobs file") from None
    except tomllib.TOMLDecodeError as e:
        raise JobsFileError(f"{path}: not valid TOML: {e}") from None
    try:
        spec = JobsFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise JobsFileError(f"{path}: {_where(first['loc'])}: {msg}") from None
    return _plan(spec, path)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "TargetEntry"):  # union branch names pydantic adds
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _plan(spec: JobsFile, path: Path) -> list[JobPlan]:
    base = path.resolve().parent
    models = _named(spec.models, "models", path)
    targets = _named([TargetEntry(name=t) if isinstance(t, str) else t for t in spec.targets], "targets", path)
    product = spec.product if spec.product is not None else not spec.jobs
    if product and not targets:
        raise JobsFileError(f"{path}: targets: at least one target is needed for the models × targets product")
    pairs: dict[tuple[str, str], JobEntry | None] = {}
    if product:
        pairs = {(m, t): None for m in models for t in targets}
    for i, j in enumerate(spec.jobs):
        if j.model not in models:
            raise JobsFileError(f"{path}: jobs[{i}].model: no [[models]] entry named '{j.model}'")
        if (j.model, j.target) in pairs and pairs[(j.model, j.target)] is not None:
            raise JobsFileError(f"{path}: jobs[{i}]: {j.model}/{j.target} is listed twice")
        pairs[(j.model, j.target)] = j
    plans = []
    for (m, t), j in pairs.items():
        where = f"jobs[{spec.jobs.index(j)}]" if j else f"targets '{t}'"
        tgt = targets.get(t) or TargetEntry(name=t)
        if not NAME.match(tgt.name):
            raise JobsFileError(f"{path}: {where}: target name '{t}' must be letters, digits, '.', '_' or '-'")
        plans.append(_job(models[m], tgt, j, spec.defaults, base, path))
    return plans


def _named(entries: list, key: str, path: Path) -> dict:
    out = {}
    for i, e in enumerate(entries):
        if not NAME.match(e.name):
            raise JobsFileError(f"{path}: {key}[{i}].name: '{e.name}' must be letters, digits, '.', '_' or '-'")
        if e.name in out:
            raise JobsFileError(f"{path}: {key}[{i}].name: '{e.name}' is used twice")
        out[e.name] = e
    return out


def _job(m: ModelEntry, t: TargetEntry, j: JobEntry | None, defaults: Options, base: Path, path: Path) -> JobPlan:
    opts: dict[str, Any] = {}
    for level in (defaults, m, t, j):
        if level is not None:
            opts.update({k: v for k, v in level.model_dump(include=set(Options.model_fields)).items()
                         if v is not None})
    for a in opts.get("args") or ():
        if a.split("=")[0] in RESERVED:
            raise JobsFileError(f"{path}: args: {a} is set by edgepack batch and cannot be given per job")
    files = {}
    head, _, factory = m.model.partition(":")
    model_file, factory = (head, factory) if head.endswith(".py") and factory else (m.model, "")
    files["model"] = _file(model_file, base, path, f"models '{m.name}'.model")
    for role in ("calib", "eval", "train", "weights"):
        if getattr(m, role):
            files[role] = _file(getattr(m, role), base, path, f"models '{m.name}'.{role}")
    if opts.get("recipe"):
        files["recipe"] = _file(opts["recipe"], base, path, "recipe")
    target_ref = t.name
    if t.profile:
        files["target"] = target_ref = _file(t.profile, base, path, f"targets '{t.name}'.profile")
    model_ref = files["model"] + (f":{factory}" if factory else "")
    return JobPlan(m.name, t.name, model_ref, target_ref, files, opts)


def _file(value: str, base: Path, path: Path, key: str) -> str:
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise JobsFileError(f"{path}: {key}: no such file or folder: {value}")
    return str(p.resolve())


def pack_args(plan: JobPlan, files: dict[str, str], threads: int) -> list[str]:
    """The `edgepack pack` flags for a job (without MODEL, --target, --out and --json)."""
    o = plan.options
    args: list[str] = []
    for role in ("calib", "eval", "train", "weights", "recipe"):
        if role in files:
            args += [f"--{role}", files[role]]
    for p in o.get("precision") or ():
        args += ["--precision", p]
    for flag, key in (("--max-drop", "max_drop"), ("--bench-time", "bench_time"), ("--seed", "seed")):
        if o.get(key) is not None:
            args += [flag, _num(o[key])]
    if o.get("guard") is not None:
        args.append("--guard" if o["guard"] else "--no-guard")
    if o.get("batch"):
        args += ["--batch", ",".join(str(b) for b in o["batch"])]
    args += ["--strict"] if o.get("strict") else []
    args += ["--allow-pickle"] if o.get("allow_pickle") else []
    for name, dims in (o.get("input_shape") or {}).items():
        args += ["--input-shape", f"{name}={','.join(str(d) for d in dims)}"]
    return args + ["--threads", str(threads)] + list(o.get("args") or ())


def _num(v: float | int) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
