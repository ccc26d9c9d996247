"""What runs on one device: profile a bundle (selftest + benchmark), or time pack's candidates."""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path, PurePosixPath

from .errors import DeviceError, device_error
from .remote import Cancel, Remote, Stage
from .store import Device


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeviceError(f"{path} not found; pass a bundle folder made by edgepack pack") from None
    except (OSError, ValueError) as e:
        raise DeviceError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or "runtime" not in data:
        raise DeviceError(f"{path} is not an edgepack manifest (no 'runtime')")
    return data


def _safe(rel: str, folder: Path) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DeviceError(f"{folder / 'manifest.json'}: unsafe path '{rel}' in 'files'")
    return p.as_posix()


def folder_files(folder: Path, manifest: dict) -> dict[str, Path]:
    """The manifest's files plus manifest.json; a folder without a file list sends all its files."""
    folder = Path(folder)
    if isinstance(manifest.get("files"), dict):
        rels = [_safe(r, folder) for r in manifest["files"]]
    else:
        rels = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                if p.is_file() and not p.is_symlink() and p.relative_to(folder).parts[0] != "profiles"]
    files = {rel: folder / rel for rel in rels}
    missing = [rel for rel, p in files.items() if not p.is_file()]
    if missing:
        raise DeviceError(f"{folder}: {missing[0]} is listed in manifest.json but missing; "
                          f"check the bundle with edgepack verify {folder}")
    files["manifest.json"] = folder / "manifest.json"
    return files


def _target(manifest: dict) -> str | None:
    t = manifest.get("target")
    return t.get("name") if isinstance(t, dict) else t


def _bench_args(time_s: float, warmup: int, threads: int | None, batch: int | None) -> list[str]:
    args = ["--time", f"{time_s:g}", "--warmup", str(warmup)]
    if threads:
        args += ["--threads", str(threads)]
    if batch:
        args += ["--batch", str(batch)]
    return args + ["--json", "-"]


def profile_device(device: Device, bundle: Path, *, keep: bool = False, time_s: float = 2.0, warmup: int = 10,
                   threads: int | None = None, batch: int | None = None, on_stage: Stage | None = None,
                   cancel: Cancel | None = None) -> dict:
    """Copy the bundle, selftest and benchmark it on the device; write and return profiles/<device>.json."""
    bundle = Path(bundle).resolve()
    manifest = read_manifest(bundle)
    files = folder_files(bundle, manifest)
    if "requirements.txt" not in files:
        raise DeviceError(f"{bundle}: no requirements.txt listed in manifest.json; repack the bundle")
    t0 = time.perf_counter()
    key = hashlib.sha256(str(bundle).encode()).hexdigest()[:10]
    with Remote(device, keep=keep, work_key=key, on_stage=on_stage, cancel=cancel) as r:
        r.probe()
        r.check_arch(_target(manifest))
        sent = r.install(files)
        env = sent.pop("venv")
        py = env["python"]
        st = r.job_json([py, "run.py", "--selftest", "--json", "-"], what="selftest", timeout=600, ok=(0, 1))
        if not st.get("passed"):
            problems = st.get("problems") or ["no reason given"]
            raise device_error(device.where, f"self-test failed on the device: {problems[0]}")
        prof = r.job_json([py, "run.py", "--benchmark", *_bench_args(time_s, warmup, threads, batch)],
                          what="benchmark", timeout=600 + 4 * time_s)
        fp = r.fingerprint(env.get("runtimes"))
        r.stage("cleaning up")
    r.timings["total_s"] = time.perf_counter() - t0
    prof["device"] = fp
    prof["measured_on"] = device.name
    prof["remote"] = {"venv": env["path"], "venv_created": env["created"], "work": r.work, "kept": keep,
                      "retries": r.retries, **sent, "timings_s": {k: round(v, 3) for k, v in r.timings.items()}}
    out = bundle / "profiles" / f"{device.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(prof, indent=2) + "\n", encoding="utf-8")
    return prof


def runner_path() -> Path:
    from edgepack import runner

    return Path(runner.__file__).with_name("run.py")


def requirements_for(manifests: list[dict], folders: list[Path]) -> bytes:
    """numpy plus every runtime pinned to the version the candidates were built with."""
    lines = {"numpy>=1.24"}
    for m, folder in zip(manifests, folders):
        rt = m.get("runtime") or {}
        if rt.get("name"):
            lines.add(f"{rt['name']}=={rt['version']}" if rt.get("version") else rt["name"])
        req = Path(folder) / "requirements.txt"
        if req.is_file():
            lines.update(ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    return ("\n".join(sorted(lines)) + "\n").encode()


def time_candidates(device: Device, candidate_dirs: dict[str, Path], *, time_s: float = 2.0, warmup: int = 10,
                    threads: int | None = None, keep: bool = False, on_stage: Stage | None = None,
                    cancel: Cancel | None = None) -> dict[str, dict]:
    """Latency of each candidate folder on the device, timed there, interleaved by run.py --compare when the
    runner has it (else one after another). Each latency dict gets measured_on and measured_host."""
    names = list(candidate_dirs)
    safe: dict[str, str] = {}
    for n in names:
        s = re.sub(r"[^A-Za-z0-9._-]", "_", n) or "candidate"
        while s in safe.values() or s in ("run.py", "requirements.txt"):
            s += "_"
        safe[n] = s
    manifests = [read_manifest(Path(candidate_dirs[n])) for n in names]
    runpy = runner_path()
    files: dict[str, Path | bytes] = {"run.py": runpy,
                                      "requirements.txt": requirements_for(manifests, [candidate_dirs[n] for n in names])}
    for n, m in zip(names, manifests):
        for rel, p in folder_files(Path(candidate_dirs[n]), m).items():
            files[f"{safe[n]}/{rel}"] = p
    compare = "--compare" in runpy.read_text(encoding="utf-8")
    args = _bench_args(time_s, warmup, threads, None)
    profiles: dict[str, dict] = {}
    with Remote(device, keep=keep, work_key="candidates", on_stage=on_stage, cancel=cancel) as r:
        r.probe()
        for t in {_target(m) for m in manifests}:
            r.check_arch(t)
        py = r.install(files)["venv"]["python"]
        if compare:
            data = r.job_json([py, "run.py", "--benchmark", "--compare", *safe.values(), *args], what="benchmark",
                              timeout=600 + 4 * time_s * len(names))
            results = data.get("results") or {}
            for n in names:
                got = results.get(safe[n]) or results.get(f"{r.work}/{safe[n]}")
                if got is None:
                    raise device_error(device.where, f"run.py --compare returned no result for candidate {n}")
                profiles[n] = got
        else:
            for n in names:
                profiles[n] = r.job_json([py, "run.py", "--bundle", safe[n], "--benchmark", *args],
                                         what=f"benchmark of {n}", timeout=600 + 4 * time_s)
        host = {k: r.info[k] for k in ("cpu", "cores", "os", "arch")}
        r.stage("cleaning up")
    out = {}
    for n in names:
        lat = dict(profiles[n]["latency"])
        lat.update(measured_on=device.name, measured_host=host, interleaved=compare)
        out[n] = lat
    return out


def check_device(device: Device, *, on_stage: Stage | None = None, cancel: Cancel | None = None) -> dict:
    """Reachable? arch (against the device's target), python, CPU, runtimes, cache. Nothing is left behind."""
    from .remote import suggest_target, target_arch

    with Remote(device, on_stage=on_stage, cancel=cancel) as r:
        info = r.probe()
    want = target_arch(device.target)
    if want not in ("any", info["arch"]):
        raise device_error(device.where, f"the device is {info['arch']} but its target {device.target} is for "
                                         f"{want}; fix it with: edgepack devices add {device.name} {device.uri} "
                                         f"--target {suggest_target(device, info['arch'])} --force")
    return {"name": device.name, "uri": device.uri, "reachable": True, "connect_s": round(r.timings["connect_s"], 3),
            "target": device.target, "arch": info["arch"], "python": ".".join(map(str, info["python"])),
            "python_path": info["executable"], "cpu": info["cpu"], "cores": info["cores"], "os": info["os"],
            "runtimes": info["runtimes"], "cache_dir": info["cache"], "free_bytes": info["free"],
            "cached_venvs": info["venvs"]}
