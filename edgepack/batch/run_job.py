"""One job = one `edgepack pack --json` process, with its own TMPDIR and log file.

The bundle is written to `<scratch>/bundle`; the caller moves it into --out. Nothing here raises for a
failed pack: the result says what happened (status, exit code, the pack's one-line error).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .plan import Job
from .summary import summarize

STATUS_BY_CODE = {0: "ok", 1: "failed", 2: "failed", 3: "budget", 4: "crashed", 130: "interrupted"}
KILL_GRACE_S = 10.0


@dataclass
class JobResult:
    id: str
    status: str  # ok, failed, budget, crashed, timeout, lost, interrupted
    exit_code: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float = field(default_factory=time.time)
    pid: int | None = None
    host: str = ""
    cores: int | None = None  # physical cores of the host
    load: tuple[float, float] | None = None  # 1-minute load average before and after
    lock_wait_s: float = 0.0
    summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_job(job: Job, scratch: Path, log: Path, *, lock: Path | None = None, cpus: list[int] | None = None,
            mapping: dict[str, str] | None = None, on_spawn: Callable[[subprocess.Popen], None] | None = None,
            cancel: threading.Event | None = None) -> JobResult:
    """Run the pack; `lock` (a file) is held for the whole pack when timing must be exclusive."""
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "tmp").mkdir(parents=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    res = JobResult(job.id, "failed", host=socket.gethostname(), cores=_physical_cores())
    cmd = [sys.executable, "-m", "edgepack.batch.child", *job.pack_command(str(scratch / "bundle"), mapping)]
    with open(log, "a", encoding="utf-8") as logf:
        logf.write(f"# edgepack batch job {job.id} digest {job.digest[:16]} on {res.host} "
                   f"(runner pid {os.getpid()}) {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
                   f"# python -m edgepack {shlex.join(cmd[3:])}\n")
        logf.flush()
        held = _acquire(lock, cancel) if lock else None
        res.lock_wait_s = round(time.time() - res.started, 3)
        try:
            if cancel is not None and cancel.is_set():
                res.status, res.error = "interrupted", "interrupted before it started"
                return _done(res)
            res.load = (os.getloadavg()[0], 0.0)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, env=_env(job, scratch),
                                    start_new_session=True)
            res.pid = proc.pid
            logf.write(f"# pack pid {proc.pid}\n")
            logf.flush()
            if cpus:
                _pin(proc.pid, cpus, logf)
            if on_spawn:
                on_spawn(proc)
            try:
                out, timed_out = _wait(proc, job.timeout)
            except BaseException:  # cancelled (Ray raises KeyboardInterrupt in the task): leave no orphan pack
                stop(proc)
                raise
            res.load = (res.load[0], os.getloadavg()[0])
        finally:
            if held is not None:
                held.close()
    res.exit_code = proc.returncode
    if timed_out:
        res.status, res.error = "timeout", f"timed out after {job.timeout:g} s (--job-timeout)"
    elif cancel is not None and cancel.is_set():
        res.status, res.error = "interrupted", "interrupted"
    elif proc.returncode < 0 or proc.returncode == 130:
        sig = -proc.returncode if proc.returncode < 0 else signal.SIGTERM
        res.status, res.error = "lost", f"pack process killed by signal {signal.Signals(sig).name}"
    else:
        res.status = STATUS_BY_CODE.get(proc.returncode, "crashed")
        if proc.returncode == 0:
            try:
                res.summary = summarize(json.loads(out))
            except (ValueError, KeyError, TypeError) as e:
                res.status, res.error = "crashed", f"pack printed no readable JSON: {e}"
        else:
            res.error = _error_line(log) or f"exit code {proc.returncode}"
    return _done(res)


def _done(res: JobResult) -> JobResult:
    res.finished = time.time()
    return res


def _env(job: Job, scratch: Path) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(scratch / "tmp"), EDGEPACK_BATCH_PARENT=str(os.getpid()), COLUMNS="120")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(job.threads)  # libraries outside the timed runtimes stay within the job's cores
    return env


def _acquire(lock: Path, cancel: threading.Event | None):
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a")
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if cancel is not None and cancel.is_set():
                f.close()
                return None
            time.sleep(0.2)


def _pin(pid: int, cpus: list[int], logf) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
        logf.write(f"# pinned to CPUs {','.join(map(str, cpus))}\n")
    except (AttributeError, OSError) as e:
        logf.write(f"# could not pin to CPUs {cpus}: {e}\n")
    logf.flush()


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[str, bool]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out.decode("utf-8", "replace"), False
    except subprocess.TimeoutExpired:
        stop(proc)
        proc.communicate()
        return "", True


def stop(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the pack's process group (pack cleans up and exits 130), SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _error_line(log: Path) -> str | None:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errs = [ln.split("error:", 1)[1].strip() for ln in lines if ln.startswith("error:")]
    return errs[-1] if errs else None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count()
    except ImportError:
        return os.cpu_count()
