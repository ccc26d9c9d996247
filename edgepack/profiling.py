"""`edgepack profile BUNDLE`: latency of a bundle on this host, in the schema of `run.py --benchmark`."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from .errors import BundleError
from .types import Artifact, ModelFormat, RuntimeName

PROFILE_SCHEMA = 1


def tile(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Feeds of `batch` samples made by repeating the first sample."""
    return {k: np.repeat(v[:1], batch, axis=0) for k, v in feeds.items()}


def bundle_session(bundle: Path, manifest: dict, threads: int, provider: str | None):
    from .runtimes import open_session
    from .target import RuntimeSpec

    rt = manifest["runtime"]
    model = next((f for f in manifest["files"] if f.endswith(".xml")), None) or next(
        (f for f in manifest["files"] if f.endswith(".onnx")), None)
    if model is None:
        raise BundleError(f"{bundle}: manifest.json lists no model file")
    fmt = ModelFormat.OPENVINO if model.endswith(".xml") else ModelFormat.ONNX
    files = tuple(bundle / f for f in manifest["files"] if f.startswith("model"))
    art = Artifact(path=bundle / model, format=fmt, files=files)
    if rt["name"] == RuntimeName.ONNXRUNTIME.value:
        options = {k: (str(bundle / v) if k.endswith("_path") and isinstance(v, str) else v)
                   for k, v in (rt.get("provider_options") or {}).items()} if not provider else {}
        spec = RuntimeSpec(runtime=RuntimeName.ONNXRUNTIME, provider=provider or rt["provider"], provider_options=options)
    else:
        spec = RuntimeSpec(runtime=RuntimeName.OPENVINO, device=provider or rt["device"],
                           inference_precision=rt.get("inference_precision") or "f32")
    return open_session(art, spec, threads=threads)


def profile_bundle(bundle: Path, *, batches: list[int], time_s: float, warmup: int, threads: int,
                   provider: str | None, out: Path | None) -> dict:
    from .bench import measure
    from .bundle import load_manifest
    from .host import host_info
    from .target import BenchSettings

    manifest = load_manifest(bundle)
    session = bundle_session(bundle, manifest, threads, provider)
    with np.load(bundle / manifest["reference"]["inputs"], allow_pickle=False) as ref:
        feeds = {k: ref[k][:1] for k in ref.files}
    settings = BenchSettings(threads=threads, warmup=warmup, min_iterations=20, time_budget_s=time_s)
    fixed = session.fixed_batch
    sweep = []
    for b in batches:
        if fixed is not None and b != fixed:
            continue
        r = measure({"bundle": session}, tile(feeds, b), settings, batch=b)["bundle"]
        d = r.to_dict()
        for k in ("runtime", "device", "threads"):  # top-level fields of the profile
            d.pop(k, None)
        d["samples_ms"] = d["samples_ms"][:: max(1, len(d["samples_ms"]) // 1000)]
        sweep.append({"batch": b, **d})
    if not sweep:
        raise BundleError(f"the bundle's batch is fixed to {fixed}; pass --batch {fixed}")
    inside = None
    if hasattr(session, "runtime_latencies"):  # OpenVINO reports its own time per inference
        from .runner.run import _inside

        n = max(20, sweep[0]["iterations"])
        inside = _inside(session.runtime_latencies(tile(feeds, sweep[0]["batch"]), n), sweep[0]["batch"])
    h = host_info()
    rt = manifest["runtime"]
    data = {
        "schema_version": PROFILE_SCHEMA,
        "kind": "profile",
        "tool": "edgepack profile",
        "bundle": {"name": manifest.get("name"), "target": manifest["target"]["name"],
                   "precision": manifest["precision"], "path": str(bundle)},
        "host": {"cpu": h.cpu, "cores": h.cores, "os": h.os, "python": platform.python_version(),
                 "features": list(h.features)},
        "runtime": rt["name"],
        "runtime_version": rt.get("version"),
        "device_used": session.device_used,
        "inference_precision": rt.get("inference_precision"),
        "threads": threads,
        "batch": sweep[0]["batch"],
        "latency": sweep[0],
        "batch_sweep": sweep,
        "runtime_latency": inside,
        "op_profile": session.op_profile(tile(feeds, sweep[0]["batch"]), iterations=20),
    }
    if out is not None:
        Path(out).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return data
