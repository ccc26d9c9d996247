"""Report ⇄ report.json (schema in docs/report-schema.md): JSON-safe data out, validated dataclasses back in."""
from __future__ import annotations

import enum
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError
from edgepack.types import SCHEMA_VERSION, BenchResult, CandidateResult, Fidelity, Report, StepRecord


def _jsonable(v: Any) -> Any:
    """Enums to values, tuples to lists, Paths to str, numpy scalars to Python, floats to 6 significant digits."""
    if isinstance(v, enum.Enum):
        return _jsonable(v.value)
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None  # JSON has no NaN/Inf
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, dict):
        return {str(_jsonable(k)): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "tolist"):  # numpy scalar or array
        return _jsonable(v.tolist())
    return str(v)


def report_to_dict(report: Report) -> dict:
    """The report as JSON-safe data (schema_version 1, see docs/report-schema.md)."""
    return {"schema_version": SCHEMA_VERSION, "kind": "report", **_jsonable(report)}


def _build(cls, d: Any, where: str, convert: dict | None = None):
    """Make dataclass `cls` from dict `d`: unknown keys ignored (additive fields keep version 1)."""
    if not isinstance(d, dict):
        raise EdgepackError(f"{where}: expected an object, got {type(d).__name__}",
                            hint="the file is not an edgepack report; write it again with `edgepack pack`")
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            if v is None and f.type == "float":  # NaN/Inf were written as null
                v = math.nan
            if f.type in ("float", "int") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise EdgepackError(f"{where}.{f.name}: expected a number, got {v!r}",
                                    hint="the file was edited or is damaged; write it again with `edgepack pack`")
            kwargs[f.name] = convert[f.name](v, f"{where}.{f.name}") if convert and f.name in convert else v
    missing = [f.name for f in fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise EdgepackError(f"{where}: missing field(s) {', '.join(missing)}",
                            hint="the file is not an edgepack report of schema_version 1")
    return cls(**kwargs)


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _tup(v, where):
    if v is None:
        return ()
    if not isinstance(v, list):
        raise EdgepackError(f"{where}: expected a list, got {type(v).__name__}")
    return tuple(v)


def _opt(fn):
    return lambda v, where: None if v is None else fn(v, where)


def bench_result(d, where) -> BenchResult:
    return _build(BenchResult, d, where, {"p50_ci95": _tup, "samples_ms": _tup, "block_sizes": _tup,
                                          "block_rounds": _tup})


def _candidate(d, where) -> CandidateResult:
    steps = lambda v, w: tuple(_build(StepRecord, s, f"{w}[{i}]") for i, s in enumerate(_tup(v, w)))
    return _build(CandidateResult, d, where, {
        "steps": steps, "fidelity": _opt(lambda v, w: _build(Fidelity, v, w, {"outputs": _tup})), "latency": _opt(bench_result),
        "notes": _tup, "files": _tup})


def report_from_dict(d: dict, source: str = "report") -> Report:
    """Read back what report_to_dict wrote. Raises EdgepackError naming `source` and the field that is wrong."""
    if not isinstance(d, dict):
        raise EdgepackError(f"{source}: not an edgepack report (top level is {type(d).__name__})")
    version = d.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise EdgepackError(f"{source}: schema_version {version!r} is not supported (this edgepack reads "
                            f"{SCHEMA_VERSION})", hint="upgrade edgepack or write the report again")
    cands = lambda v, w: tuple(_candidate(c, f"{w}[{i}]") for i, c in enumerate(_tup(v, w)))
    return _build(Report, d, source, {"candidates": cands, "op_profile": _tup, "batch_sweep": _tup,
                                      "warnings": _tup})


def read_json(path: Path) -> Any:
    from edgepack.safeio import parse_json, read_text

    try:
        return parse_json(read_text(path, "JSON file"))
    except OSError as e:
        raise EdgepackError(f"{path}: cannot read: {e.strerror}", hint="check the path") from e
    except ValueError as e:
        raise EdgepackError(f"{path}: not valid JSON: {e}",
                            hint="give a report.json written by `edgepack pack` or a profile JSON") from e


def read_report(path: Path) -> Report:
    """Load a report.json file."""
    return report_from_dict(read_json(path), str(path))
