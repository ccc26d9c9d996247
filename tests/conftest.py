"""Shared fixtures: the samples, and one real pack of the digits sample per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "digits"
TRANSFORMER = ROOT / "samples" / "tiny-transformer"
BENCH_TIME = "0.3"  # seconds of timing per candidate: enough for ordering at ms scale, short for CI


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None, timeout: int = 900,
            isolated: bool = False):
    """Run the `edgepack` command; returns a CompletedProcess.

    In-process with Typer's CliRunner (fast) unless `isolated`, `env` or `cwd` ask for a real subprocess
    (signals, environment variables, a process of its own).
    """
    if isolated or env or cwd:
        e = dict(os.environ, **(env or {}))
        e.setdefault("COLUMNS", "200")
        p = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=e,
                           cwd=cwd, timeout=timeout)
    else:
        from typer.testing import CliRunner

        from edgepack.cli import app

        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)
        p = subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
    if check and p.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "digits"
    run_cli("pack", str(DIGITS / "model.onnx"), "--target", "cpu-x86", "--calib", str(DIGITS / "calib.npz"),
            "--eval", str(DIGITS / "eval.npz"), "--out", str(out), "--bench-time", BENCH_TIME, "--archive",
            "--batch", "1,4")
    return out
