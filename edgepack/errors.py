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
