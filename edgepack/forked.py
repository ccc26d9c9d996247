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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed pack must not leave its build running)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


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
        self._proc.start()
        send.close()

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
