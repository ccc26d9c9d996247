"""Write and verify bundles: model files, manifest (hashes, versions, I/O spec), runner, reference I/O, reports.

A bundle is built in a temp folder next to `out`, hashed, verified (hashes + run.py --selftest in a subprocess)
and only then renamed into place, so `out` is either the old bundle, the new one, or absent — never half-written.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .archive import make_archive, safe_extract
from .errors import BundleError
from .runner import run as runner

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RUNNER = Path(__file__).parent / "runner" / "run.py"
_RESERVED = {MANIFEST, "run.py", "requirements.txt", "README.md", "reference", "model.onnx", "model.onnx.data",
             "model.xml", "model.bin"}
# pip package that carries each ONNX Runtime provider (the plain wheel has CPU only, plus CoreML/XNNPACK on some)
_ORT_PACKAGES = {
    "CUDAExecutionProvider": ("onnxruntime-gpu", "the CUDA provider ships in onnxruntime-gpu, not onnxruntime"),
    "TensorrtExecutionProvider": ("onnxruntime-gpu", "the TensorRT provider ships in onnxruntime-gpu (needs TensorRT)"),
    "QNNExecutionProvider": ("onnxruntime-qnn", "the QNN provider ships in onnxruntime-qnn, not onnxruntime"),
    "DmlExecutionProvider": ("onnxruntime-directml", "DirectML ships in onnxruntime-directml"),
    "OpenVINOExecutionProvider": ("onnxruntime-openvino", "the OpenVINO provider ships in onnxruntime-openvino"),
}


# ---------------------------------------------------------------- manifest

def load_manifest(bundle: Path) -> dict:
    """The bundle's manifest.json; BundleError naming the file when missing, unparsable or not ours."""
    path = Path(bundle) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} not found; {bundle} is not an edgepack bundle") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path} is not valid JSON ({e})", hint="restore it from the archive or re-pack") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path} has schema_version {found!r}; this edgepack reads {SCHEMA_VERSION}",
                          hint="re-pack the model with this edgepack version")
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("runtime"), dict):
        raise BundleError(f"{path} lacks 'files' or 'runtime'; it is not a complete edgepack manifest",
                          hint="restore it from the archive or re-pack")
    return data


def is_bundle(path: Path) -> bool:
    """True when `path` is a folder with a manifest.json of our schema (what --force may replace)."""
    try:
        return Path(path).is_dir() and not Path(path).is_symlink() and bool(load_manifest(path))
    except BundleError:
        return False


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


def requirements_txt(runtime: dict) -> str:
    """numpy + the runtime pinned to the version that made the reference outputs."""
    name, version = runtime.get("name"), runtime.get("version")
    lines = ["# Install on the device: python -m pip install -r requirements.txt", "numpy>=1.24"]
    if name == "openvino":
        pkg, why = "openvino", None
    else:
        pkg, why = _ORT_PACKAGES.get(runtime.get("provider") or "", ("onnxruntime", None))
    if why:
        lines.append(f"# {why}")
    if version:
        lines.append(f"{pkg}=={str(version).split('-')[0]}")
    else:
        lines += [f"# the runtime version was not recorded when packing; pin {pkg} to the one you tested", pkg]
    return "\n".join(lines) + "\n"


def default_readme(manifest: dict) -> str:
    rt = manifest["runtime"]
    names = ", ".join(i["name"] for i in manifest.get("inputs", []))
    return (f"# edgepack bundle for {manifest.get('target', {}).get('name', '?')}\n\n"
            f"Runtime {rt.get('name')} {rt.get('version')} ({rt.get('provider') or rt.get('device')}), "
            f"precision {manifest.get('precision')}.\n\n```\npython -m pip install -r requirements.txt\n"
            f"python run.py --selftest\npython run.py --input x.npz --output y.npz   # keys: {names}\n"
            f"python run.py --benchmark --json profile.json\n```\n")


# ---------------------------------------------------------------- writing

def _copy_model(model_files: list[Path], dest: Path) -> None:
    main = Path(model_files[0])
    if not main.is_file():
        raise BundleError(f"model file {main} not found")
    if main.suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import uses_external_data

        proto = onnx.load(str(main), load_external_data=False)
        if any(uses_external_data(t) for t in proto.graph.initializer):
            # Re-save so the external-data locations point at the new file name.
            full = onnx.load(str(main), load_external_data=True)
            onnx.save(full, str(dest / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data", size_threshold=0)
        else:
            shutil.copyfile(main, dest / "model.onnx")
    elif main.suffix == ".xml":
        bins = [Path(p) for p in model_files[1:] if Path(p).suffix == ".bin"] or [main.with_suffix(".bin")]
        if not bins[0].is_file():
            raise BundleError(f"OpenVINO weights {bins[0]} not found next to {main}")
        shutil.copyfile(main, dest / "model.xml")
        shutil.copyfile(bins[0], dest / "model.bin")
    else:
        raise BundleError(f"cannot bundle {main}: expected an .onnx or OpenVINO .xml model")


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
    if (manifest.get("runtime") or {}).get("name") not in ("onnxruntime", "openvino"):
        raise BundleError(f"manifest runtime {manifest.get('runtime')!r} is not onnxruntime or openvino")
    if not isinstance(manifest.get("inputs"), list) or not isinstance(manifest.get("outputs"), list):
        raise BundleError("the manifest needs 'inputs' and 'outputs' lists of {name, dtype, shape}")
    _copy_model(model_files, tmp)
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
    m.setdefault("schema_version", SCHEMA_VERSION)
    m.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if "edgepack_version" not in m:
        from . import __version__

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
    """The provider/device for the self-test on this host: the bundle's own, else its fallback, else CPU."""
    from .host import availability
    from .types import RuntimeName

    rt = manifest["runtime"]
    runtime = RuntimeName(rt["name"])
    want = rt.get("provider") if runtime is RuntimeName.ONNXRUNTIME else rt.get("device")
    if want and availability(runtime, want) is None:
        return None
    fallback = rt.get("fallback") or ("CPUExecutionProvider" if runtime is RuntimeName.ONNXRUNTIME else "CPU")
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
            if pid and not _pid_alive(pid):
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _check_out(out: Path, archive: Path | None, force: bool) -> None:
    for p in (out, archive):
        if p is None or not (p.exists() or p.is_symlink()):
            continue
        if not force:
            raise BundleError(f"{p} exists; pass --force to replace a bundle, or choose another --out")
    if force and (out.exists() or out.is_symlink()) and not is_bundle(out):
        raise BundleError(f"{out} exists; pass --force to replace a bundle (refused: not an edgepack bundle, "
                          f"--force never deletes other folders or files)")
    if force and archive is not None and (archive.is_dir() or archive.is_symlink()):
        raise BundleError(f"{archive} exists and is not an archive file; refused to replace it")


def write_bundle(out: Path, *, model_files: list[Path], manifest: dict, reference_inputs: dict[str, np.ndarray],
                 reference_outputs: list[np.ndarray], report_files: list[Path], readme: str | None = None,
                 force: bool = False, archive: bool = False, selftest: bool = True) -> Path:
    """Write a verified bundle to `out` atomically (and `out`.tar.gz with archive=True); returns `out`.

    `manifest` holds everything but `files`, which is computed. With force, an existing bundle is replaced;
    anything else at `out` is refused. The self-test runs on the manifest's provider/device, or on its
    fallback (else CPU) when this host lacks it.
    """
    out = Path(out).absolute()
    arch = out.with_name(out.name + ".tar.gz") if archive else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, out) from e
    lock = _lock(out)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp_arch = out.parent / f".{out.name}.tar.gz.tmp-{secrets.token_hex(4)}"
    old = None
    try:
        _check_out(out, arch, force)
        tmp.mkdir()
        m = _fill(tmp, model_files=model_files, manifest=manifest, reference_inputs=reference_inputs,
                  reference_outputs=reference_outputs, report_files=report_files, readme=readme)
        verify_bundle(tmp, selftest=selftest, provider=_selftest_provider(m) if selftest else None)
        if arch is not None:
            make_archive(tmp, tmp_arch, arcname=out.name, mtime=_epoch(m.get("created")))
        _check_out(out, arch, force)  # again: something may have appeared at `out` while we built
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
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
        log.info("wrote bundle %s (%d files)", out, len(m["files"]))
        return out
    except OSError as e:
        raise _os_error(e, out) from e
    finally:
        for p in (tmp, tmp_arch, old):
            if p is not None and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p is not None:
                p.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


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


# ---------------------------------------------------------------- verification

def _bundle_root(extracted: Path) -> Path:
    if (extracted / MANIFEST).exists():
        return extracted
    dirs = [p for p in extracted.iterdir() if p.is_dir()]
    if len(dirs) == 1 and (dirs[0] / MANIFEST).exists():
        return dirs[0]
    raise BundleError(f"no {MANIFEST} at the top of the archive; it is not an edgepack bundle")


def verify_bundle(path: Path, *, selftest: bool = True, python: str = sys.executable,
                  provider: str | None = None) -> dict:
    """Check every file against the manifest, then run `run.py --selftest` in a subprocess.

    `path` is a bundle folder or its .tar.gz. `provider` overrides the ORT provider / OpenVINO device of the
    self-test. Returns {"files": n, "selftest": {...} or None}; BundleError lists the problems.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="edgepack-verify-") as d:
            safe_extract(path, Path(d))
            return verify_bundle(_bundle_root(Path(d)), selftest=selftest, python=python, provider=provider)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle folder nor a .tar.gz archive")
    manifest = load_manifest(path)
    problems = runner.check_files(path, manifest)
    listed = set(manifest["files"]) | {MANIFEST}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if "__pycache__" in p.relative_to(path).parts or p.is_dir() and not p.is_symlink():
            continue
        if rel not in listed:
            problems.append(f"{rel}: not listed in {MANIFEST}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        n = len(problems)
        raise BundleError(f"{path} failed verification, {n} problem{'s' if n > 1 else ''}: {shown}",
                          hint="the bundle changed after packing; restore it from its archive or re-pack")
    result = {"files": len(manifest["files"]), "selftest": None}
    if selftest:
        result["selftest"] = _run_selftest(path, python, provider)
    return result


def _run_selftest(path: Path, python: str, provider: str | None) -> dict:
    flag = "--device" if load_manifest(path)["runtime"].get("name") == "openvino" else "--provider"
    with tempfile.TemporaryDirectory(prefix="edgepack-selftest-") as d:
        out = Path(d) / "selftest.json"
        cmd = [python, "run.py", "--selftest", "--json", str(out)] + ([flag, provider] if provider else [])
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BundleError(f"could not run the self-test of {path}: {e}") from None
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        if proc.returncode != 0:
            raise BundleError(f"self-test of {path} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"self-test of {path} wrote no readable result ({e})") from None
        data["line"] = lines[0] if lines else ""
        return data
