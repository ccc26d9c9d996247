"""From jobs.toml entries to Jobs: files hashed, pack flags fixed, target profiles resolved, digests computed."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .inputs import InputFile, input_files, job_digest, remap, sha256_file
from .jobs import JobPlan, JobsFileError, load_jobs, pack_args

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def edgepack_cmd(*args: str) -> list[str]:
    """The real `edgepack` command line, run by this interpreter."""
    return [sys.executable, "-m", "edgepack", *args]


@dataclass(frozen=True)
class Job:
    """One pack: everything a worker needs, picklable; `digest` identifies its inputs."""

    model: str
    target: str
    model_ref: str
    target_ref: str
    args: tuple[str, ...]
    inputs: tuple[InputFile, ...]
    threads: int
    gpus: int
    timeout: float | None
    digest: str

    @property
    def id(self) -> str:
        return f"{self.model}/{self.target}"

    def pack_command(self, out: str, mapping: dict[str, str] | None = None) -> list[str]:
        m = mapping or {}
        return ["pack", remap(self.model_ref, m), "--target", remap(self.target_ref, m), "--out", out,
                *(remap(a, m) for a in self.args), "--json"]


def make_jobs(jobs_file: Path, *, threads: int, timeout: float | None, version: str) -> list[Job]:
    plans = load_jobs(jobs_file)
    refs = sorted({p.target_ref for p in plans})
    with ThreadPoolExecutor(max_workers=4) as pool:
        profiles = dict(zip(refs, pool.map(lambda r: _profile(r, jobs_file), refs)))
        inputs = list(pool.map(lambda p: input_files(p.files), plans))
    return [_job(p, ins, profiles[p.target_ref], threads, timeout, version) for p, ins in zip(plans, inputs)]


def _job(p: JobPlan, inputs: list[InputFile], profile: dict, threads: int, timeout, version: str) -> Job:
    args = pack_args(p, p.files, threads)
    wants_gpu = any(r.get("provider") in GPU_PROVIDERS for r in profile.get("runtimes", []))
    gpus = p.options.get("gpus", 1 if wants_gpu else 0)
    digest = job_digest(p.model_ref, args, inputs, {k: v for k, v in profile.items() if k != "source"}, version)
    return Job(p.model, p.target, p.model_ref, p.target_ref, tuple(args), tuple(inputs), threads, gpus,
               p.options.get("timeout", timeout), digest)


def _profile(ref: str, jobs_file: Path) -> dict:
    """The resolved target profile, from `edgepack targets show` (its own error when the target is unknown)."""
    stamp = sha256_file(ref) if Path(ref).is_file() else ""
    ok, text = _targets_show(ref, stamp)
    if not ok:
        raise JobsFileError(f"{jobs_file}: target '{ref}': {text}")
    return json.loads(text)["profile"]


@functools.lru_cache(maxsize=64)
def _targets_show(ref: str, stamp: str) -> tuple[bool, str]:
    p = subprocess.run(edgepack_cmd("targets", "show", ref, "--json"), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        return False, lines[-1].removeprefix("error: ") if lines else f"exit code {p.returncode}"
    return True, p.stdout
