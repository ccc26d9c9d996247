"""--out: bundles at <out>/<model>/<target>/, each with <target>.job.json (digest, status, summary) and <target>.log.

A bundle only ever appears by rename from <out>/.work/, so an interrupted batch leaves no half-written one.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from ..errors import EdgepackError
from .plan import Job, edgepack_cmd


class OutputError(EdgepackError):
    """--out holds something edgepack batch must not replace."""


class Layout:
    def __init__(self, out: Path):
        self.out = Path(out).resolve()  # workers and packs run elsewhere: absolute paths only

    def bundle(self, job: Job) -> Path:
        return self.out / job.model / job.target

    def record(self, job: Job) -> Path:
        return self.out / job.model / f"{job.target}.job.json"

    def log(self, job: Job) -> Path:
        return self.out / job.model / f"{job.target}.log"

    def scratch(self, job: Job) -> Path:
        return self.work / job.model / job.target

    def marker(self, job: Job) -> Path:
        """Written while the job runs: its attempt, pid and host (what a test kills)."""
        return self.work / job.model / f"{job.target}.running.json"

    @property
    def work(self) -> Path:
        return self.out / ".work"

    @property
    def lock(self) -> Path:
        return self.out / ".timing.lock"

    def check(self, jobs: list[Job]) -> None:
        """Refuse to run when a job's bundle folder exists and is not an edgepack bundle."""
        for job in jobs:
            b = self.bundle(job)
            if b.exists() and not (b / "manifest.json").is_file():
                raise OutputError(f"{b} exists and is not an edgepack bundle; edgepack batch only replaces bundles")
        self.out.mkdir(parents=True, exist_ok=True)

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.lock.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def install(layout: Layout, job: Job, built: Path) -> Path:
    """Move a finished bundle into place, replacing an older one."""
    final = layout.bundle(job)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = layout.work / job.model / f"{job.target}.old"
        shutil.rmtree(old, ignore_errors=True)
        old.parent.mkdir(parents=True, exist_ok=True)
        os.rename(final, old)
    os.rename(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verifies(bundle: Path) -> tuple[bool, str]:
    """`edgepack verify` (hashes and self-test); its one-line error when it fails."""
    if not (bundle / "manifest.json").is_file():
        return False, "no bundle"
    p = subprocess.run(edgepack_cmd("verify", str(bundle), "--json"), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    return p.returncode == 0, (lines[-1][7:] if lines else f"exit code {p.returncode}")


def resumable(layout: Layout, job: Job) -> dict | None:
    """The stored record when the job's bundle was built from the same inputs and still verifies."""
    rec = read_json(layout.record(job))
    if not rec or rec.get("status") != "ok" or rec.get("digest") != job.digest:
        return None
    ok, _ = verifies(layout.bundle(job))
    return rec if ok else None


def tar_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname="bundle")
    return buf.getvalue()


def untar_bundle(blob: bytes, dest: Path) -> Path:
    """Unpack a worker's bundle under `dest` (no links, nothing outside it); returns the bundle folder."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(dest, filter="data")
    return dest / "bundle"
