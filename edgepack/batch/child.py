"""`python -m edgepack.batch.child pack ...`: exactly `python -m edgepack pack ...`, but it gets SIGTERM when
the process that started it dies (a Ray worker killed mid-job leaves no orphan pack behind)."""
from __future__ import annotations

import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no such guard
        return
    expected = os.environ.get("EDGEPACK_BATCH_PARENT")
    if expected and os.getppid() != int(expected):  # the parent died before prctl
        sys.exit(130)


if __name__ == "__main__":
    die_with_parent()
    sys.argv = ["edgepack", *sys.argv[1:]]
    runpy.run_module("edgepack", run_name="__main__", alter_sys=True)
