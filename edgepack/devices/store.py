"""The devices file: named SSH devices as TOML in the user's config directory (or --devices FILE)."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import tomli_w

from .errors import DeviceError

ENV_FILE = "EDGEPACK_DEVICES"
DEFAULT_PYTHON = "python3"
DEFAULT_CACHE = "~/.cache/edgepack"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = {"uri", "port", "key", "target", "python", "cache_dir", "ssh_options", "pip_args"}


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    user: str | None = None
    port: int = 22
    key: str | None = None  # private key file (-i); the agent and ssh's defaults are used as well
    target: str | None = None
    python: str = DEFAULT_PYTHON
    cache_dir: str = DEFAULT_CACHE  # venvs and work folders on the device
    ssh_options: tuple[str, ...] = field(default_factory=tuple)  # extra "-o Key=Value"
    pip_args: tuple[str, ...] = field(default_factory=tuple)  # e.g. --index-url URL, --find-links DIR

    @property
    def uri(self) -> str:
        return f"{self.base_uri}:{self.port}"

    @property
    def base_uri(self) -> str:
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{who}{host}"

    @property
    def where(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def parse_uri(uri: str, port: int | None = None) -> tuple[str | None, str, int]:
    """ssh://user@host:port, user@host or host -> (user, host, port)."""
    text = uri if uri.startswith("ssh://") else f"ssh://{uri}"
    if "://" in uri and not uri.startswith("ssh://"):
        raise DeviceError(f"'{uri}': only ssh:// URIs are supported, e.g. ssh://pi@10.0.0.7")
    try:
        parts = urlsplit(text)
        uri_port = parts.port
    except ValueError as e:
        raise DeviceError(f"'{uri}': not an SSH URI ({e}); expected ssh://user@host[:port]") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise DeviceError(f"'{uri}': not an SSH URI; expected ssh://user@host[:port]")
    if port and uri_port and port != uri_port:
        raise DeviceError(f"'{uri}' names port {uri_port} but --port is {port}; give one")
    return parts.username, parts.hostname, port or uri_port or 22


def devices_path(override: Path | None = None) -> Path:
    """--devices FILE, else $EDGEPACK_DEVICES, else <user config dir>/edgepack/devices.toml."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_FILE):
        return Path(os.environ[ENV_FILE]).expanduser()
    import click  # typer's, for the platform's config directory

    return Path(click.get_app_dir("edgepack")) / "devices.toml"


def _device(name: str, raw: dict, path: Path) -> Device:
    unknown = set(raw) - _KEYS
    if unknown:
        raise DeviceError(f"{path}: device '{name}': unknown key '{sorted(unknown)[0]}'")
    if not isinstance(raw.get("uri"), str):
        raise DeviceError(f"{path}: device '{name}' has no uri")
    user, host, port = parse_uri(raw["uri"], raw.get("port"))
    return Device(name=name, host=host, user=user, port=int(port), key=raw.get("key"), target=raw.get("target"),
                  python=raw.get("python") or DEFAULT_PYTHON, cache_dir=raw.get("cache_dir") or DEFAULT_CACHE,
                  ssh_options=tuple(raw.get("ssh_options") or ()), pip_args=tuple(raw.get("pip_args") or ()))


def load_devices(path: Path | None = None) -> dict[str, Device]:
    path = devices_path(path)
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise DeviceError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise DeviceError(f"{path}: cannot read: {e.strerror}") from None
    table = data.get("devices", {})
    if not isinstance(table, dict):
        raise DeviceError(f"{path}: 'devices' must be a table of [devices.NAME] entries")
    return {name: _device(name, raw, path) for name, raw in table.items()}


def get_device(name: str, path: Path | None = None) -> Device:
    devices = load_devices(path)
    if name not in devices:
        known = ", ".join(sorted(devices)) or "none"
        raise DeviceError(f"unknown device '{name}' in {devices_path(path)} (known: {known}); "
                          f"add it with: edgepack devices add {name} ssh://user@host --target TARGET")
    return devices[name]


def _raw(d: Device) -> dict:
    raw = {"uri": d.base_uri, "port": d.port, "target": d.target, "key": d.key, "python": d.python,
           "cache_dir": d.cache_dir, "ssh_options": list(d.ssh_options), "pip_args": list(d.pip_args)}
    defaults = {"python": DEFAULT_PYTHON, "cache_dir": DEFAULT_CACHE, "ssh_options": [], "pip_args": []}
    return {k: v for k, v in raw.items() if v is not None and defaults.get(k, object()) != v}


def save_devices(devices: dict[str, Device], path: Path | None = None) -> Path:
    path = devices_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"devices": {n: _raw(d) for n, d in sorted(devices.items())}})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("# edgepack devices: edit with `edgepack devices add/remove`\n" + text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise DeviceError(f"device name '{name}': use letters, digits, '.', '_' or '-' (it names profiles/<name>.json)")
    return name


def as_dict(d: Device) -> dict:
    out = asdict(d)
    out.update(uri=d.uri, ssh_options=list(d.ssh_options), pip_args=list(d.pip_args))
    return out
