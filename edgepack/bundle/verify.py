"""Verify a bundle: every file against the manifest, nothing unlisted, then the self-test in a subprocess."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.bundle.archive import safe_extract
from edgepack.bundle.manifest import MANIFEST, SIGNATURE, bundle_problems, load_manifest
from edgepack.errors import BundleError
from edgepack.runner import run as runner
from edgepack.tempdirs import make_temp

RUNNER = Path(runner.__file__)  # edgepack's own runner: the self-test runs this, never the bundle's run.py


def _bundle_root(extracted: Path) -> Path:
    if (extracted / MANIFEST).exists():
        return extracted
    dirs = [p for p in extracted.iterdir() if p.is_dir()]
    if len(dirs) == 1 and (dirs[0] / MANIFEST).exists():
        return dirs[0]
    raise BundleError(f"no {MANIFEST} at the top of the archive; it is not an edgepack bundle")


def verify_bundle(path: Path, *, selftest: bool = True, python: str = sys.executable,
                  provider: str | None = None, trusted_key: Path | None = None,
                  allow_custom_runner: bool = False) -> dict:
    """Check every file against the manifest (nothing unlisted, run.py is edgepack's own runner), the
    signature against `trusted_key` when given, then run edgepack's runner's self-test in a subprocess.

    `path` is a bundle folder or its .tar.gz. `provider` overrides the ORT provider / OpenVINO device of the
    self-test. Returns {"files": n, "selftest": {...} or None, "signature": {...} or None, "runner": ...};
    BundleError lists the problems.
    """
    path = Path(path)
    if path.is_file():
        d = make_temp("verify")
        try:
            safe_extract(path, d)
            return verify_bundle(_bundle_root(d), selftest=selftest, python=python, provider=provider,
                                 trusted_key=trusted_key, allow_custom_runner=allow_custom_runner)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle folder nor a .tar.gz archive")
    manifest = load_manifest(path)
    problems = bundle_problems(path, manifest)
    custom = _runner_problem(path, manifest)
    if custom and not allow_custom_runner:
        problems.append(custom + " (pass --allow-custom-runner to accept it; the self-test runs edgepack's own "
                                 "runner either way)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        n = len(problems)
        raise BundleError(f"{path} failed verification, {n} problem{'s' if n > 1 else ''}: {shown}",
                          hint="the bundle changed after packing; restore it from its archive or re-pack")
    result: dict[str, Any] = {"files": len(manifest["files"]), "selftest": None, "signature": None,
                              "runner": custom or "run.py is edgepack's own runner"}
    if trusted_key is not None:
        from edgepack.bundle.sign import check_signature

        result["signature"] = check_signature(path, Path(trusted_key))
    elif (path / SIGNATURE).is_file():
        from edgepack.bundle.sign import describe_signature

        result["signature"] = describe_signature(path)
    if selftest:
        result["selftest"] = _run_selftest(path, python, provider)
    return result


def _runner_problem(path: Path, manifest: dict) -> str | None:
    """Why the bundle's run.py is not edgepack's own runner for its schema, or None."""
    if "run.py" not in manifest["files"]:
        return f"run.py: missing (not listed in {MANIFEST})"
    own = runner.sha256_file(RUNNER)
    if manifest["files"]["run.py"].get("sha256") == own:
        return None
    made_by = manifest.get("edgepack_version")
    why = f"packed by edgepack {made_by}" if made_by != __version__ else "changed after packing"
    return f"run.py: differs from edgepack {__version__}'s runner ({why}; sha256 {own[:12]} expected)"


def _run_selftest(path: Path, python: str, provider: str | None) -> dict:
    from edgepack.runtimes import get_backend

    flag = get_backend(load_manifest(path)["runtime"]["name"]).runner_flag
    d = make_temp("selftest")
    try:
        out = d / "selftest.json"
        # -I: neither the bundle nor the working directory can put a module on sys.path; -B: no .pyc anywhere
        cmd = [python, "-I", "-B", str(RUNNER), "--bundle", str(path.resolve()), "--selftest", "--json", str(out)]
        cmd += [flag, provider] if provider else []
        try:
            proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=900)
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
    finally:
        shutil.rmtree(d, ignore_errors=True)
