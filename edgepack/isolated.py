"""Each candidate timed in a process of its own, as run.py runs it.

Sessions in one process slow each other: every ONNX Runtime session keeps its own thread pool, and on a 16-core
host the second session of one model ran 2.4x slower than the first, interleaved in one process (pack's p50 was
3x what run.py then gave). So pack times each candidate in a worker process that holds that one session; this
process only interleaves their blocks (runner.interleave), and the times are taken inside the workers.
Workers fork from a fork server started clean (no runtime threads to fork), with the runtimes preloaded.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
from typing import Any

from edgepack.errors import EdgepackError, first_line
from edgepack.forked import ALLOWED, start_held

_CTX: Any = None


UNIX_PATH_MAX = 100  # a socket's path must fit sockaddr_un (108 bytes on Linux, 104 on macOS)


def _context():
    """The fork server's context, its preload set once. Spawn (slower: each worker imports the runtimes) where
    there is no fork server, or where its socket's path would not fit: it lives in the temp folder, and a batch
    job's temp folder sits deep under --out."""
    global _CTX
    if _CTX is None:
        from edgepack.tempdirs import mp_temp

        try:
            if len(str(mp_temp())) + len("/listener-12345678") > UNIX_PATH_MAX:
                raise ValueError("the temp folder's path is too long for a socket")
            _CTX = multiprocessing.get_context("forkserver")
            # "__main__": the server imports the main script once, so that no worker runs it again; the rest is
            # what a worker needs to unpickle its arguments and open its session
            preload = ["__main__", "edgepack.isolated", "edgepack.runtimes", "edgepack.target", "edgepack.forked"]
            _CTX.set_forkserver_preload(preload + [m for m in ("onnxruntime", "openvino") if importlib.util.find_spec(m)]
                                        + ["edgepack._freeze"])
        except ValueError:
            _CTX = multiprocessing.get_context("spawn")
    return _CTX


def start_server() -> None:
    """Start the fork server now (its imports then overlap other work); no-op where there is none."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class Worker:
    """One candidate's session in a worker process: warm() and block() as runner.Timed has them, and the
    session's facts (runtime, device_used, threads, load_ms, first_ms, memory_mb) once ready() returned."""

    def __init__(self, artifact, spec, threads: int, feeds: dict):
        ctx = _context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, artifact, spec, threads, feeds, ALLOWED), daemon=True)
        start_held(self._proc)  # (a child half sent its arguments prints a traceback)
        child.close()
        self.runtime = self.device_used = ""
        self.threads, self.load_ms, self.first_ms, self.memory_mb = threads, 0.0, 0.0, 0.0
        self.is_ready = False

    def ready(self) -> Worker:
        """Wait until the session is open; EdgepackError with the worker's one-line reason if it failed."""
        if not self.is_ready:
            for k, v in self._call(None).items():
                setattr(self, k, v)
            self.is_ready = True
        return self

    def warm(self, n: int) -> tuple[float, list[float]]:
        return self._call("warm", n)

    def block(self, runs: int, settle: int, after=None) -> tuple[list[float], list[float]]:
        """A timing block in the worker. Where ``after`` (the worker timed just before) can still be spinning, this
        one runs untimed until it has gone idle: the wait costs no time of its own."""
        wait = after is not None and hasattr(after, "quiet")
        try:
            self._conn.send(("block", (runs, settle, wait)))
        except (OSError, BrokenPipeError):
            return self._call(None)  # (reports the dead worker)
        if wait:
            after.quiet()
            self._conn.send(("go", ()))
        return self._call(None)

    QUIET_S = 0.2  # the longest wait for a worker's threads to go idle after its block
    quiet_on = True
    waited_s = 0.0  # all workers' quiet waits so far (for the debug log)

    def quiet(self) -> None:
        """Wait until this worker's process uses no CPU (a runtime's threads keep spinning for a while after a run
        and would take cores from the next candidate's first runs), at most QUIET_S. Idle: on Linux, none of its
        threads runnable (the next candidate's settle runs keep both cores busy meanwhile, so a spinning thread
        can sit a few milliseconds off-CPU and look idle by its CPU time: it then spun on through the next block,
        and ONNX Runtime int8 read 3x its speed); elsewhere, a millisecond in which its threads ran under a
        quarter of it."""
        import time

        if not self.quiet_on or self.threads == 1:
            return
        t0 = time.perf_counter()
        try:
            used = _cpu_ns(self._proc.pid)
            while time.perf_counter() - t0 < self.QUIET_S:
                time.sleep(STEP_S)
                runnable = _runnable(self._proc.pid)
                if runnable is not None:
                    if not runnable:
                        break
                    continue
                now = _cpu_ns(self._proc.pid)
                if now - used < STEP_S * 1e9 / 4:
                    break
                used = now
        except (OSError, ValueError, ImportError):  # the process is gone, or no way to read its CPU time here
            pass
        finally:
            Worker.waited_s += time.perf_counter() - t0

    def _call(self, op: str | None, *args) -> Any:
        try:
            if op is not None:
                self._conn.send((op, args))
            status, value = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._proc.join(1)
            raise EdgepackError(f"the timing process died (exit code {self._proc.exitcode})") from None
        if status != "ok":
            raise EdgepackError(value)
        return value

    def close(self) -> None:
        try:
            self._conn.send(("close", ()))
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


STEP_S = 0.001


def _runnable(pid: int) -> bool | None:
    """Whether any thread of the process is running or waiting for a core (Linux /proc state R); None where the
    states cannot be read."""
    tasks = f"/proc/{pid}/task"
    if not os.path.isdir(tasks):
        return None
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "R":
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):  # a thread that just ended
            continue
    return False


def _cpu_ns(pid: int) -> int:
    """CPU time of all of a process's threads, in ns: Linux's per-thread schedstat (psutil's counts 10 ms ticks,
    too coarse for a wait of a few ms); elsewhere psutil's."""
    tasks = f"/proc/{pid}/task"
    if os.path.isdir(tasks):
        total = 0
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
                continue
        return total
    import psutil

    return int(sum(psutil.Process(pid).cpu_times()[:2]) * 1e9)


def close_all(workers) -> None:
    for w in workers:
        if w is not None:
            w.close()


def _serve(conn, artifact, spec, threads: int, feeds: dict, cpus: frozenset[int]) -> None:
    """The worker: open the session, then answer warm/block requests until told to close (or the pipe ends)."""
    from edgepack.forked import _die_with, unblock_term, unpin

    # pack's CPUs, as run.py has them: the fork server may have started from a thread a runtime had pinned to one
    # core, and every thread of this session would then share it (the session ran at one core's speed)
    unpin(cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pack handles Ctrl-C and closes its workers
    unblock_term()  # (a spawned worker inherits the mask its start held)
    _die_with(os.getppid())
    try:
        _answer(conn, _open(conn, artifact, spec, threads, feeds))
    except (EOFError, OSError):  # pack is gone (it closes its end when it ends, or was killed)
        return


def _open(conn, artifact, spec, threads: int, feeds: dict):
    """The worker's session, opened and run once; its facts (or why it failed) sent to pack."""
    from edgepack.runner.run import Timed
    from edgepack.runtimes import open_session

    try:
        session = open_session(artifact, spec, threads=threads)  # (only measurable candidates get a worker)
        timed = Timed(session.model, session.check(feeds))
        session.run(feeds)  # the first run in a fresh process, as a user's: its time and the memory it took
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))
        raise EOFError from None  # nothing more to serve
    conn.send(("ok", {"runtime": session.runtime, "device_used": session.device_used, "threads": session.threads,
                      "load_ms": session.load_ms, "first_ms": session.first_ms, "memory_mb": session.memory_mb}))
    return timed


def _answer(conn, timed) -> None:
    while True:
        op, args = conn.recv()
        if op == "close":
            return
        try:
            if op == "warm":
                out = ("ok", timed.warm(*args))
            else:
                runs, settle, wait = args
                out = ("ok", timed.block(runs, settle, ready=(lambda: conn.poll() and conn.recv() is not None)
                                         if wait else None))
        except Exception as e:
            out = ("error", f"{type(e).__name__}: {first_line(e)}")
        conn.send(out)
