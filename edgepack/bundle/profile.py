"""`edgepack profile BUNDLE`: the bundle runner's own benchmark, run in-process, plus an operator profile."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgepack.bundle.manifest import load_manifest
from edgepack.errors import BundleError, DataError
from edgepack.runner import run as runner
from edgepack.types import Artifact, ModelFormat


def tile(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Feeds of `batch` samples made by repeating the first sample."""
    return {k: np.repeat(v[:1], batch, axis=0) for k, v in feeds.items()}


def spec_from_manifest(runtime: dict, device: str | None = None):
    """The RuntimeSpec a manifest's runtime section describes; `device` overrides its provider/device."""
    from edgepack.target import RuntimeSpec

    spec = RuntimeSpec(runtime=runtime["name"], provider=runtime.get("provider"), device=runtime.get("device"),
                       inference_precision=runtime.get("inference_precision"),
                       provider_options=runtime.get("provider_options") or {}, fallback=runtime.get("fallback"),
                       disabled_optimizers=tuple((runtime.get("settings") or {}).get("disabled_optimizers") or ()))
    if device:
        field = "provider" if runtime.get("provider") else "device"
        spec = spec.model_copy(update={field: device, "provider_options": {}})
    return spec


def bundle_session(bundle: Path, manifest: dict, threads: int | None, provider: str | None):
    """A session on the bundle's model with the manifest's settings (what pack timed and run.py runs)."""
    from edgepack.runtimes import open_session

    rt = manifest["runtime"]
    files = tuple(bundle / f for f in manifest["files"] if f.startswith("model"))
    fmt = ModelFormat.OPENVINO if rt["model"].endswith(".xml") else ModelFormat.ONNX
    art = Artifact(path=bundle / rt["model"], format=fmt, files=files)
    return open_session(art, spec_from_manifest(rt, provider), settings=runner.settings_of(rt, threads))


def profile_bundle(bundle: Path, *, batches: list[int], time_s: float, warmup: int, threads: int | None,
                   provider: str | None, out: Path | None) -> dict:
    """run.py's benchmark at each batch size (the same code as `run.py --benchmark`) and an op profile."""
    manifest = load_manifest(bundle)
    sweep, first = [], None
    for b in batches:
        try:
            prof = runner.benchmark(bundle, provider=provider, threads=threads, batch=b, warmup=warmup,
                                    time_s=time_s)
        except runner.InputError as e:
            if len(batches) > 1 and "fixed batch" in str(e):
                continue
            raise BundleError(str(e)) from None
        except runner.RunError as e:
            raise BundleError(str(e)) from None
        first = first or prof
        sweep.append(prof["latency"])
    if first is None:
        raise BundleError(f"no batch size in {batches} fits the bundle's fixed batch",
                          hint="pass the bundle's own batch with --batch")
    data = {**first, "tool": "edgepack profile", "batch_sweep": sweep,
            "bundle": {**first["bundle"], "path": str(bundle)}}
    try:
        session = bundle_session(bundle, manifest, threads, provider)
        ref = runner.load_inputs(bundle / manifest["reference"]["inputs"], manifest["inputs"])
        data["op_profile"] = session.op_profile(tile(ref, first["batch"]))
    except (DataError, runner.RunError) as e:
        data["op_profile"] = []
        data["op_profile_error"] = str(e)
    if out is not None:
        Path(out).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return data
