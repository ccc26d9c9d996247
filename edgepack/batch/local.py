"""Local executor: at most --jobs packs at once, each its own process pinned to its own physical cores.

A pack killed from outside (OOM killer, a signal) counts as a lost worker: retried once, then reported.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from .cores import core_slots
from .plan import Job
from .run_job import JobResult, run_job, stop
from .store import Layout, install
from .tracker import Tracker


def run_local(jobs: list[Job], layout: Layout, tracker: Tracker, *, workers: int, threads: int,
              exclusive: bool) -> list[str]:
    """Run every job; returns batch-level warnings. KeyboardInterrupt stops running packs and re-raises."""
    slots, warning = core_slots(workers, threads)
    free: queue.Queue = queue.Queue()
    for s in slots or [None] * workers:
        free.put(s)
    cancel = threading.Event()
    procs: set[subprocess.Popen] = set()
    host = socket.gethostname()

    def one(job: Job) -> None:
        cpus = free.get()
        try:
            res = _attempts(job, cpus)
            ok = False
            if res.status == "ok":
                try:
                    install(layout, job, layout.scratch(job) / "bundle")
                    ok = True
                except OSError as e:
                    res.status, res.error = "failed", f"could not move the bundle into {layout.bundle(job)}: {e}"
            shutil.rmtree(layout.scratch(job), ignore_errors=True)
            tracker.finish(job, res, ok)
        finally:
            free.put(cpus)

    def _attempts(job: Job, cpus: list[int] | None) -> JobResult:
        for attempt in (1, 2):
            tracker.start(job, attempt, host=host, cpus=cpus)

            def spawned(proc: subprocess.Popen, attempt: int = attempt) -> None:
                procs.add(proc)
                tracker.start(job, attempt, host=host, cpus=cpus, pid=proc.pid)

            res = run_job(job, layout.scratch(job), layout.log(job), lock=layout.lock if exclusive else None,
                          cpus=cpus, on_spawn=spawned, cancel=cancel)
            if res.status != "lost" or attempt == 2 or cancel.is_set():
                return res
            tracker.retry(job, res.error or "lost")
        raise AssertionError("unreachable")

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgepack-job")
    futures = [pool.submit(one, j) for j in jobs]
    try:
        while wait(futures, timeout=0.5).not_done:
            pass
    except KeyboardInterrupt:
        cancel.set()
        for f in futures:
            f.cancel()
        for p in list(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in list(procs):
            threading.Thread(target=stop, args=(p,), daemon=True).start()  # SIGKILL the stubborn ones
        wait(futures)
        raise
    finally:
        pool.shutdown(wait=True)
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # a bug in the executor, not a failed job
    return [warning] if warning else []
