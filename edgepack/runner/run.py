#!/usr/bin/env python3
"""Standalone runner for an edgepack bundle. Needs only numpy and the bundle's runtime.

    python run.py --selftest                      # file hashes + reference outputs, PASS/FAIL, exit 0/1
    python run.py --input x.npz --output y.npz    # keys = input names (.npy for a single input); bad input: exit 2
    python run.py --benchmark [--warmup N] [--iterations N | --time S] [--threads N] [--batch B] [--json out.json]
    --provider NAME (ONNX Runtime) / --device NAME (OpenVINO) override the manifest; there is no silent fallback.

edgepack imports summarize(), open_model(), load_inputs() and check_inputs() from here, so keep this file free of
any import beyond the standard library, numpy and the runtime.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ONNX Runtime writes a device id under ~/.cache otherwise


def summarize(times_ms: list[float], batch: int = 1, blocks: list[int] | None = None) -> dict:
    """Latency statistics of per-iteration times (ms): percentiles, spread, a 95% CI for p50.

    ``blocks``: the runs per timing block, in order. Runs inside a block share the host's state of that
    moment, so with MIN_BLOCKS blocks or more the CI also spans the one the block medians give (a host that
    drifts between blocks widens it; thousands of runs alone would make it look tight).
    """
    xs = sorted(float(t) for t in times_ms)
    n = len(xs)
    if n == 0:
        raise ValueError("no timings")

    def pct(q: float) -> float:
        pos = (n - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    # Distribution-free CI of the median: order statistics at n/2 -+ 1.96*sqrt(n)/2.
    ci = median_ci(xs)
    if blocks and len(blocks) >= MIN_BLOCKS and sum(blocks) == n:
        medians, start = [], 0
        for size in blocks:
            part = sorted(float(t) for t in times_ms[start:start + size])
            medians.append(part[len(part) // 2])
            start += size
        by_block = median_ci(sorted(medians))
        ci = [min(ci[0], by_block[0]), max(ci[1], by_block[1])]
    return {
        "iterations": n,
        "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
        "mean": mean, "std": std, "min": xs[0], "max": xs[-1],
        "p50_ci95": ci,
        "cv": std / mean if mean > 0 else 0.0,
        "throughput": batch * 1000.0 / mean if mean > 0 else 0.0,
    }


MIN_BLOCKS = 3  # timing blocks from which their medians bound the p50's CI too (below 6: their range)


def median_ci(xs: list[float]) -> list[float]:
    """Distribution-free 95% CI of the median of sorted values: the order statistics j and n+1-j (1-based),
    j = floor((n - 1.96*sqrt(n))/2). Symmetric: the CI of 1/x is 1/x's CI reversed, so whether a ratio a/b
    is apart from 1 does not depend on which of the two is a."""
    n = len(xs)
    j = int(math.floor((n - 1.96 * math.sqrt(n)) / 2))
    return [xs[max(0, j - 1)], xs[min(n - 1, n - j)]]


# ---------------------------------------------------------------- errors and files

class RunError(Exception):
    """A problem the user can fix; main() prints it as one line. code: the exit status."""

    code = 1


class InputError(RunError):
    code = 2


MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # of manifests, reports and profiles (edgepack.types re-exports it)
_CHUNK = 1 << 20
MAX_MANIFEST = 64 << 20  # bytes read from manifest.json at most
MAX_DATA_MB = ("EDGEPACK_MAX_DATA_MB", 4096)  # cap on the arrays of one input file (edgepack.safeio's too)


def _unique_keys(pairs) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_manifest(path: Path):
    import stat

    if path.is_symlink():
        raise RunError(f"{path} is a symlink; a bundle's manifest must be a plain file in the bundle")
    st = os.stat(path)  # FileNotFoundError handled by the caller
    if not stat.S_ISREG(st.st_mode):
        raise RunError(f"{path} is not a regular file; restore it from the original bundle")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST + 1)
    if len(raw) > MAX_MANIFEST:
        raise RunError(f"{path} is over {MAX_MANIFEST >> 20} MB; it is not a manifest edgepack wrote")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_manifest(bundle_dir) -> dict:
    path = Path(bundle_dir) / MANIFEST
    try:
        data = _read_manifest(path)
    except FileNotFoundError:
        raise RunError(f"{path} not found; run this from an edgepack bundle or pass --bundle DIR") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not readable JSON ({e}); restore it from the original bundle") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
        raise RunError(f"{path} has schema_version {found!r}; this runner reads {SCHEMA_VERSION}; "
                       "re-pack the model with the matching edgepack version")
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("runtime"), dict):
        raise RunError(f"{path} lacks 'files' or 'runtime'; restore it from the original bundle")
    if not _well_formed(data):
        raise RunError(f"{path} has malformed 'inputs', 'outputs', 'runtime' or 'reference'; restore it from the "
                       "original bundle")
    return data


def _dtype_ok(name) -> bool:
    try:
        return isinstance(name, str) and not np.dtype(name).hasobject
    except TypeError:
        return False


def _well_formed(data: dict) -> bool:
    """The fields the runner reads have the types it expects (anyone can recompute a manifest's hashes)."""
    specs = [data.get("inputs", []), data.get("outputs", [])]
    rt, ref = data["runtime"], data.get("reference", {})
    number = (int, float, type(None))
    return (all(isinstance(x, list) and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                            and isinstance(s.get("shape"), list) and _dtype_ok(s.get("dtype"))
                                            for s in x) for x in specs)
            and all(isinstance(rt.get(k), (str, type(None))) for k in ("name", "model", "provider", "device"))
            and isinstance(rt.get("settings") or {}, dict) and isinstance(rt.get("provider_options") or {}, dict)
            and isinstance(ref, dict) and all(isinstance(ref.get(k), number) for k in ("rtol", "atol", "top1_min"))
            and all(isinstance(s.get("atol"), number) for s in data.get("outputs", []))
            and all(isinstance(ref.get(k, ""), str) for k in ("inputs", "outputs")))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own `manifest_sha256` field (canonical JSON).

    It makes an edited manifest evident (a changed tolerance, provider or metric), not forgery-proof:
    anyone can recompute it. Sign the archive for that.
    """
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_files(bundle_dir, manifest: dict) -> list[str]:
    """One line per listed file that is missing, unsafe, or whose size or sha256 differs from the manifest."""
    root, problems = Path(bundle_dir), []
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        problems.append(f"{MANIFEST}: content changed after packing (manifest_sha256 does not match)")
    real_root = root.resolve()
    for rel, want in sorted(manifest["files"].items()):
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts or "\x00" in rel or not isinstance(want, dict):
            problems.append(f"{rel}: unsafe path in manifest")
            continue
        p = root / rel
        if p.is_symlink() or not p.resolve().is_relative_to(real_root):  # a symlinked folder on the way too
            problems.append(f"{rel}: is a symlink")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != want.get("size"):
            problems.append(f"{rel}: size {p.stat().st_size} != {want.get('size')} in manifest")
        elif sha256_file(p) != want.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def save_npz(path, arrays: dict) -> None:
    """np.savez without its keyword clashes (an input named 'file'), with fixed zip timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


# ---------------------------------------------------------------- inputs

def batch_axis(spec: dict) -> int | None:
    """An input's or output's sample axis from the manifest (None: one value for all samples)."""
    if "batch_axis" in spec:
        return spec["batch_axis"]
    return 0 if spec.get("shape") else None


def _shape_ok(shape, spec_shape, chunks: bool, axis: int | None) -> bool:
    if len(shape) != len(spec_shape):
        return False
    if chunks and axis is not None and isinstance(spec_shape[axis], int) and spec_shape[axis] > 0:
        if shape[axis] == 0 or shape[axis] % spec_shape[axis]:
            return False
        shape, spec_shape = [d for i, d in enumerate(shape) if i != axis], [d for i, d in enumerate(spec_shape) if i != axis]
    return all(not isinstance(d, int) or d == s for d, s in zip(spec_shape, shape))


def _describe(spec: dict) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in spec["shape"])
    return f"{spec['dtype']} [{dims}]"


def check_inputs(feeds: dict, specs: list[dict], *, chunks: bool = False) -> dict:
    """Feeds checked against the manifest's input specs and cast to their dtypes; InputError (exit 2) if not.

    chunks=True: a fixed leading (batch) dim may also be any multiple of it (run_all feeds such sets in chunks).
    """
    names = [s["name"] for s in specs]
    unknown = [k for k in feeds if k not in names]
    if unknown:
        raise InputError(f"unknown input '{unknown[0]}'; the model's inputs are: {', '.join(names)}")
    out = {}
    for spec in specs:
        name = spec["name"]
        if name not in feeds:
            raise InputError(f"input '{name}' is missing; expected {_describe(spec)}")
        arr, want = np.asarray(feeds[name]), np.dtype(spec["dtype"])
        ax = batch_axis(spec)
        if not _shape_ok(arr.shape, spec["shape"], chunks, ax):
            lead = spec["shape"][ax] if ax is not None else None
            more = f" (or a multiple of {lead} samples)" if chunks and isinstance(lead, int) else ""
            raise InputError(f"input '{name}' has shape {list(arr.shape)}; expected {_describe(spec)}{more}")
        if arr.dtype != want and not np.can_cast(arr.dtype, want, "same_kind"):
            raise InputError(f"input '{name}' has dtype {arr.dtype}; expected {_describe(spec)}")
        out[name] = np.asarray(arr, dtype=want, order="C")  # rank 0 stays rank 0
    return out


def _data_cap() -> int:
    try:
        return int(float(os.environ.get(MAX_DATA_MB[0]) or MAX_DATA_MB[1]) * (1 << 20))
    except ValueError:
        return MAX_DATA_MB[1] << 20


def _npy_bytes(f) -> int:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return math.prod(int(d) for d in shape) * dtype.itemsize


def _check_array_file(path: Path) -> None:
    """Before loading: a regular file whose declared array sizes fit the file and the cap (zip bombs, forged
    .npy headers); InputError otherwise. FileNotFoundError passes through."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is not a regular file (a folder, FIFO or device); pass a .npy/.npz file")
    cap = _data_cap()
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            if not zipfile.is_zipfile(path):
                return  # np.load says what it is not
            with zipfile.ZipFile(path) as z:
                declared = sum(i.file_size for i in z.infolist())
                big = [i for i in z.infolist() if i.filename.endswith(".npy")]
                if declared <= cap:
                    for info in big:
                        with z.open(info) as m:
                            if _npy_bytes(m) > info.file_size:
                                raise InputError(f"{path}: {info.filename} declares more data than it holds; "
                                                 "the file is truncated or forged")
        else:
            f.seek(0)
            declared = _npy_bytes(f)
            if declared > st.st_size - f.tell():
                raise InputError(f"{path} declares more data than it holds; the file is truncated or forged")
    if declared > cap:
        raise InputError(f"{path} would unpack to {declared / (1 << 20):.0f} MB, over the {cap >> 20} MB limit "
                         f"(a decompression bomb?); set {MAX_DATA_MB[0]} to raise it")


def load_inputs(path, specs: list[dict], *, chunks: bool = True) -> dict:
    """Read .npy (single-input models) or .npz (keys = input names; 'x' for a single input), then check_inputs."""
    path = Path(path)
    try:
        _check_array_file(path)
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.ndarray):
            with data:
                data = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a readable .npy/.npz file without pickles ({e})") from None
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise InputError(f"{path} holds one array but the model has {len(specs)} inputs; "
                             f"pass an .npz with keys {', '.join(s['name'] for s in specs)}")
        feeds = {specs[0]["name"]: data}
    else:
        feeds = data
        if len(specs) == 1 and list(feeds) == ["x"] and specs[0]["name"] != "x":
            feeds = {specs[0]["name"]: feeds["x"]}
    return check_inputs(feeds, specs, chunks=chunks)


# ---------------------------------------------------------------- sessions

def settings_of(runtime: dict, threads=None) -> dict:
    """The session settings from the manifest's runtime section (what pack timed with); `threads` overrides.

    threads 0 means the host's physical cores (ONNX Runtime: unpinned unless pin_threads; see ort_session_options).
    """
    s = dict(runtime.get("settings") or {})
    if threads:
        s["threads"] = int(threads)
    return s


def ort_session_options(settings: dict):
    """onnxruntime.SessionOptions for these settings (pack's timing sessions use this too)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = int(settings.get("threads") or 0)
    if not threads and not settings.get("pin_threads", False):
        # ONNX Runtime pins its pool threads to cores when it picks their count itself, but not the caller's
        # thread: when the scheduler puts that on a pinned thread's core, the two share it (3.3x slower on a
        # 2-core VM, at random from one process to the next). The same count, unpinned:
        threads = physical_cores()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = int(settings.get("inter_op_threads") or 0)
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if settings.get("execution_mode") == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(settings.get("graph_optimization_level"), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.log_severity_level = 3  # errors only
    if not settings.get("allow_spinning", True):
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def physical_cores() -> int:
    """The physical cores this process may run on (ONNX Runtime's own default thread count); 0 (the runtime's
    default) where the topology cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
        cores = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                 for c in cpus}
    except (AttributeError, OSError):  # not Linux, or no sysfs
        return 0
    return len(cores)


def ort_session_kwargs(settings: dict) -> dict:
    """InferenceSession keywords beyond SessionOptions: graph optimizers turned off by name."""
    off = settings.get("disabled_optimizers") or []
    if not isinstance(off, list) or not all(isinstance(n, str) for n in off):
        raise RunError(f"settings.disabled_optimizers must be a list of optimizer names, got {off!r}")
    return {"disabled_optimizers": off} if off else {}


def ov_config(settings: dict) -> dict:
    """OpenVINO compile properties for these settings; the inference precision is always pinned."""
    cfg = {"PERFORMANCE_HINT": settings.get("performance_hint") or "LATENCY",
           "INFERENCE_PRECISION_HINT": settings.get("inference_precision") or "f32"}
    if settings.get("num_streams"):
        cfg["NUM_STREAMS"] = int(settings["num_streams"])
    if settings.get("threads"):
        cfg["INFERENCE_NUM_THREADS"] = int(settings["threads"])
    if "cpu_pinning" in settings:  # CPU device only
        cfg["ENABLE_CPU_PINNING"] = bool(settings["cpu_pinning"])
    return cfg


def _model_file(bundle_dir: Path, manifest: dict, name: str) -> Path:
    if name not in manifest["files"] or "/" in name:
        raise RunError(f"the model file {name!r} is not listed in {bundle_dir / MANIFEST}")
    return bundle_dir / name


def reference_file(bundle_dir, manifest: dict, kind: str) -> Path:
    """reference/inputs.npz or outputs.npz, as the manifest names it; only a file the manifest lists."""
    rel = (manifest.get("reference") or {}).get(kind, f"reference/{kind}.npz")
    if not isinstance(rel, str) or rel not in manifest["files"]:
        raise RunError(f"the reference {kind} {rel!r} is not listed in {Path(bundle_dir) / MANIFEST}")
    return Path(bundle_dir) / rel


LIBRARY_OPTIONS = ("backend_path",)  # a shared library that the system loader finds by its name


def _abs_options(bundle_dir: Path, options: dict) -> dict:
    """Path-valued provider options (trt_engine_cache_path, ...) are relative to the bundle and must stay in it."""
    out, root = {}, Path(bundle_dir).resolve()
    for k, v in options.items():
        if isinstance(v, str) and k in LIBRARY_OPTIONS:
            if "/" in v or "\\" in v:
                raise RunError(f"provider option {k}={v!r} in {root / MANIFEST}: give a library name "
                               "(e.g. libQnnHtp.so), not a path")
        elif isinstance(v, str) and k.endswith(("_path", "_dir", "_file")) and v:
            p = (root / v).resolve()
            if Path(v).is_absolute() or not p.is_relative_to(root):
                raise RunError(f"provider option {k}={v!r} in {root / MANIFEST} points outside the bundle; "
                               "paths in provider options must stay inside it")
            v = str(p)
            if k.endswith(("cache_path", "_dir")):
                p.mkdir(parents=True, exist_ok=True)
        out[k] = v
    return out


class Model:
    """A loaded model: run(feeds) -> outputs in manifest order; `handle` is the runtime's own object."""

    def __init__(self, run, runtime, runtime_version, device_used, load_ms, inputs, outputs, inner_ms=None,
                 handle=None):
        self._run = run
        self.inner_ms = inner_ms  # the runtime's own time of the last run (OpenVINO), or None
        self.runtime, self.runtime_version, self.device_used = runtime, runtime_version, device_used
        self.load_ms, self.inputs, self.outputs, self.handle = load_ms, inputs, outputs, handle

    def run(self, feeds: dict) -> list:
        return self._run(feeds)


def open_onnxruntime(path, device, settings: dict, *, options=None, outputs=None, inputs=None) -> Model:
    """An ONNX model on one ONNX Runtime provider; RunError when the provider is absent or fails."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RunError("onnxruntime is not installed; pip install -r requirements.txt") from None
    wanted = device or "CPUExecutionProvider"
    available = ort.get_available_providers()
    if wanted not in available:
        raise RunError(f"provider {wanted} not available here; available: {', '.join(available)}; "
                       f"pass --provider CPUExecutionProvider to run on CPU")
    providers = [(wanted, dict(options or {}))]
    if wanted == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {}))  # TensorRT hands unsupported subgraphs to CUDA
    if wanted != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))  # nodes the provider lacks, as ORT does by design
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), ort_session_options(settings), providers=providers,
                                    **ort_session_kwargs(settings))
    except Exception as e:  # ORT raises its own exception types
        raise RunError(f"onnxruntime could not load the model with {wanted}: {str(e).strip().splitlines()[0]}") from None
    load_ms = (time.perf_counter() - t0) * 1000
    if sess.get_providers()[0] != wanted:
        raise RunError(f"onnxruntime did not enable {wanted} (its libraries may be missing); "
                       f"pass --provider CPUExecutionProvider to run on CPU")
    names = [o["name"] for o in outputs or []] or [o.name for o in sess.get_outputs()]
    return Model(lambda feeds: sess.run(names, feeds), ort.__name__, ort.__version__, wanted, load_ms,
                 inputs or [], outputs or [], handle=sess)


def open_openvino(path, device, settings: dict, *, options=None, outputs=None, inputs=None) -> Model:
    """An IR (or ONNX) model compiled on one OpenVINO device, precision pinned; RunError when absent."""
    try:
        import openvino as ov
    except ImportError:
        raise RunError("openvino is not installed; pip install -r requirements.txt") from None
    device = device or "CPU"
    core = ov.Core()
    available = list(core.available_devices)
    virtual = device.split(":")[0] in ("AUTO", "MULTI", "HETERO", "BATCH")
    if not virtual and not any(d == device or d.split(".")[0] == device for d in available):
        raise RunError(f"device {device} not available here; available: {', '.join(available)}; "
                       f"pass --device CPU to run on CPU")
    t0 = time.perf_counter()
    try:
        compiled = core.compile_model(str(path), device, ov_config(settings))
    except Exception as e:
        raise RunError(f"openvino could not compile the model for {device}: {str(e).strip().splitlines()[0]}") from None
    load_ms = (time.perf_counter() - t0) * 1000
    request = compiled.create_infer_request()
    index: dict = {}
    for i, port in enumerate(compiled.outputs):
        for n in port.get_names():
            index.setdefault(n, i)
    names = [o["name"] for o in outputs or []]
    order = [index.get(n, i) for i, n in enumerate(names)] or list(range(len(compiled.outputs)))

    def run(feeds):
        request.infer(feeds, share_inputs=True)  # no input copy: infer is synchronous
        return [request.get_output_tensor(i).data.copy() for i in order]

    return Model(run, ov.__name__, ov.__version__.split("-")[0], device, load_ms, inputs or [], outputs or [],
                 lambda: float(request.latency), handle=(core, compiled, request))


def open_model(bundle_dir, provider=None, threads=None, manifest=None) -> Model:
    """Load the bundle's model on its runtime; provider overrides the ORT provider or the OpenVINO device."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = manifest or load_manifest(bundle_dir)
    rt = manifest["runtime"]
    opener = globals().get(f"open_{rt.get('name')}")
    if opener is None or not rt.get("model"):
        raise RunError(f"runtime {rt.get('name')!r} in {bundle_dir / MANIFEST} is not one this runner knows, or "
                       "the manifest names no model file; re-pack the bundle with this edgepack version")
    own = rt.get("provider") or rt.get("device")
    device = provider or own
    options = _abs_options(bundle_dir, rt.get("provider_options") or {}) if device == own else {}
    return opener(_model_file(bundle_dir, manifest, rt["model"]), device, settings_of(rt, threads),
                  options=options, outputs=manifest.get("outputs"), inputs=manifest.get("inputs"))


def _fixed_batch(specs) -> int | None:
    dims = {s["shape"][batch_axis(s)] for s in specs
            if batch_axis(s) is not None and isinstance(s["shape"][batch_axis(s)], int)}
    return dims.pop() if len(dims) == 1 else None


def _take(a, axis: int | None, idx):
    return a if axis is None else np.take(a, idx, axis=axis)


def _samples(feeds: dict, specs: list[dict]) -> int:
    by_name = {s["name"]: batch_axis(s) for s in specs}
    return next((int(v.shape[by_name[k]]) for k, v in feeds.items() if by_name.get(k) is not None), 1)


def run_all(model: Model, feeds: dict) -> list:
    """Run every sample; models with a fixed batch get the samples in chunks of that batch (on each input's and
    output's own batch axis)."""
    b = _fixed_batch(model.inputs)
    n = _samples(feeds, model.inputs)
    if not b or n == b or n % b:
        return model.run(feeds)
    axes = {s["name"]: batch_axis(s) for s in model.inputs}
    parts = [model.run({k: _take(v, axes.get(k, 0), range(i, i + b)) for k, v in feeds.items()})
             for i in range(0, n, b)]
    out_axes = [batch_axis(o) for o in model.outputs] or [0] * len(parts[0])
    return [np.concatenate(p, axis=ax) if ax is not None else np.stack(p) for p, ax in zip(zip(*parts), out_axes)]


# ---------------------------------------------------------------- selftest

def selftest(bundle_dir, provider=None, threads=None) -> dict:
    """Hashes, then the reference inputs through the model, compared with the reference outputs."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = load_manifest(bundle_dir)
    problems = check_files(bundle_dir, manifest)
    result: dict = {"passed": False, "files": len(manifest["files"]), "problems": problems, "max_abs_diff": None}
    if problems:
        return result
    ref = manifest.get("reference") or {}
    rtol, atol, top1_min = float(ref.get("rtol", 1e-3)), float(ref.get("atol", 1e-4)), ref.get("top1_min")
    inputs = load_inputs(reference_file(bundle_dir, manifest, "inputs"), manifest["inputs"])
    out_file = reference_file(bundle_dir, manifest, "outputs")
    _check_array_file(out_file)
    with np.load(out_file, allow_pickle=False) as z:
        expected = [z[o["name"]] for o in manifest["outputs"]]
    model = open_model(bundle_dir, provider, threads, manifest)
    got = run_all(model, inputs)
    result.update(device_used=model.device_used, runtime=model.runtime, rtol=rtol, atol=atol, outputs=[])
    if len(got) != len(expected):
        problems.append(f"the model returned {len(got)} outputs; the manifest lists {len(expected)}")
    worst = 0.0
    for spec, want, have in zip(manifest["outputs"], expected, got):
        have = np.asarray(have)
        row = {"name": spec["name"]}
        if have.shape != want.shape:
            problems.append(f"output '{spec['name']}' has shape {list(have.shape)}, reference {list(want.shape)}")
            continue
        w, h = want.astype(np.float64), have.astype(np.float64)
        diff = np.abs(h - w)
        row["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
        worst = max(worst, row["max_abs_diff"])
        # each output's own atol (from its range when packed; integers exact), else the reference's one
        a, r = float(spec.get("atol", atol)), 0.0 if want.dtype.kind in "biu" else rtol
        bad = int(np.count_nonzero(diff > a + r * np.abs(w)))
        if bad:
            problems.append(f"output '{spec['name']}': {bad} of {diff.size} values outside rtol={r:g} atol={a:g} "
                            f"(max abs diff {row['max_abs_diff']:.3g})")
        ax = batch_axis(spec)
        if top1_min is not None and w.ndim == 2 and ax is not None and w.shape[1 - ax] > 1 and want.dtype.kind == "f":
            agree = float(np.mean(np.argmax(w, 1 - ax) == np.argmax(h, 1 - ax)))
            row["top1_agreement"] = agree
            if agree < float(top1_min):
                problems.append(f"output '{spec['name']}': top-1 agreement {agree:.3f} < {float(top1_min):.3f}")
        result["outputs"].append(row)
    result.update(passed=not problems, max_abs_diff=worst)
    return result


def _selftest_line(r: dict) -> str:
    if r["problems"]:
        more = f" (+{len(r['problems']) - 1} more)" if len(r["problems"]) > 1 else ""
        return f"FAIL selftest: {r['problems'][0]}{more}"
    top1 = [o["top1_agreement"] for o in r["outputs"] if "top1_agreement" in o]
    extra = f", top-1 agreement {min(top1):.3f}" if top1 else ""
    return (f"PASS selftest: {r['files']} files match, outputs within rtol={r['rtol']:g} atol={r['atol']:g} "
            f"(max abs diff {r['max_abs_diff']:.3g}{extra}) on {r['runtime']} {r['device_used']}")


# ---------------------------------------------------------------- benchmark

BLOCK = 10  # timed runs per turn when several models are timed together (at least)
BLOCK_S = 0.05  # ... and at least this long: switching models costs a sub-ms model 20-60% for its next runs
SETTLE = 2  # untimed runs at the start of each turn (at least; a tenth of the block)
SETTLE_S = 0.0  # ... and at least this long


def _rss_mb() -> float:
    """Peak RSS of this process so far (MB): ru_maxrss where it exists, else psutil's current RSS."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024
    except ImportError:
        try:
            import psutil

            return psutil.Process().memory_info().rss / (1024 * 1024)
        except ImportError:
            return 0.0


_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
             "neon", "asimd", "asimddp", "i8mm", "sve")


def host_fingerprint() -> dict:
    """This machine: CPU model, architecture, logical cores, the CPU features kernels care about, OS, Python."""
    cpu, flags = platform.processor() or platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    arch = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    return {"cpu": cpu, "arch": arch, "cores": os.cpu_count() or 1, "features": [f for f in _FEATURES if f in flags],
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def benchmark_feeds(bundle_dir, manifest: dict, batch: int | None) -> tuple[dict, int]:
    """The reference inputs repeated or cut to `batch` samples (default: the model's fixed batch, else 1)."""
    fixed = _fixed_batch(manifest["inputs"])
    if batch is not None and batch < 1:
        raise InputError(f"--batch {batch}: must be 1 or more")
    if batch and fixed and batch != fixed:
        raise InputError(f"this model takes a fixed batch of {fixed}; pass --batch {fixed}")
    batch = batch or fixed or 1
    ref_in = load_inputs(reference_file(bundle_dir, manifest, "inputs"), manifest["inputs"])
    axes = {s["name"]: batch_axis(s) for s in manifest["inputs"]}
    n = _samples(ref_in, manifest["inputs"])
    return {k: np.asarray(_take(v, axes[k], np.arange(batch) % n), order="C") for k, v in ref_in.items()}, batch


def _inside(ms: list, batch: int):
    """Summary of the runtime's own per-inference times (OpenVINO's InferRequest.latency), or None."""
    if not ms:
        return None
    s = summarize(ms, batch)
    return {"p50": s["p50"], "p90": s["p90"], "iterations": s["iterations"],
            "source": "OpenVINO InferRequest.latency: time inside the runtime, as benchmark_app reports it"}


class Timed:
    """One model on its feeds, run in this process: the unit the timing loop interleaves (edgepack's pack gives
    it the same two methods from a process of each candidate's own)."""

    def __init__(self, model, feeds: dict):
        self.model, self.feeds = model, feeds

    def warm(self, n: int) -> tuple[float, list[float]]:
        """The first run's time and n warm-up runs' times (ms)."""
        t0 = time.perf_counter()
        self.model.run(self.feeds)
        first = (time.perf_counter() - t0) * 1000
        return first, [self._once() for _ in range(max(0, n))]

    def block(self, runs: int, settle: int, after=None, ready=None) -> tuple[list[float], list[float]]:
        """`settle` untimed runs (and more until ``ready()`` says go, where given; ``after``, the unit timed just
        before, is first waited on to go idle where it can), then `runs` timed ones with garbage collection off:
        their times, and the runtime's own times where it reports them (ms)."""
        import gc

        if after is not None and hasattr(after, "quiet"):
            after.quiet()
        gc_on = gc.isenabled()
        gc.disable()
        try:
            for _ in range(settle):
                self.model.run(self.feeds)
            while ready is not None and not ready():
                self.model.run(self.feeds)
            times, inside = [], []
            for _ in range(runs):
                times.append(self._once())
                if self.model.inner_ms is not None:
                    inside.append(self.model.inner_ms())
            return times, inside
        finally:
            if gc_on:
                gc.enable()

    def _once(self) -> float:
        t0 = time.perf_counter()
        self.model.run(self.feeds)
        return (time.perf_counter() - t0) * 1000


def time_models(models: dict, feeds: dict, **kw) -> dict:
    """Time several models of this process on their feeds, interleaved in blocks (see interleave)."""
    return interleave({name: Timed(m, feeds[name]) for name, m in models.items()}, **kw)


def interleave(timed: dict, *, warmup: int = 10, iterations=None, time_s: float = 2.0, min_iterations: int = 5,
               max_iterations: int = 100000) -> dict:
    """Time several models, interleaved in blocks (A×n B×m A×n ...); {name: {...}}. ``timed``: {name: Timed, or
    anything with its warm() and block()}.

    Each model is warmed up, then gets `iterations` runs (or as many as fit `time_s` from its warm-up
    speed, within [min_iterations, max_iterations]). Blocks of at least BLOCK runs and BLOCK_S seconds, not
    single runs: a runtime keeps its idle threads spinning for a moment after a run, and a model's weights
    leave the caches while another runs, which would land on the next runs' times; each block starts with
    untimed settle runs for the same reason. Host drift hits every model alike.
    Returns {name: {"times": [ms...], "inside": [ms...], "first_ms": ms, "blocks": [runs per block...]}}.
    """
    out: dict[str, dict] = {}
    counts: dict[str, int] = {}
    blocks: dict[str, int] = {}  # runs per turn: BLOCK, or as many as fill BLOCK_S
    settle: dict[str, int] = {}
    for name, t in timed.items():
        first, warm = t.warm(warmup)
        tail = warm[len(warm) // 2:] or [first]
        est = sorted(tail)[len(tail) // 2]
        counts[name] = int(iterations) if iterations else max(min_iterations, min(max_iterations,
                                                                                  int(time_s * 1000 / max(est, 1e-3))))
        blocks[name] = max(BLOCK, int(BLOCK_S * 1000 / max(est, 1e-3)))
        settle[name] = max(SETTLE, blocks[name] // 10, int(SETTLE_S * 1000 / max(est, 1e-3)))
        out[name] = {"times": [], "inside": [], "first_ms": first, "blocks": []}
    single = len(timed) == 1
    # a noisy host can make the warm-up look faster than the runs: never run past 3x the planned time
    deadline = None if iterations else time.perf_counter() + 3.0 * time_s * len(timed)
    prev = None  # the unit timed just before: its threads may still spin (each block waits for them to idle)
    while any(len(out[n]["times"]) < counts[n] for n in timed):
        if deadline is not None and time.perf_counter() > deadline and \
                all(len(out[n]["times"]) >= min_iterations for n in timed):
            break
        for name, t in timed.items():
            left = counts[name] - len(out[name]["times"])
            if left <= 0:
                continue
            times, inside = t.block(left if single else min(blocks[name], left), 0 if single else settle[name],
                                    None if prev is t else prev)
            prev = t
            out[name]["times"] += times
            out[name]["inside"] += inside
            out[name]["blocks"].append(len(times))
    return out


def _profile(bundle_dir: Path, manifest: dict, model: Model, timed: dict, batch: int, warmup: int, threads,
             rss0: float) -> dict:
    """The profile JSON of one timed model."""
    times = timed["times"]
    latency = summarize(times, batch)
    latency.update(batch=batch, warmup=warmup, load_ms=model.load_ms, first_ms=timed["first_ms"],
                   peak_memory_mb=max(0.0, _rss_mb() - rss0),
                   samples_ms=[round(t, 4) for t in times[::max(1, len(times) // 1000)]])  # <= ~1000, for plots
    rt = manifest.get("runtime") or {}
    return {
        "schema_version": SCHEMA_VERSION, "kind": "profile",
        "bundle": {"name": manifest.get("name") or bundle_dir.name,
                   "target": (manifest.get("target") or {}).get("name"), "precision": manifest.get("precision")},
        "host": host_fingerprint(), "runtime": model.runtime, "runtime_version": model.runtime_version,
        "device_used": model.device_used, "inference_precision": rt.get("inference_precision"),
        "settings": settings_of(rt, threads), "threads": threads, "batch": batch, "latency": latency,
        "batch_sweep": [latency], "tool": "run.py", "runtime_latency": _inside(timed["inside"], batch),
    }


def benchmark(bundle_dir, *, provider=None, threads=None, batch=None, warmup=10, iterations=None,
              time_s=2.0) -> dict:
    """Latency of the bundle's model here, as the profile JSON."""
    return benchmark_set([bundle_dir], provider=provider, threads=threads, batch=batch, warmup=warmup,
                         iterations=iterations, time_s=time_s)["results"][Path(bundle_dir).resolve().name]


def benchmark_set(bundle_dirs, *, provider=None, threads=None, batch=None, warmup=10, iterations=None,
                  time_s=2.0) -> dict:
    """Several bundles (or candidate folders) timed interleaved in one process: {"results": {name: profile}}."""
    dirs = [Path(d).resolve() for d in bundle_dirs]
    if len({d.name for d in dirs}) != len(dirs):
        raise RunError("--compare folders must have different names")
    if iterations is not None and iterations < 1:
        raise InputError(f"--iterations {iterations}: must be 1 or more")
    if time_s is not None and not time_s > 0:
        raise InputError(f"--time {time_s}: must be a positive number of seconds")
    manifests, feeds, batches, models = {}, {}, {}, {}
    rss0 = _rss_mb()
    for d in dirs:
        manifests[d.name] = load_manifest(d)
        feeds[d.name], batches[d.name] = benchmark_feeds(d, manifests[d.name], batch)
        models[d.name] = open_model(d, provider, threads, manifests[d.name])
    timed = time_models(models, feeds, warmup=warmup, iterations=iterations, time_s=time_s)
    results = {d.name: _profile(d, manifests[d.name], models[d.name], timed[d.name], batches[d.name], warmup,
                                threads, rss0) for d in dirs}
    return {"schema_version": SCHEMA_VERSION, "kind": "profile-set", "host": host_fingerprint(), "results": results}


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        print(f"error: {message} (python run.py --help)", file=sys.stderr)
        sys.exit(2)


def _number(cast, low, strict=False):
    """An argparse type: `cast(text)` that is >= low (> low with strict), finite."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'more than' if strict else 'at least'} {low}")
        return v
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(description="Run, self-test or benchmark this edgepack bundle.")
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent, help="bundle folder (default: here)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", type=Path, help=".npy (single input) or .npz keyed by input name")
    mode.add_argument("--selftest", action="store_true", help="check hashes and the reference outputs")
    mode.add_argument("--benchmark", action="store_true", help="measure latency")
    p.add_argument("--output", type=Path, help="where --input writes its outputs (.npz keyed by output name)")
    p.add_argument("--provider", help="ONNX Runtime provider to use instead of the manifest's")
    p.add_argument("--device", help="OpenVINO device to use instead of the manifest's")
    p.add_argument("--threads", type=_number(int, 0), help="intra-op threads (default 0: the runtime's)")
    p.add_argument("--warmup", type=_number(int, 0), default=10)
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--iterations", type=_number(int, 1), help="timed runs (default: as many as fit in --time)")
    runs.add_argument("--time", type=_number(float, 0, strict=True), default=2.0,
                      help="seconds of timed runs (default 2)")
    p.add_argument("--batch", type=_number(int, 1), help="benchmark batch size (default: the model's fixed batch, else 1)")
    p.add_argument("--json", type=Path, help="write the selftest/benchmark result as JSON here ('-' for stdout)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="DIR",
                   help="with --benchmark: time these bundle folders interleaved, in one process")
    return p


def _write_json(dest: Path | None, data: dict) -> None:
    if dest is None:
        return
    text = json.dumps(data, indent=2)
    if str(dest) == "-":
        print(text)
    else:
        write_atomic(Path(dest), lambda f: f.write((text + "\n").encode("utf-8")))


def write_atomic(dest: Path, write) -> None:
    """write(file) into a temp file next to `dest`, then rename: `dest` is whole or untouched, never half-written.
    RunError (one line) when `dest` cannot be written."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except OSError as e:
        raise RunError(f"could not write {dest}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.provider and args.device:
        print("error: pass --provider (ONNX Runtime) or --device (OpenVINO), not both", file=sys.stderr)
        return 2
    which = args.provider or args.device
    try:
        if args.selftest:
            r = selftest(args.bundle, which, args.threads)
            print(_selftest_line(r), file=sys.stderr if str(args.json) == "-" else sys.stdout)
            _write_json(args.json, r)
            return 0 if r["passed"] else 1
        if args.benchmark and args.compare:
            r = benchmark_set(args.compare, provider=which, threads=args.threads, batch=args.batch,
                              warmup=args.warmup, iterations=args.iterations, time_s=args.time)
            if str(args.json) != "-":
                for name, prof in r["results"].items():
                    print(f"{name}: p50 {prof['latency']['p50']:.4f} ms over {prof['latency']['iterations']} runs")
            _write_json(args.json, r)
            return 0
        if args.benchmark:
            r = benchmark(args.bundle, provider=which, threads=args.threads, batch=args.batch, warmup=args.warmup,
                          iterations=args.iterations, time_s=args.time)
            lat = r["latency"]
            if str(args.json) != "-":
                print(f"p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  p99 {lat['p99']:.3f} ms  "
                      f"{lat['throughput']:.1f} samples/s  batch {lat['batch']}, {lat['iterations']} runs "
                      f"on {r['runtime']} {r['device_used']}")
            _write_json(args.json, r)
            return 0
        if args.output is not None and not args.output.parent.is_dir():
            raise RunError(f"could not write {args.output}: folder {args.output.parent} does not exist")
        manifest = load_manifest(args.bundle)
        feeds = load_inputs(args.input, manifest["inputs"])
        outs = run_all(open_model(args.bundle, which, args.threads, manifest), feeds)
        names = [o["name"] for o in manifest["outputs"]] or [f"output_{i}" for i in range(len(outs))]
        if args.output is None:  # no file asked for: a summary of each output (pass --output to keep them)
            for name, o in zip(names, outs):
                o = np.asarray(o)
                line = f"{name}: {o.dtype} {list(o.shape)}"
                if o.size and o.dtype.kind in "fiu":
                    line += f", min {o.min():.4g} max {o.max():.4g} mean {o.mean():.4g}"
                if o.ndim == 2 and o.shape[1] > 1 and o.dtype.kind == "f":
                    top = o.argmax(axis=1)[:8].tolist()
                    line += f", top-1 of the first {len(top)}: {top}"
                print(line)
            return 0
        write_atomic(args.output, lambda f: save_npz(f, dict(zip(names, outs))))
        print(f"wrote {len(outs)} output(s) for {_samples(feeds, manifest['inputs'])} sample(s) to {args.output}")
        return 0
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except OSError as e:  # permissions, a full disk, a file that vanished: one line, not a traceback
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
