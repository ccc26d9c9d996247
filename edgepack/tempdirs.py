"""Temp folders that carry their owner's pid, and sweeps that remove those whose process is gone.

A run killed with SIGKILL cannot clean up after itself, so every run cleans up after dead ones:
``edgepack-<kind>-<pid>-*`` in the temp dir (multiprocessing's own folder too: mp_temp), and
``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>-*`` next to a bundle.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

WRITTEN: list[Path] = []  # outputs this process renamed into place (the CLI's interrupt message reads it)
_TEMP = re.compile(r"^edgepack-(?:work|verify|selftest|prof|mp)-(\d+)-")
_SIBLING = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)-[0-9a-f]{8}$")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.info("removed %s, left by an edgepack run that is gone", p)
    except OSError:
        pass


def _mine(p: Path) -> bool:
    try:
        return p.lstat().st_uid == os.getuid()
    except OSError:
        return False


def sweep_temp(root: Path | None = None) -> list[Path]:
    """Remove edgepack-work/verify/selftest/prof/mp-<pid>-* folders in the temp dir whose process is gone."""
    root = Path(root or tempfile.gettempdir())
    gone: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _TEMP.match(p.name)
        if m and not pid_alive(int(m.group(1))) and _mine(p):
            _remove(p)
            gone.append(p)
    return gone


def make_temp(kind: str) -> Path:
    """A new edgepack-<kind>-<pid>-* folder in the temp dir, after sweeping those of dead runs."""
    sweep_temp()
    return Path(tempfile.mkdtemp(prefix=f"edgepack-{kind}-{os.getpid()}-"))


def mp_temp() -> Path:
    """multiprocessing's temp folder for this process (the fork server's socket lives there), made now as
    edgepack-mp-<pid>-*: its own name, pymp-*, would stay behind a run killed with SIGKILL, with nothing to tell
    whose it was. Removed at exit as multiprocessing removes its own."""
    from multiprocessing import process, util

    config = process.current_process()._config  # type: ignore[attr-defined]  # where util.get_temp_dir() keeps it
    if not config.get("tempdir"):
        d = make_temp("mp")
        config["tempdir"] = str(d)
        util.Finalize(None, shutil.rmtree, args=(str(d), True), exitpriority=-100)
    return Path(config["tempdir"])


def sibling(out: Path, kind: str) -> Path:
    """A hidden name next to `out` for a build in progress: .NAME.<kind>-<pid>-<random>."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def sweep_siblings(parent: Path) -> list[Path]:
    """Remove .NAME.tmp-<pid>-* left in `parent` by dead runs; put a .NAME.old-<pid>-* back where NAME is
    missing (a run killed between moving the old bundle away and renaming the new one in), else remove it."""
    gone: list[Path] = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _SIBLING.match(p.name)
        if not m or pid_alive(int(m.group(3))) or not _mine(p):
            continue
        target = p.parent / m.group(1)
        if m.group(2) == "old" and not (target.exists() or target.is_symlink()):
            try:
                os.replace(p, target)
                log.info("restored %s from %s, left by an edgepack run that is gone", target, p.name)
                continue
            except OSError:
                pass
        _remove(p)
        gone.append(p)
    return gone
