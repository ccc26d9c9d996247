"""pack --on: the candidates staged as bundle-like folders, timed on the devices, their numbers brought back."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.runner import run as runner
from edgepack.types import SCHEMA_VERSION, BenchResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Remote:
    """Where pack times its candidates instead of this host."""

    devices: tuple[str, ...]
    devices_file: Path | None = None
    choose_by: str | None = None
    keep: bool = False


def stage(b, feeds: dict[str, np.ndarray], axes: dict[str, int | None], target_name: str, dest: Path) -> Path:
    """One candidate as a folder run.py can time: model files, reference/inputs.npz, a manifest."""
    from edgepack.runtimes import get_backend

    backend = get_backend(b.plan.runtime.runtime)
    dest.mkdir(parents=True)
    model = backend.copy_model([Path(f) for f in (b.artifact.files or (b.artifact.path,))], dest)
    (dest / "reference").mkdir()
    runner.save_npz(dest / "reference" / "inputs.npz", feeds)
    session = b.session
    inputs = [{**s.to_dict(), "batch_axis": axes.get(s.name, 0)} for s in session.inputs] if session else []
    files = {p.relative_to(dest).as_posix(): {"sha256": runner.sha256_file(p), "size": p.stat().st_size}
             for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "name": b.plan.name, "precision": b.plan.precision.value,
        "target": {"name": target_name}, "candidate": b.plan.name,
        "runtime": {**backend.manifest_section(b.plan.runtime, b.settings), "model": model},
        "inputs": inputs, "outputs": [], "files": files,
        "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz"},
    }
    manifest = json.loads(json.dumps(manifest, default=str))
    manifest["manifest_sha256"] = runner.manifest_digest(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    pkg, note = backend.requirement(manifest["runtime"])
    version = manifest["runtime"].get("version")
    (dest / "requirements.txt").write_text(f"numpy>=1.24\n{pkg}=={version}\n" if version else f"numpy>=1.24\n{pkg}\n")
    return dest


def to_bench(latency: dict, runtime: str, device: str, threads: int) -> BenchResult:
    """A run.py latency dict as a BenchResult."""
    return BenchResult(
        runtime=runtime, device=device, batch=int(latency.get("batch", 1)), threads=threads,
        warmup=int(latency.get("warmup", 0)), iterations=int(latency["iterations"]), p50=latency["p50"],
        p90=latency["p90"], p99=latency["p99"], mean=latency["mean"], std=latency["std"], min=latency["min"],
        max=latency["max"], p50_ci95=tuple(latency["p50_ci95"]), throughput=latency["throughput"],
        load_ms=float(latency.get("load_ms") or 0.0), first_ms=float(latency.get("first_ms") or 0.0),
        peak_memory_mb=float(latency.get("peak_memory_mb") or 0.0), cv=latency["cv"],
        samples_ms=tuple(latency.get("samples_ms") or ()))


def time_remote(built: list, feeds: dict[str, np.ndarray], axes: dict[str, int | None], target, time_s: float,
                warmup: int, threads: int, remote: Remote, work: Path, emit) -> dict[str, Any]:
    """Time every candidate that scored on the devices, interleaved there; set each one's latency from the device
    that chooses (--choose-by, else the slowest). Returns what the report says about where it was measured."""
    from edgepack.devices.fleet import pick_device, time_on_devices
    from edgepack.runtimes import get_backend

    ok = [b for b in built if b.ok and b.fidelity is not None]
    dirs = {}
    for b in ok:
        b.settings = b.settings or get_backend(b.plan.runtime.runtime).settings(b.plan.runtime, threads)
        dirs[b.plan.name] = stage(b, feeds, axes, target.name, work / "remote" / b.plan.name)
    emit("measure", names=list(dirs))
    by_device = time_on_devices(list(remote.devices), dirs, remote.devices_file, time_s=time_s, warmup=warmup,
                                threads=threads or None, keep=remote.keep, progress=False)
    chosen_device = pick_device(by_device, remote.choose_by)
    lat = by_device[chosen_device]
    assert isinstance(lat, dict)
    host: dict = {}
    for b in ok:
        d = lat.get(b.plan.name)
        if d is None:
            b.latency, b.latency_note = None, f"not measured: {chosen_device} did not time it"
            continue
        b.latency = to_bench(d, b.plan.runtime.runtime, d.get("device_used") or b.device_used or "", threads)
        b.latency_note = None
        b.notes.append(f"measured on {chosen_device}")
        host = d.get("measured_host") or host
    others = {name: (str(v) if isinstance(v, Exception) else {c: r["p50"] for c, r in v.items()})
              for name, v in by_device.items() if name != chosen_device}
    return {"device": chosen_device, "host": host, "choose_by": remote.choose_by or "slowest device",
            "other_devices": others}
