"""One device over SSH: probe it, copy files by hash, create or reuse the venv, run jobs, clean up."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import ConnectionDropped, DeviceError, device_error
from .ssh import Connection, Result
from .store import Device

log = logging.getLogger("edgepack.devices")
MIN_PYTHON = (3, 9)
AGENT = (Path(__file__).with_name("agent.py")).read_text(encoding="utf-8")
_ARCH = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
Stage = Callable[[str], None]

# Runs on any Python (2.7 too) so that a too-old python is reported, not a SyntaxError.
PROBE = r"""
import sys, os, platform, json
def ver(n):
    try:
        from importlib import metadata
        return metadata.version(n)
    except Exception:
        return None
cpu = platform.processor() or platform.machine()
try:
    info = dict((l.split(":", 1)[0].strip(), l.split(":", 1)[1].strip()) for l in open("/proc/cpuinfo") if ":" in l)
    cpu = info.get("model name") or info.get("Model") or info.get("Hardware") or cpu
except Exception:
    pass
try:
    cores = os.cpu_count()
except AttributeError:
    import multiprocessing
    cores = multiprocessing.cpu_count()
cache = os.path.expanduser(sys.argv[1])
p = cache
while not os.path.exists(p):
    p = os.path.dirname(p)
st = os.statvfs(p)
venvs = os.path.join(cache, "venvs")
n = len([d for d in os.listdir(venvs) if not d.startswith(".")]) if os.path.isdir(venvs) else 0
sys.stdout.write(json.dumps({"python": list(sys.version_info[:3]), "executable": sys.executable,
    "machine": platform.machine(), "os": platform.system() + " " + platform.release(), "cpu": cpu,
    "cores": cores, "free": st.f_bavail * st.f_frsize, "cache": cache, "venvs": n,
    "runtimes": dict((k, ver(k)) for k in ("numpy", "onnxruntime", "openvino"))}) + "\n")
"""


def arch_of(machine: str) -> str:
    return _ARCH.get(machine.lower(), machine.lower())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Cancel:
    """Shared by a fleet's workers: abort() ends every registered device's commands (Ctrl-C)."""

    def __init__(self):
        self.event = threading.Event()
        self._remotes: set[Remote] = set()
        self._lock = threading.Lock()

    def register(self, r: Remote) -> None:
        with self._lock:
            self._remotes.add(r)
        if self.event.is_set():
            r.abort()

    def abort(self) -> None:
        self.event.set()
        with self._lock:
            remotes = list(self._remotes)
        for r in remotes:
            r.abort()


class Remote:
    """A session on one device. Use as a context manager: on exit the work folder is removed unless keep
    (and always the processes it started); the venv stays cached."""

    def __init__(self, device: Device, *, keep: bool = False, work_key: str | None = None,
                 on_stage: Stage | None = None, cancel: Cancel | None = None):
        self.device, self.keep, self.on_stage = device, keep, on_stage
        self.cancel = cancel
        name = f"{device.name}-{work_key}" if keep and work_key else secrets.token_hex(6)
        self.work = f"{device.cache_dir.rstrip('/')}/work/{name}"
        self.conn: Connection | None = None
        self.info: dict = {}
        self.timings: dict[str, float] = {}
        self.retries = 0
        self.aborted = False
        self._cleaning = False
        self._made_work = False

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> Remote:
        if self.cancel:
            self.cancel.register(self)
        self.stage("connecting")
        self.conn = self._connect()
        self.timings["connect_s"] = self.conn.connect_s
        return self

    def __exit__(self, et, ev, tb) -> None:
        try:
            self.cleanup()
        finally:
            if self.conn:
                self.conn.close()

    def _connect(self) -> Connection:
        c = self.conn = Connection(self.device)  # set first: abort() can stop a connect in progress
        c.open()
        return c

    def abort(self) -> None:
        self.aborted = True
        if self.conn:
            self.conn.kill_commands()

    def stage(self, text: str) -> None:
        if self.aborted:
            raise device_error(self.device.where, "interrupted")
        if self.on_stage:
            self.on_stage(text)

    def cleanup(self) -> None:
        """End the jobs this session started and remove its work folder (unless keep)."""
        if not self._made_work or self.conn is None:
            return
        t0 = time.perf_counter()
        self._cleaning = True
        self.conn.revive()
        args = {"work": self.work, "remove": not self.keep}
        try:
            try:
                self._agent("cleanup", args, timeout=30)
            except ConnectionDropped:
                self.conn.close()
                self.conn = self._connect()
                self._agent("cleanup", args, timeout=30)
        except DeviceError as e:
            log.warning("%s: could not clean up %s on the device: %s", self.device.where, self.work, e.reason)
        self.timings["cleanup_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------ calls

    def _retry(self, what: str, fn: Callable[[], object]):
        """fn(); if the connection drops, reconnect and run it once more, then report."""
        try:
            return fn()
        except ConnectionDropped as first:
            if self.aborted:
                raise
            log.warning("%s: connection dropped during %s (%s); retrying once", self.device.where, what, first.reason)
            self.retries += 1
            self.conn.close()
            try:
                self.conn = self._connect()
            except DeviceError as e:
                self.conn = None  # gone: nothing can be cleaned up on the device
                log.warning("%s: %s may be left on the device", self.device.where, self.work)
                raise device_error(self.device.where, f"connection dropped during {what}; retried once: {e.reason}") from None
            if self._made_work:  # a job the old session started may still run there: end it first
                try:
                    self._agent("cleanup", {"work": self.work, "remove": False}, timeout=30)
                except ConnectionDropped:
                    pass
            try:
                return fn()
            except ConnectionDropped as e:
                raise device_error(self.device.where, f"connection dropped during {what} again after one retry: "
                                                      f"{e.reason}") from None

    def _exec(self, argv: list[str], *, timeout: float, what: str, **kw) -> Result:
        if self.aborted and not self._cleaning:
            raise device_error(self.device.where, "interrupted")
        return self.conn.run(argv, timeout=timeout, what=what, **kw)

    def _agent(self, op: str, args: dict, *, stdin=None, timeout: float = 60, what: str | None = None) -> dict:
        r = self._exec([self.device.python, "-c", AGENT, op, json.dumps(args)], stdin=stdin, timeout=timeout,
                       what=what or op)
        return self._agent_result(r, what or op)

    def _agent_result(self, r: Result, what: str) -> dict:
        lines = r.stdout.decode(errors="replace").strip().splitlines()
        data = None
        if lines:
            try:
                data = json.loads(lines[-1])
            except ValueError:
                data = None
        if r.code == 3 and isinstance(data, dict) and "error" in data:
            raise device_error(self.device.where, data["message"])
        if r.code != 0 or not isinstance(data, dict):
            tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
            raise device_error(self.device.where, f"{what} failed on the device (exit {r.code}): "
                                                  f"{tail[-1].strip() if tail else 'no message'}")
        return data

    # ------------------------------------------------------------ steps

    def probe(self) -> dict:
        """Arch, python, CPU, cores, OS, free space, runtimes; checks the python is there and new enough."""
        py = self.device.python
        self.stage("checking the device")
        t0 = time.perf_counter()
        r = self._retry("the device check", lambda: self._exec([py, "-c", PROBE, self.device.cache_dir],
                                                                timeout=60, what="probe"))
        if r.code in (126, 127):
            raise device_error(self.device.where, f"no python at {py} on the device; install Python >= 3.9 or "
                                                  f"point the device at one with: edgepack devices add "
                                                  f"{self.device.name} ... --python PATH")
        try:
            info = json.loads(r.stdout.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
            raise device_error(self.device.where, f"{py} on the device failed to run a probe (exit {r.code}): "
                                                  f"{tail[-1].strip() if tail else 'no output'}") from None
        version = tuple(info["python"])
        if version[:2] < MIN_PYTHON:
            raise device_error(self.device.where, f"python {'.'.join(map(str, version))} at {py} is too old; the "
                                                  f"bundle runner needs Python >= 3.9 (set another with --python PATH)")
        info["arch"] = arch_of(info["machine"])
        self.info = info
        self.timings["probe_s"] = time.perf_counter() - t0
        return info

    def check_arch(self, target: str | None) -> None:
        """The files' target architecture (targets/*.toml `arch`) must be the device's."""
        want = target_arch(target)
        have = self.info["arch"]
        if want in ("any", have):
            return
        suggest = suggest_target(self.device, have)
        raise device_error(self.device.where, f"the bundle is built for {want} (target {target}) but the device "
                                              f"is {have}; pack it for the device with --target {suggest}")

    def install(self, files: Mapping[str, Path | bytes], requirements: str | None = "requirements.txt") -> dict:
        """Copy the files into the work folder (into a kept one: only those whose sha256 differs), then create
        or reuse the venv <cache>/venvs/<sha256 of the requirement lines>[:16] with system site packages."""
        t0 = time.perf_counter()
        local = {rel: (sha256_bytes(v) if isinstance(v, bytes) else _sha256_file(v)) for rel, v in files.items()}
        sizes = {rel: (len(v) if isinstance(v, bytes) else v.stat().st_size) for rel, v in files.items()}

        def go() -> dict:
            self._made_work = True
            send = sorted(files)
            if self.keep:  # a kept folder may hold them already
                self.stage(f"comparing {len(files)} files")
                have = self._agent("prepare", {"work": self.work, "files": sorted(files)})["hashes"]
                send = [rel for rel in send if have.get(rel) != local[rel]]
            sent = sum(sizes[rel] for rel in send)
            self.stage(f"copying {len(send)} files ({sent / 1024:.0f} KB), preparing the venv")
            args = {"work": self.work, "need": sent, "tar": bool(send), "requirements": requirements,
                    "cache": self.device.cache_dir, "pip_args": list(self.device.pip_args)}
            with tempfile.TemporaryFile() as tmp:
                _write_tar(tmp, {rel: files[rel] for rel in send})
                tmp.seek(0)
                out = self._agent("install", args, stdin=tmp if send else None, timeout=1800 + sent / 200e3,
                                  what="copying files and preparing the venv")
            self.work = out["work"]  # absolute from now on
            return {"files": len(files), "files_sent": len(send), "bytes_sent": sent, "venv": out.get("venv")}

        stats = self._retry("the copy", go)
        self.timings["install_s"] = time.perf_counter() - t0
        return stats

    def job(self, argv: list[str], *, what: str, timeout: float) -> Result:
        """Run argv in the work folder; it is ended on the device if this side goes away."""
        args = {"work": self.work, "cwd": self.work, "argv": argv, "deadline": timeout}
        return self._retry(what, lambda: self._exec([self.device.python, "-c", AGENT, "run", json.dumps(args)],
                                                    hold_stdin=True, timeout=timeout + 30, what=what))

    def job_json(self, argv: list[str], *, what: str, timeout: float, ok: tuple[int, ...] = (0,)) -> dict:
        t0 = time.perf_counter()
        self.stage(what)
        r = self.job(argv, what=what, timeout=timeout)
        self.timings[what.split()[0] + "_s"] = time.perf_counter() - t0
        if self.aborted:
            raise device_error(self.device.where, "interrupted")
        text = r.stdout.decode(errors="replace").strip()
        if r.code in ok and text:
            try:
                return json.loads(text)
            except ValueError:
                pass
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        msg = lines[-1].removeprefix("error: ") if lines else "no message"
        raise device_error(self.device.where, f"{what} failed on the device (exit {r.code}): {msg}")

    def fingerprint(self, runtimes: dict | None = None) -> dict:
        """CPU, cores, OS, arch, python, and the runtimes (as the venv sees them when given)."""
        d, i = self.device, self.info
        return {"name": d.name, "uri": d.uri, "target": d.target, "arch": i["arch"], "cpu": i["cpu"],
                "cores": i["cores"], "os": i["os"], "python": ".".join(map(str, i["python"])),
                "runtimes": runtimes or i["runtimes"], "transport": "ssh"}


def _write_tar(fileobj, files: Mapping[str, Path | bytes]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w") as tf:
        for rel, src in files.items():
            info = tarfile.TarInfo(rel)
            info.mode = 0o755 if rel.endswith("run.py") else 0o644
            info.mtime = int(time.time())
            if isinstance(src, bytes):
                info.size = len(src)
                tf.addfile(info, io.BytesIO(src))
            else:
                info.size = src.stat().st_size
                with open(src, "rb") as f:
                    tf.addfile(info, f)


def target_arch(target: str | None) -> str:
    if not target:
        return "any"
    from edgepack.errors import TargetError
    from edgepack.target import load_target

    try:
        return load_target(target).arch
    except TargetError:
        return "any"


def suggest_target(device: Device, arch: str) -> str:
    if device.target and target_arch(device.target) == arch:
        return device.target
    from edgepack.target import target_names

    for name in target_names():
        if target_arch(name) == arch:
            return name
    return f"a target for {arch}"
