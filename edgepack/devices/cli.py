"""`edgepack devices add/list/check/remove` (`edgepack profile --on` and `pack --on` use this package too)."""
from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgepack.errors import EdgepackError, Interrupted

from .errors import DeviceError
from .store import Device, check_name, devices_path, load_devices, parse_uri, save_devices

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SSH devices to measure on: add, list, check, remove.")
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
DEVICES_HELP = "Devices file (default: $EDGEPACK_DEVICES, else devices.toml in the user config directory)."


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def guard(fn):
    """An EdgepackError becomes one line on stderr and its exit code; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except EdgepackError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("error: interrupted", markup=False)
            raise typer.Exit(Interrupted.exit_code) from None

    return wrapper


def _emit(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command("add")
@guard
def add(
    name: str = typer.Argument(..., help="A short name, e.g. pi5."),
    uri: str = typer.Argument(..., help="ssh://user@host[:port] (or user@host)."),
    target: str = typer.Option(..., "--target", help="Target profile of the device, e.g. cpu-arm64."),
    port: Optional[int] = typer.Option(None, "--port", help="SSH port (default: the URI's, else 22)."),
    key: Optional[Path] = typer.Option(None, "--key", "-i", help="Private key file (the ssh-agent is used too)."),
    python: Optional[str] = typer.Option(None, "--python", help="Python on the device (default: python3)."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Venvs and work folders on the device (default: ~/.cache/edgepack)."),
    ssh_option: list[str] = typer.Option([], "--ssh-option", "-o", help="Extra ssh -o Key=Value (repeatable)."),
    pip_arg: list[str] = typer.Option([], "--pip-arg", help="Extra pip install argument on the device, e.g. --index-url=URL (repeatable)."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help="Connect now and record the device's host key if none is known (StrictHostKeyChecking=accept-new); a changed key is still refused."),
    force: bool = typer.Option(False, "--force", help="Replace a device of the same name."),
    devices: Optional[Path] = typer.Option(None, "--devices", help=DEVICES_HELP),
):
    """Add a device to the devices file."""
    from edgepack.target import load_target

    check_name(name)
    load_target(target)  # an unknown target fails here, with the list of known ones
    user, host, port = parse_uri(uri, port)
    for opt in ssh_option:
        if "=" not in opt:
            raise DeviceError(f"--ssh-option {opt!r}: expected Key=Value, e.g. UserKnownHostsFile=~/.ssh/fleet_hosts")
        k, v = opt.split("=", 1)
        if k.strip().lower() == "stricthostkeychecking" and v.strip().lower() in ("no", "off"):
            err.print(f"warning: host-key checking is OFF for {name} ({opt}): a changed host key will not be "
                      f"noticed", markup=False)
    known = load_devices(devices)
    if name in known and not force:
        raise DeviceError(f"device '{name}' already exists in {devices_path(devices)}; pass --force to replace it")
    d = Device(name=name, host=host, user=user, port=port, key=str(key) if key else None, target=target,
               python=python or "python3", cache_dir=cache_dir or "~/.cache/edgepack",
               ssh_options=tuple(ssh_option), pip_args=tuple(pip_arg))
    if accept_new_host_key:
        from .ssh import Connection

        c = Connection(d, accept_new_host_key=True)
        c.open()
        c.close()
        err.print(f"{d.where}: connected; its host key is in known_hosts", markup=False)
    known[name] = d
    path = save_devices(known, devices)
    out.print(f"added {name}: {d.uri}, target {target} ({path})", markup=False)


@app.command("list")
@guard
def list_(
    as_json: bool = typer.Option(False, "--json"),
    devices: Optional[Path] = typer.Option(None, "--devices", help=DEVICES_HELP),
):
    """The devices in the devices file."""
    from .store import as_dict

    known = load_devices(devices)
    if as_json:
        _emit({n: as_dict(d) for n, d in known.items()})
        return
    if not known:
        out.print(f"no devices in {devices_path(devices)}; add one with: edgepack devices add NAME "
                  f"ssh://user@host --target TARGET", markup=False)
        return
    t = Table("name", "uri", "target", "python", "key")
    for d in known.values():
        t.add_row(d.name, d.uri, d.target or "-", d.python, d.key or "agent/default")
    out.print(t)


@app.command("remove")
@guard
def remove(
    name: str = typer.Argument(...),
    devices: Optional[Path] = typer.Option(None, "--devices", help=DEVICES_HELP),
):
    """Remove a device from the devices file (nothing on the device is touched)."""
    known = load_devices(devices)
    if name not in known:
        raise DeviceError(f"unknown device '{name}' in {devices_path(devices)}")
    del known[name]
    save_devices(known, devices)
    out.print(f"removed {name}", markup=False)


def _mb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@app.command("check")
@guard
def check(
    names: list[str] = typer.Argument(..., help="Device names."),
    as_json: bool = typer.Option(False, "--json"),
    devices: Optional[Path] = typer.Option(None, "--devices", help=DEVICES_HELP),
):
    """Reachable? Architecture (against the target), python, CPU, runtimes, free space."""
    from .fleet import fleet_exit_code, resolve, run_fleet
    from .measure import check_device

    results = run_fleet(resolve(names, devices), lambda d, stage, cancel: check_device(d, on_stage=stage, cancel=cancel),
                        done=lambda r: "ok", progress=not as_json, console=err)
    if as_json:
        _emit({n: (r if isinstance(r, dict) else {"error": str(r)}) for n, r in results.items()})
    for n, r in results.items():
        if isinstance(r, Exception):
            err.print(f"error: {r}", markup=False)
        elif not as_json:
            rt = ", ".join(f"{k} {v or '-'}" for k, v in r["runtimes"].items())
            out.print(f"{n} ({r['uri']}): reachable in {r['connect_s']:.2f} s\n"
                      f"  arch      {r['arch']} (target {r['target']})\n"
                      f"  python    {r['python']} at {r['python_path']}\n"
                      f"  cpu       {r['cpu']}, {r['cores']} cores; {r['os']}\n"
                      f"  runtimes  {rt}\n"
                      f"  cache     {r['cache_dir']}: {r['cached_venvs']} venvs, {_mb(r['free_bytes'])} free",
                      markup=False)
    code = fleet_exit_code(results)
    if code:
        raise typer.Exit(code)


@app.command("profile")
@guard
def profile(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    on: list[str] = typer.Option(..., "--on", help="Device name (repeatable: devices run in parallel)."),
    time_s: float = typer.Option(2.0, "--time", help="Seconds of timing on each device."),
    warmup: int = typer.Option(10, "--warmup"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    batch: Optional[int] = typer.Option(None, "--batch"),
    keep: bool = typer.Option(False, "--keep", help="Keep the work folder on the device (later runs copy only changed files)."),
    as_json: bool = typer.Option(False, "--json", help="Print {profiles, errors} as JSON on stdout."),
    devices: Optional[Path] = typer.Option(None, "--devices", help=DEVICES_HELP),
):
    """Profile a bundle on devices over SSH; profiles land in BUNDLE/profiles/<device>.json."""
    from .fleet import fleet_exit_code, profile_on

    results = profile_on(bundle, on, devices, keep=keep, time_s=time_s, warmup=warmup, threads=threads, batch=batch,
                         progress=not as_json, console=err)
    if as_json:
        _emit({"profiles": {n: r for n, r in results.items() if isinstance(r, dict)},
               "errors": {n: str(r) for n, r in results.items() if isinstance(r, Exception)}})
    for n, r in results.items():
        if isinstance(r, Exception):
            err.print(f"error: {r}", markup=False)
        elif not as_json:
            lat, dev = r["latency"], r["device"]
            out.print(f"{n}: p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  {lat['throughput']:.0f}/s on "
                      f"{dev['cpu']} ({dev['arch']}, {dev['cores']} cores), {r['runtime']} {r['runtime_version']} "
                      f"-> {Path(bundle) / 'profiles' / (n + '.json')}", markup=False)
    code = fleet_exit_code(results)
    if code:
        raise typer.Exit(code)
