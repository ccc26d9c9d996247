"""Several devices at once: a thread and a Rich progress row per device; one failure does not sink the rest."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgepack.errors import EdgepackError, Interrupted

from .errors import PARTIAL_EXIT, DeviceError
from .measure import profile_device, read_manifest, time_candidates
from .remote import Cancel, Stage
from .store import Device, get_device

T = TypeVar("T")
Job = Callable[[Device, Stage, Cancel], T]


def resolve(names: list[str], devices_file: Path | None) -> list[Device]:
    """Devices by name, in order, without repeats; an unknown name fails before anything runs."""
    seen: dict[str, Device] = {}
    for n in names:
        if n not in seen:
            seen[n] = get_device(n, devices_file)
    if not seen:
        raise DeviceError("no device given; pass --on NAME (see edgepack devices list)")
    return list(seen.values())


def run_fleet(devices: list[Device], job: Job, *, done: Callable[[T], str] = lambda _: "done",
              progress: bool = True, console: Console | None = None) -> dict[str, T | EdgepackError]:
    """job(device, on_stage, cancel) on every device concurrently. Ctrl-C ends the remote jobs, removes
    their work folders, then raises Interrupted."""
    cancel = Cancel()
    console = console or Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[device]}"), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        rows = {d.name: bar.add_task("waiting", device=d.name, total=1) for d in devices}

        def work(d: Device):
            def stage(text: str) -> None:
                bar.update(rows[d.name], description=text)

            try:
                result = job(d, stage, cancel)
            except EdgepackError as e:
                bar.update(rows[d.name], description=f"[red]failed:[/] {getattr(e, 'reason', str(e))}",
                           completed=1)
                return e
            bar.update(rows[d.name], description=f"[green]{done(result)}[/]", completed=1)
            return result

        pool = ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="edgepack-device")
        futures = {pool.submit(work, d): d.name for d in devices}
        try:
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.2)
        except KeyboardInterrupt:
            cancel.abort()
            wait(futures, timeout=60)  # each worker ends its remote jobs and removes its work folder
            pool.shutdown(wait=False)
            raise Interrupted("interrupted; the jobs on the devices were ended and their work folders "
                              "removed (cached venvs stay)") from None
        pool.shutdown()
    return {futures[f]: f.result() for f in futures}


def profile_on(bundle: Path, device_names: list[str], devices_file: Path | None = None, *, keep: bool = False,
               time_s: float = 2.0, warmup: int = 10, threads: int | None = None, batch: int | None = None,
               progress: bool = True, console: Console | None = None) -> dict[str, dict | EdgepackError]:
    """Profile the bundle on every device at once; each profile is also written to profiles/<device>.json.
    Returns {device: profile dict, or the error that device hit}."""
    read_manifest(Path(bundle))  # a bad bundle fails once, here
    devices = resolve(device_names, devices_file)

    def job(d: Device, stage: Stage, cancel: Cancel) -> dict:
        return profile_device(d, Path(bundle), keep=keep, time_s=time_s, warmup=warmup, threads=threads,
                              batch=batch, on_stage=stage, cancel=cancel)

    return run_fleet(devices, job, done=lambda p: f"p50 {p['latency']['p50']:.3f} ms", progress=progress,
                     console=console)


def time_on_device(device: str | Device, candidate_dirs: dict[str, Path], *, time_s: float = 2.0,
                   warmup: int = 10, threads: int | None = None, devices_file: Path | None = None,
                   keep: bool = False, on_stage: Stage | None = None) -> dict[str, dict]:
    """pack --on: latency dict per candidate, timed on the device (raises DeviceError or Interrupted)."""
    d = device if isinstance(device, Device) else get_device(device, devices_file)
    try:
        return time_candidates(d, candidate_dirs, time_s=time_s, warmup=warmup, threads=threads, keep=keep,
                               on_stage=on_stage)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the job on {d.name} was ended and its work folder removed") from None


def time_on_devices(device_names: list[str], candidate_dirs: dict[str, Path], devices_file: Path | None = None, *,
                    time_s: float = 2.0, warmup: int = 10, threads: int | None = None, keep: bool = False,
                    progress: bool = True, console: Console | None = None) -> dict[str, dict[str, dict] | EdgepackError]:
    """pack --on a --on b: {device: {candidate: latency} or its error}, all devices at once."""
    devices = resolve(device_names, devices_file)

    def job(d: Device, stage: Stage, cancel: Cancel) -> dict[str, dict]:
        return time_candidates(d, candidate_dirs, time_s=time_s, warmup=warmup, threads=threads, keep=keep,
                               on_stage=stage, cancel=cancel)

    return run_fleet(devices, job, done=lambda r: f"{len(r)} candidates timed", progress=progress, console=console)


def pick_device(by_device: dict[str, dict[str, dict] | EdgepackError], choose_by: str | None = None) -> str:
    """The device whose numbers choose: --choose-by NAME, else the slowest (largest summed p50 over the
    candidates every device measured)."""
    ok = {d: lat for d, lat in by_device.items() if isinstance(lat, dict)}
    if not ok:
        raise DeviceError(f"no device could time the candidates: {'; '.join(map(str, by_device.values()))}")
    if choose_by:
        if choose_by not in by_device:
            raise DeviceError(f"--choose-by {choose_by}: not one of the --on devices ({', '.join(by_device)})")
        if choose_by not in ok:
            raise DeviceError(f"--choose-by {choose_by}: that device failed: {by_device[choose_by]}")
        return choose_by
    common = set.intersection(*(set(lat) for lat in ok.values()))
    return max(ok, key=lambda d: sum(ok[d][c]["p50"] for c in common))


def fleet_exit_code(results: Mapping[str, object]) -> int:
    """0 when every device worked, 1 when none did, PARTIAL_EXIT (5) in between."""
    failed = sum(isinstance(v, Exception) for v in results.values())
    return 0 if not failed else (1 if failed == len(results) else PARTIAL_EXIT)
