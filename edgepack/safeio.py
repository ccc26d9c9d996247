"""Bounded, safe reading of user files: regular files only, size caps, strict JSON/TOML, checked .npy/.npz.

Every reader refuses FIFOs, devices and sockets before opening them (a FIFO would block forever, /dev/zero
never ends), reads at most a capped number of bytes, and turns every failure into one line of the caller's
error class. Caps, in megabytes, can be raised with environment variables:

    EDGEPACK_MAX_FILE_MB   JSON, TOML and other text files (default 64)
    EDGEPACK_MAX_MODEL_MB  one model file (default 4096; ONNX external data is not read into memory)
    EDGEPACK_MAX_DATA_MB   the arrays of one .npy/.npz file, as declared in its headers (default 4096)
    EDGEPACK_MAX_ARCHIVE_MB  what a bundle .tar.gz unpacks to (default 16384)
"""
from __future__ import annotations

import json
import os
import stat
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError

LIMITS = {"file": ("EDGEPACK_MAX_FILE_MB", 64), "model": ("EDGEPACK_MAX_MODEL_MB", 4096),
          "data": ("EDGEPACK_MAX_DATA_MB", 4096), "archive": ("EDGEPACK_MAX_ARCHIVE_MB", 16384)}
_KINDS = {"file": "text files (JSON, TOML)", "model": "model files", "data": "data files", "archive": "archives"}
Error = type[EdgepackError]


def limit(kind: str) -> int:
    """The cap in bytes for `kind` ("file", "model", "data"), from its environment variable or the default."""
    env, default = LIMITS[kind]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default << 20
    try:
        mb = float(raw)
    except ValueError:
        raise EdgepackError(f"{env}={raw!r}: expected a number of megabytes") from None
    if not mb > 0:
        raise EdgepackError(f"{env}={raw!r}: must be a positive number of megabytes")
    return int(mb * (1 << 20))


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GB"
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.1f} kB"


def too_big(path, size: int, kind: str, what: str, error: Error = EdgepackError) -> EdgepackError:
    env = LIMITS[kind][0]
    return error(f"{what} {path} is {_size(size)}, over edgepack's {_size(limit(kind))} limit for {_KINDS[kind]}",
                 hint=f"set {env} to a larger number of megabytes if the file is what you meant")


def check_regular(path, what: str, error: Error = EdgepackError) -> os.stat_result:
    """stat() of a regular file (symlinks followed); `error` for a missing path, a folder, FIFO, device, socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        raise error(f"{what} {path} is {kind}, not a regular file; pass a file")
    return st


def check_size(path, what: str, kind: str, error: Error = EdgepackError) -> int:
    """Regular file no larger than the cap of `kind`; returns its size."""
    size = check_regular(path, what, error).st_size
    if size > limit(kind):
        raise too_big(path, size, kind, what, error)
    return size


def read_bytes(path, what: str, error: Error = EdgepackError, kind: str = "file") -> bytes:
    """The file's bytes, refused when over the cap (also for files whose reported size is 0, as in /proc)."""
    check_size(path, what, kind, error)
    cap = limit(kind)
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > cap:
        raise too_big(path, len(data), kind, what, error)
    return data


def read_text(path, what: str, error: Error = EdgepackError, kind: str = "file") -> str:
    data = read_bytes(path, what, error, kind)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                    "is it a binary file?") from None


# ---------------------------------------------------------------- JSON and TOML

def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(text: str) -> Any:
    """json.loads that refuses duplicate keys; ValueError (never RecursionError) on any problem."""
    try:
        return json.loads(text, object_pairs_hook=_unique)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_toml(text: str) -> dict:
    """tomllib.loads; TOMLDecodeError (never RecursionError) on any problem."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError("nested too deeply") from None


# ---------------------------------------------------------------- .npy / .npz

def npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) from an open .npy stream at its start; ValueError if the header is not one."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object array")
    count = 1
    for d in shape:
        count *= int(d)
    return tuple(int(d) for d in shape), dtype, count * dtype.itemsize


def _object_error(path, what: str, error: Error) -> EdgepackError:
    return error(f"{what} {path} holds Python objects (an object array); save plain numeric arrays with np.savez")


def check_npy(path, what: str, error: Error = EdgepackError) -> tuple[tuple[int, ...], np.dtype]:
    """Read only the header: refuse object arrays and shapes larger than the file or the data cap."""
    size = check_regular(path, what, error).st_size
    try:
        with open(path, "rb") as f:
            shape, dtype, nbytes = npy_header(f)
            offset = f.tell()
    except ValueError as e:
        if "object" in str(e):
            raise _object_error(path, what, error) from None
        raise error(f"{what} {path} is not a readable .npy file ({e})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if nbytes > size - offset:
        raise error(f"{what} {path} declares an array of shape {list(shape)} ({_size(nbytes)}) but holds "
                    f"{_size(size - offset)}; the file is truncated or forged")
    if nbytes > limit("data"):
        raise too_big(path, nbytes, "data", what, error)
    return shape, dtype


def check_npz(path, what: str, error: Error = EdgepackError) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Before decompressing anything: the declared sizes against the data cap (zip bombs), every member's
    .npy header against its declared size; {key: (shape, dtype)}."""
    check_regular(path, what, error)
    cap = limit("data")
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if total > cap:
                packed = sum(i.compress_size for i in infos)
                raise error(f"{what} {path} would unpack to {_size(total)} (from {_size(packed)}), over edgepack's "
                            f"{_size(cap)} limit for data files; it may be a decompression bomb",
                            hint="set EDGEPACK_MAX_DATA_MB to a larger number if the data is genuine")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    shape, dtype, nbytes = npy_header(f)
                if nbytes > info.file_size:
                    raise error(f"{what} {path}: member {info.filename} declares shape {list(shape)} "
                                f"({_size(nbytes)}) but holds {_size(info.file_size)}; the file is truncated or forged")
                out[info.filename[:-4]] = (shape, dtype)
    except ValueError as e:
        if "object" in str(e):
            raise _object_error(path, what, error) from None
        raise error(f"{what} {path} is not a readable .npz file ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
        raise error(f"{what} {path} is not a readable .npy/.npz file ({e})") from None
    return out


def load_arrays(path, what: str, error: Error = EdgepackError) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy as a read-only memory map (read from disk as it is used), or an .npz's arrays, after the
    checks above; never unpickles. `what` names the file in messages ("calibration data")."""
    path = Path(path)
    check_regular(path, what, error)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        if magic == b"\x93NUMPY":
            shape, _ = check_npy(path, what, error)
            if 0 in shape:
                return np.load(path, allow_pickle=False)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if magic.startswith(b"PK"):
            check_npz(path, what, error)
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except EdgepackError:
        raise
    except ValueError as e:
        raise error(f"{what} {path} is not a readable .npy/.npz file ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise error(f"{what} {path} is not a readable .npy/.npz file ({e})") from None
    raise error(f"{what} {path} is not a readable .npy/.npz file (no .npy or zip header)")
