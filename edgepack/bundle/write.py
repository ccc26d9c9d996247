"""Write bundles: model files, manifest (hashes, versions, I/O spec), runner, reference I/O, reports.

A bundle is built in a temp folder next to `out`, hashed, verified (hashes + run.py --selftest in a subprocess)
and only then renamed into place, so `out` is either the old bundle, the new one, or absent — never half-written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.bundle.archive import make_archive
from edgepack.bundle.manifest import MANIFEST, SIGNATURE, default_readme, replace_refusal, requirements_txt
from edgepack.bundle.verify import verify_bundle
from edgepack.errors import BundleError
from edgepack.runner import run as runner
from edgepack.tempdirs import WRITTEN, pid_alive, sibling, sweep_siblings
from edgepack.types import SCHEMA_VERSION

log = logging.getLogger(__name__)

RUNNER = Path(runner.__file__)
_RESERVED = {MANIFEST, "run.py", "requirements.txt", "README.md", "reference", "model.onnx", "model.onnx.data",
             "model.xml", "model.bin", SIGNATURE}


# ---------------------------------------------------------------- writing

def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "value"):  # enums
        return o.value
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")



def _copy_model(model_files: list[Path], dest: Path, runtime: str) -> str:
    from edgepack.runtimes import get_backend

    main = Path(model_files[0])
    if not main.is_file():
        raise BundleError(f"model file {main} not found")
    return get_backend(runtime).copy_model([Path(f) for f in model_files], dest)


def _hash_files(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": runner.sha256_file(p), "size": p.stat().st_size}
    return files


def _fill(tmp: Path, *, model_files, manifest, reference_inputs, reference_outputs, report_files, readme) -> dict:
    if not model_files:
        raise BundleError("no model files given to write_bundle")
    from edgepack.runtimes import BACKENDS

    if (manifest.get("runtime") or {}).get("name") not in BACKENDS:
        raise BundleError(f"manifest runtime {manifest.get('runtime')!r} is not one of {', '.join(BACKENDS)}")
    if not isinstance(manifest.get("inputs"), list) or not isinstance(manifest.get("outputs"), list):
        raise BundleError("the manifest needs 'inputs' and 'outputs' lists of {name, dtype, shape}")
    model_name = _copy_model(model_files, tmp, manifest["runtime"]["name"])
    names = [i["name"] for i in manifest["inputs"]]
    if sorted(reference_inputs) != sorted(names):
        raise BundleError(f"reference inputs {sorted(reference_inputs)} do not match the manifest inputs {names}")
    outputs = manifest["outputs"]
    if len(outputs) != len(reference_outputs):
        raise BundleError(f"{len(reference_outputs)} reference outputs for {len(outputs)} manifest outputs")
    (tmp / "reference").mkdir()
    runner.save_npz(tmp / "reference" / "inputs.npz", reference_inputs)
    runner.save_npz(tmp / "reference" / "outputs.npz", {o["name"]: a for o, a in zip(outputs, reference_outputs)})
    shutil.copyfile(RUNNER, tmp / "run.py")
    (tmp / "run.py").chmod(0o755)
    (tmp / "requirements.txt").write_text(requirements_txt(manifest["runtime"]), encoding="utf-8")
    for f in report_files:
        f = Path(f)
        if f.name in _RESERVED:
            raise BundleError(f"report file {f} would overwrite the bundle's {f.name}; rename it")
        if f.is_dir():
            shutil.copytree(f, tmp / f.name)
        else:
            shutil.copyfile(f, tmp / f.name)
    m = dict(manifest)
    m["runtime"] = {**manifest["runtime"], "model": model_name}
    m.setdefault("schema_version", SCHEMA_VERSION)
    m.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    if "edgepack_version" not in m:
        from edgepack import __version__

        m["edgepack_version"] = __version__
    m["reference"] = {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz",
                      **(manifest.get("reference") or {})}
    (tmp / "README.md").write_text(readme if readme is not None else default_readme(m), encoding="utf-8")
    m["files"] = _hash_files(tmp)
    m = json.loads(json.dumps(m, default=_json_default))  # JSON-native, as readers will see it
    m["manifest_sha256"] = runner.manifest_digest(m)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    return m


def _selftest_provider(manifest: dict) -> str | None:
    """The provider/device for the self-test on this host: the bundle's own, else its fallback, else the CPU."""
    from edgepack.runtimes import get_backend

    rt = manifest["runtime"]
    backend = get_backend(rt["name"])
    want = rt.get("provider") or rt.get("device")
    if want and backend.availability(want) is None:
        return None
    fallback = rt.get("fallback") or backend.cpu_device()
    log.info("self-test on %s: %s is not available on this host", fallback, want)
    return fallback


def _lock(out: Path) -> Path:
    lock = out.parent / f".{out.name}.lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and not pid_alive(pid):
                log.info("taking over stale lock %s of pid %d", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise BundleError(f"another edgepack run is writing {out} (lock {lock}, pid {pid or '?'})",
                              hint="wait for it to finish, or delete the lock file if that run is gone") from None
        except OSError as e:  # read-only or pseudo file system, permissions
            raise _os_error(e, out) from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise BundleError(f"could not take the lock {lock}; delete it if no edgepack run is writing {out}")


def _check_out(out: Path, archive: Path | None, force: bool) -> None:
    for p in (out, archive):
        if p is None or not (p.exists() or p.is_symlink()):
            continue
        if not force:
            raise BundleError(f"{p} exists; pass --force to replace a bundle, or choose another --out")
    why = replace_refusal(out) if force and (out.exists() or out.is_symlink()) else None
    if why and "is not an edgepack bundle" in why:
        raise BundleError(f"{out} exists; pass --force to replace a bundle (refused: not an edgepack bundle, "
                          f"--force never deletes other folders or files)")
    if why:
        raise BundleError(why)
    if force and archive is not None and (archive.is_dir() or archive.is_symlink()):
        raise BundleError(f"{archive} exists and is not an archive file; refused to replace it")


def write_bundle(out: Path, *, model_files: list[Path], manifest: dict, reference_inputs: dict[str, np.ndarray],
                 reference_outputs: list[np.ndarray], report_files: list[Path], readme: str | None = None,
                 force: bool = False, archive: bool = False, selftest: bool = True,
                 sign_key: Path | None = None) -> Path:
    """Write a verified bundle to `out` atomically (and `out`.tar.gz with archive=True); returns `out`.

    `manifest` holds everything but `files`, which is computed. With force, an intact bundle is replaced;
    anything else at `out` is refused. The self-test runs on the manifest's provider/device, or on its
    fallback (else CPU) when this host lacks it. `sign_key`: an Ed25519 private key; writes signature.json.
    """
    out = Path(out).absolute()
    arch = out.with_name(out.name + ".tar.gz") if archive else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, out) from e
    with _signals_deferred():  # a signal between taking the lock and the try below would leave the lock behind
        lock = _lock(out)
    tmp, tmp_arch = sibling(out, "tmp"), sibling(out.with_name(out.name + ".tar.gz"), "tmp")
    old = None
    try:
        sweep_siblings(out.parent)  # what runs killed with SIGKILL left here
        _check_out(out, arch, force)
        tmp.mkdir()
        m = _fill(tmp, model_files=model_files, manifest=manifest, reference_inputs=reference_inputs,
                  reference_outputs=reference_outputs, report_files=report_files, readme=readme)
        if sign_key is not None:
            from edgepack.bundle.sign import sign_bundle

            sign_bundle(tmp, Path(sign_key))
        verify_bundle(tmp, selftest=selftest, provider=_selftest_provider(m) if selftest else None)
        if arch is not None:
            make_archive(tmp, tmp_arch, arcname=out.name, mtime=_epoch(m.get("created")))
        _check_out(out, arch, force)  # again: something may have appeared at `out` while we built
        with _signals_deferred():  # the renames happen all together or not at all
            if out.exists():
                old = sibling(out, "old")
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if old is not None:
                    os.replace(old, out)
                    old = None
                raise
            if arch is not None:
                os.replace(tmp_arch, arch)
            WRITTEN.append(out)
        log.info("wrote bundle %s (%d files)", out, len(m["files"]))
        return out
    except OSError as e:
        raise _os_error(e, out) from e
    finally:
        with _signals_deferred():  # the clean-up runs whole: a signal during it would skip the rest
            for p in (tmp, tmp_arch, old):
                if p is not None and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p is not None:
                    p.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block raise KeyboardInterrupt only when it ends (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    if got:
        raise KeyboardInterrupt


def _os_error(e: OSError, out: Path) -> BundleError:
    if e.errno == errno.ENOSPC:
        return BundleError(f"disk full while writing the bundle to {out}; free some space and run again")
    return BundleError(f"could not write the bundle to {out}: {e.strerror or e}"
                       + (f" ({e.filename})" if e.filename else ""))


def _epoch(created: str | None) -> int:
    try:
        return int(datetime.fromisoformat(str(created)).timestamp())
    except ValueError:
        return 0
