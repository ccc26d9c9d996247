"""Errors a user can cause. Every one carries a message that says what happened and what to do.

    EdgepackError            exit 1
    ├── ModelError           missing, corrupt or unsupported model file
    ├── TargetError          unknown target, invalid profile file
    ├── DataError            calibration/eval/train data missing or not matching the model
    ├── StepError            a compression step cannot run or failed
    ├── RuntimeUnavailable   a runtime, provider or device is absent
    ├── BundleError          bundle exists, fails verification, unsafe archive
    ├── BudgetError          accuracy budget not met (with --strict)   exit 3
    └── Interrupted          SIGINT/SIGTERM during a run                 exit 130
"""
from __future__ import annotations

import re


class EdgepackError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class ModelError(EdgepackError):
    pass


class TargetError(EdgepackError):
    pass


class DataError(EdgepackError):
    pass


class StepError(EdgepackError):
    pass


class RuntimeUnavailable(EdgepackError):
    pass


class BundleError(EdgepackError):
    pass


class BudgetError(EdgepackError):
    exit_code = 3


class Interrupted(EdgepackError):
    exit_code = 130


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    """A third-party error's message on one line (ANSI colours dropped, at most 300 characters)."""
    text = _ANSI.sub("", str(e)).strip()
    lines = text.splitlines()
    first = lines[0].strip() if lines else type(e).__name__
    if first.endswith(":") and len(lines) > 1:  # "... of node:\nname: OpType: Relu\n is not ...": keep the sense
        first = " ".join(" ".join(ln.split()) for ln in lines[:4] if ln.strip())
    return first[:300]


def validation_message(err: Exception, where: str) -> str:
    """A pydantic ValidationError as one line: where, the field path of the first problem, and why."""
    errors = err.errors() if hasattr(err, "errors") else []
    if not errors:
        return f"{where}: {first_line(err)}"
    first = errors[0]
    path = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" ({len(errors)} problems in all)" if len(errors) > 1 else ""
    return f"{where}: {path}: {msg}{more}"
