"""One batch: plan the jobs, skip the ones that resume, run the rest (locally or on Ray), write the board."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import EdgepackError
from .board import batch_doc, write_board
from .cores import default_jobs
from .plan import Job, make_jobs
from .store import Layout, resumable
from .tracker import Tracker


def run_batch(jobs_file: Path, out: Path, *, jobs: int | None = None, threads: int = 1, exclusive: bool = False,
              job_timeout: float | None = None, resume: bool = False, ray: str | None = None,
              shared_out: bool = False, console: Console | None = None, show: bool = True) -> dict[str, Any]:
    """Run every job of `jobs_file` into `out`; returns the batch.json document (also written to `out`)."""
    from .. import __version__

    if threads < 1:
        raise EdgepackError(f"--threads {threads}: must be 1 or more")
    if jobs is not None and jobs < 1:
        raise EdgepackError(f"--jobs {jobs}: must be 1 or more")
    if job_timeout is not None and job_timeout <= 0:
        raise EdgepackError(f"--job-timeout {job_timeout:g}: must be a positive number of seconds")
    if shared_out and not ray:
        raise EdgepackError("--shared-out is for --ray (local jobs always write into --out)")
    start = time.time()
    if ray:
        from .ray_exec import check_ray

        check_ray(ray)
    all_jobs = make_jobs(Path(jobs_file), threads=threads, timeout=job_timeout, version=__version__)
    layout = Layout(Path(out))
    layout.check(all_jobs)
    layout.clean()  # what a killed batch left behind
    workers = jobs or default_jobs(threads)
    executor: dict[str, Any] = {"kind": "ray" if ray else "local", "jobs": jobs if ray else workers,
                                "threads_per_job": threads, "exclusive_timing": exclusive, "resume": resume}
    warnings: list[str] = []
    interrupted = False
    tracker = Tracker(layout, all_jobs, version=__version__, console=console or Console(stderr=True), show=show)
    with tracker:
        try:
            todo = _resume(all_jobs, layout, tracker, workers) if resume else all_jobs
            if todo and ray:
                from .ray_exec import run_ray

                w, cluster = run_ray(todo, layout, tracker, address=ray, shared_out=shared_out,
                                     exclusive=exclusive, max_in_flight=jobs)
                warnings += w
                executor["ray"] = cluster
            elif todo:
                from .local import run_local

                warnings += run_local(todo, layout, tracker, workers=workers, threads=threads, exclusive=exclusive)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:  # a bug: still record what finished, then let the CLI report it
            layout.clean()
            _board(all_jobs, tracker, layout, jobs_file, start, executor, warnings, True)
            raise
        finally:
            layout.clean()
    return _board(all_jobs, tracker, layout, jobs_file, start, executor, warnings, interrupted)


def _board(jobs: list[Job], tracker: Tracker, layout: Layout, jobs_file: Path, start: float,
           executor: dict[str, Any], warnings: list[str], interrupted: bool) -> dict[str, Any]:
    from .. import __version__

    rows = [tracker.rows.get(j.id) or _not_run(j, interrupted) for j in jobs]
    doc = batch_doc(rows, {"edgepack_version": __version__, "jobs_file": str(jobs_file), "out": str(layout.out),
                           "wall_s": round(time.time() - start, 3), "executor": executor, "warnings": warnings,
                           "interrupted": interrupted})
    write_board(layout.out, doc)
    return doc


def _resume(jobs: list[Job], layout: Layout, tracker: Tracker, workers: int) -> list[Job]:
    """Skip jobs whose bundle was built from the same inputs and still verifies."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(lambda j: resumable(layout, j), jobs))
    todo = []
    for job, rec in zip(jobs, records):
        if rec is None:
            todo.append(job)
        else:
            tracker.skipped(job, rec)
    return todo


def _not_run(job: Job, interrupted: bool) -> dict[str, Any]:
    return {"id": job.id, "model": job.model, "target": job.target, "status": "interrupted" if interrupted
            else "missing", "error": "not run: the batch was interrupted" if interrupted else "not run",
            "digest": job.digest, "attempts": 0, "retries": 0, "summary": None, "warnings": []}
