"""Verify a bundle: every file against the manifest, nothing unlisted, then the self-test in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgepack.bundle.archive import safe_extract
from edgepack.bundle.manifest import MANIFEST, load_manifest
from edgepack.errors import BundleError
from edgepack.runner import run as runner


def _bundle_root(extracted: Path) -> Path:
    if (extracted / MANIFEST).exists():
        return extracted
    dirs = [p for p in extracted.iterdir() if p.is_dir()]
    if len(dirs) == 1 and (dirs[0] / MANIFEST).exists():
        return dirs[0]
    raise BundleError(f"no {MANIFEST} at the top of the archive; it is not an edgepack bundle")


def verify_bundle(path: Path, *, selftest: bool = True, python: str = sys.executable,
                  provider: str | None = None) -> dict:
    """Check every file against the manifest, then run `run.py --selftest` in a subprocess.

    `path` is a bundle folder or its .tar.gz. `provider` overrides the ORT provider / OpenVINO device of the
    self-test. Returns {"files": n, "selftest": {...} or None}; BundleError lists the problems.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="edgepack-verify-") as d:
            safe_extract(path, Path(d))
            return verify_bundle(_bundle_root(Path(d)), selftest=selftest, python=python, provider=provider)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle folder nor a .tar.gz archive")
    manifest = load_manifest(path)
    problems = runner.check_files(path, manifest)
    listed = set(manifest["files"]) | {MANIFEST}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if "__pycache__" in p.relative_to(path).parts or p.is_dir() and not p.is_symlink():
            continue
        if rel not in listed:
            problems.append(f"{rel}: not listed in {MANIFEST}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        n = len(problems)
        raise BundleError(f"{path} failed verification, {n} problem{'s' if n > 1 else ''}: {shown}",
                          hint="the bundle changed after packing; restore it from its archive or re-pack")
    result: dict[str, Any] = {"files": len(manifest["files"]), "selftest": None}
    if selftest:
        result["selftest"] = _run_selftest(path, python, provider)
    return result


def _run_selftest(path: Path, python: str, provider: str | None) -> dict:
    from edgepack.runtimes import get_backend

    flag = get_backend(load_manifest(path)["runtime"]["name"]).runner_flag
    with tempfile.TemporaryDirectory(prefix="edgepack-selftest-") as d:
        out = Path(d) / "selftest.json"
        cmd = [python, "run.py", "--selftest", "--json", str(out)] + ([flag, provider] if provider else [])
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BundleError(f"could not run the self-test of {path}: {e}") from None
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        if proc.returncode != 0:
            raise BundleError(f"self-test of {path} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"self-test of {path} wrote no readable result ({e})") from None
        data["line"] = lines[0] if lines else ""
        return data
