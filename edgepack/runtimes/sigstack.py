"""Keep the main thread's signal stack valid around OpenVINO CPU plugin calls.

The OpenVINO CPU plugin installs its own alternate signal stack when it compiles a model and, when the
compiled model is destroyed, puts back the stack it found. With two compiled models freed out of order it
puts back the first one's stack after that was freed, and the next Ctrl-C / SIGTERM is delivered onto
freed memory: the process dies with SIGSEGV instead of exiting 130. `keep_sigaltstack()` restores the
stack that was in place before the call, so the plugin never sees its own stack as current.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)
_SS_DISABLE = 2


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@contextlib.contextmanager
def keep_sigaltstack() -> Iterator[None]:
    """Restore this thread's alternate signal stack after the block (no-op off Linux)."""
    old = _StackT()
    saved = _LIBC is not None and _LIBC.sigaltstack(None, ctypes.byref(old)) == 0
    try:
        yield
    finally:
        if saved:
            if old.ss_flags & _SS_DISABLE:
                old = _StackT(None, _SS_DISABLE, 0)
            if _LIBC.sigaltstack(ctypes.byref(old), None) != 0:
                log.debug("sigaltstack restore failed (errno %d)", ctypes.get_errno())
