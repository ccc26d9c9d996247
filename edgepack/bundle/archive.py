"""Bundle archives: a byte-reproducible .tar.gz, and an extraction that refuses unsafe members up front."""
from __future__ import annotations

import gzip
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from edgepack.errors import BundleError
from edgepack.safeio import LIMITS, check_regular, limit

MAX_MEMBERS = 10000  # a bundle holds a handful of files


def make_archive(bundle: Path, dest: Path, *, arcname: str, mtime: int = 0) -> Path:
    """tar.gz of `bundle` under `arcname`/, sorted, with fixed mtimes, owners and modes (byte-reproducible)."""
    def info(name: str, p: Path) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 0, 0, "", ""
        if p.is_dir():
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        else:
            ti.size, ti.mode = p.stat().st_size, 0o755 if p.name == "run.py" else 0o644
        return ti

    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info(arcname, bundle))
        for p in sorted(bundle.rglob("*"), key=lambda q: q.relative_to(bundle).as_posix()):
            if "__pycache__" in p.parts or p.is_symlink():
                continue
            ti = info(f"{arcname}/{p.relative_to(bundle).as_posix()}", p)
            if p.is_dir():
                tar.addfile(ti)
            else:
                with open(p, "rb") as f:
                    tar.addfile(ti, f)
    return dest


def _unsafe(m: tarfile.TarInfo) -> str | None:
    name = m.name.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has a '..' component"
    if m.issym() or m.islnk():
        return f"is a link (to {m.linkname})"
    if m.isdev():
        return "is a device or fifo"
    if not (m.isfile() or m.isdir()):
        return "is not a plain file or folder"
    return None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a bundle archive; refuse, before extracting anything, absolute paths, '..', links and devices."""
    created = not Path(dest).exists()
    try:
        check_regular(archive, "bundle archive", BundleError)
        cap = limit("archive")
        with tarfile.open(archive, "r:*") as tar:
            members, total = [], 0
            for m in tar:  # one header at a time: a bomb of members or sizes is refused before it is held
                members.append(m)
                total += m.size if m.isfile() else 0
                if len(members) > MAX_MEMBERS or total > cap:
                    raise BundleError(f"refused to extract {archive}: it holds more than "
                                      + (f"{MAX_MEMBERS} members" if len(members) > MAX_MEMBERS else
                                         f"{cap >> 20} MB of files") + " (a decompression bomb?)",
                                      hint=f"set {LIMITS['archive'][0]} to raise the size limit if it is genuine")
            bad = [(m.name, why) for m in members if (why := _unsafe(m))]
            if bad:
                more = f" (and {len(bad) - 1} more unsafe members)" if len(bad) > 1 else ""
                raise BundleError(f"refused to extract {archive}: member '{bad[0][0]}' {bad[0][1]}{more}",
                                  hint="only unpack bundle archives made by edgepack")
            Path(dest).mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        if created:  # damage found while extracting: leave nothing behind
            shutil.rmtree(dest, ignore_errors=True)
        why = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else type(e).__name__  # one line
        raise BundleError(f"{archive} is not a readable .tar.gz archive ({why})") from None
