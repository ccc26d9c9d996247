"""Run a function in a forked child process beside this one, and get its result (or its failure) back.

Used to build candidates of different runtimes in parallel. The child inherits this process's memory (no
pickling of the inputs, no re-import), ignores Ctrl-C and SIGTERM (the parent kills it), sends its log
records back instead of writing them under the parent's live display, and exits with os._exit, so no
parent exit handler (temp-folder clean-up) ever runs in it.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

from edgepack.errors import first_line

log = logging.getLogger(__name__)


def _allowed() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


# the CPUs this process may use, read before any runtime pinned a thread: a thread inherits its creator's
# affinity, and OpenVINO (pinning on, as NNCF compiles) and ONNX Runtime (choosing its thread count) pin theirs
ALLOWED = _allowed()


def usable_cores() -> int:
    return len(ALLOWED)


def unpin(cpus: frozenset[int] = ALLOWED) -> None:
    """Let this thread (and those it starts) run on every CPU in ``cpus`` again."""
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError, ValueError):  # not Linux, or a CPU gone offline
        pass


def _die_with(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed pack must not leave its build running)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def start_held(proc) -> None:
    """proc.start() with Ctrl-C and SIGTERM held until it returns: one handled mid-fork would raise inside the
    fork's handlers (a traceback) or leave a child half started. Both the mask (a child inherits it, so a
    spawned one is not interrupted while it starts: it unblocks them itself) and Python's handlers (a signal
    can land on any of the runtimes' threads, and Python runs its handler in the main thread whatever that
    thread's mask) are held; a signal that came meanwhile is raised again after."""
    import threading

    held = (signal.SIGINT, signal.SIGTERM)
    got: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in held} if main else {}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        proc.start()
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])


def unblock_term() -> None:
    """In a child started by start_held: SIGTERM delivered again (the mask is inherited)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info, record.exc_text = record.getMessage(), None, None, None
        self.records.append(record)


class Forked:
    """``Forked(fn)`` starts fn() in a child now; ``.result()`` waits for it and returns its value, or raises
    RuntimeError with one line when it failed or died."""

    def __init__(self, fn: Callable[[], Any]):
        mp = multiprocessing.get_context("fork")
        self._recv, send = mp.Pipe(duplex=False)
        self._proc = mp.Process(target=_child, args=(fn, send, os.getpid()), daemon=True)
        start_held(self._proc)
        send.close()

    def done(self) -> bool:
        """Whether the child has finished (its result waiting, or dead): result() then does not block."""
        return self._recv.poll() or not self._proc.is_alive()

    def result(self) -> Any:
        from multiprocessing.connection import wait

        try:
            wait([self._recv, self._proc.sentinel])
            try:
                status, value, records = self._recv.recv()
            except EOFError:
                self._proc.join()
                raise RuntimeError(f"the build process died (exit code {self._proc.exitcode})") from None
            for r in records:  # its log lines, through this process's handlers
                if logging.getLogger(r.name).isEnabledFor(r.levelno):
                    logging.getLogger(r.name).handle(r)
            if status != "ok":
                raise RuntimeError(value)
            return value
        finally:
            self.close()

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._recv.close()


def _child(fn: Callable[[], Any], send, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    unblock_term()
    _die_with(parent)
    collect = _Collect()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for name in list(logging.root.manager.loggerDict):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        if not lg.propagate:
            lg.addHandler(collect)
    root.addHandler(collect)
    try:
        out = ("ok", fn(), collect.records)
    except BaseException as e:  # everything goes back to the parent as one line
        out = ("error", f"{type(e).__name__}: {first_line(e)}", collect.records)
    try:
        send.send(out)
    except Exception as e:  # an unpicklable result
        send.send(("error", f"could not send the result back: {first_line(e)}", collect.records))
    send.close()
