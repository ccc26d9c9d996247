"""SSH through the system OpenSSH client: one multiplexed master per device, BatchMode, the user's
agent, config and known_hosts as they are. Exit 255 from ssh becomes one clear DeviceError."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import ConnectionDropped, DeviceError, device_error
from .store import Device

ENV_OPTIONS = "EDGEPACK_SSH_OPTIONS"  # extra "Key=Value" options for every device, e.g. for tests
CONNECT_TIMEOUT = 10
_UNREACHABLE = ("Connection refused", "No route to host", "Connection timed out", "Network is unreachable",
                "Could not resolve hostname", "Operation timed out", "Name or service not known")
_DROPPED = ("closed by remote host", "Connection closed by", "Connection reset", "Broken pipe", "mux_client",
            "client_loop", "Timeout, server", "not responding", "master failed", "Control socket")


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str


def ssh_options(device: Device) -> list[str]:
    """The device's own options, then $EDGEPACK_SSH_OPTIONS (both as "Key=Value")."""
    return [*device.ssh_options, *shlex.split(os.environ.get(ENV_OPTIONS, ""))]


def host_key_name(device: Device) -> str:
    return device.host if device.port == 22 else f"[{device.host}]:{device.port}"


def classify(device: Device, stderr: str, *, connected: bool) -> DeviceError:
    """ssh's exit-255 stderr as one line naming the device and what to do."""
    lines = [ln.strip() for ln in stderr.replace("\r", "").splitlines() if ln.strip()]
    text = "\n".join(lines)
    where, hk = device.where, host_key_name(device)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "has changed and you have requested" in text:
        m = re.search(r"Offending \S+ key in (.+):\d+", text)
        extra = ""
        if m and Path(m.group(1)).expanduser() != Path("~/.ssh/known_hosts").expanduser():
            extra = f" -f {shlex.quote(m.group(1))}"
        return device_error(where, f"host key for {hk} has changed; if you expect this, remove the old key with "
                                   f"ssh-keygen -R '{hk}'{extra} and connect again")
    if "Host key verification failed" in text or "host key is known" in text:
        return device_error(where, f"host key for {hk} is not known; check it once with "
                                   f"ssh -p {device.port} {device.destination}, or add the device with "
                                   f"--accept-new-host-key")
    if "Permission denied" in text or "Too many authentication failures" in text:
        key = device.key or "from ssh-agent or ~/.ssh"
        return device_error(where, f"authentication refused (key {key}); add its public key to "
                                   f"~/.ssh/authorized_keys of {device.user or 'the user'} on the device")
    for marker in _UNREACHABLE:
        for ln in lines:
            if marker in ln:
                return device_error(where, f"host unreachable: {ln.removeprefix('ssh: ')}")
    last = lines[-1].removeprefix("ssh: ") if lines else "ssh exited 255 without a message"
    if connected and (any(m in text for m in _DROPPED) or not lines):
        return device_error(where, f"connection dropped: {last}", ConnectionDropped)
    if any(m in text for m in _DROPPED):
        return device_error(where, f"host unreachable: {last}")
    return device_error(where, f"ssh failed: {last}")


def _python_word(python: str) -> str:
    """The device's python as a shell word; a leading ~/ still expands on the device."""
    if python.startswith("~/"):
        return '"$HOME"/' + shlex.quote(python[2:])
    return shlex.quote(python)


def remote_command(argv: list[str]) -> str:
    """argv as one command line for the device's shell; argv[0] may start with ~/."""
    return " ".join([_python_word(argv[0]), *(shlex.quote(a) for a in argv[1:])])


class Connection:
    """A master connection (ControlMaster in a private temp dir) and the commands run through it."""

    def __init__(self, device: Device, *, accept_new_host_key: bool = False):
        self.device = device
        self.accept_new_host_key = accept_new_host_key
        self._dir = Path(tempfile.mkdtemp(prefix="edgepack-ssh-"))  # mode 0700
        self._sock = self._dir / "mux"
        self._master: subprocess.Popen | None = None
        self._master_stdin: int | None = None
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.killed = False
        self.connect_s = 0.0

    def _base(self) -> list[str]:
        args = ["ssh", "-o", "BatchMode=yes", "-o", f"ControlPath={self._sock}"]
        for opt in ssh_options(self.device):
            args += ["-o", opt]
        if self.accept_new_host_key:
            args += ["-o", "StrictHostKeyChecking=accept-new"]
        args += ["-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=5",
                 "-o", "ServerAliveCountMax=3", "-p", str(self.device.port)]
        if self.device.key:
            args += ["-i", str(Path(self.device.key).expanduser())]
        return args

    def open(self) -> None:
        """Start the master; it reads its stdin on the device, so it ends when this process does."""
        log = self._dir / "master.log"
        r, w = os.pipe()
        t0 = time.perf_counter()
        with open(log, "wb") as err:
            self._master = subprocess.Popen(
                [*self._base(), "-M", "-o", "ControlPersist=no", self.device.destination, "cat >/dev/null"],
                stdin=r, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        os.close(r)
        self._master_stdin = w
        deadline = time.monotonic() + CONNECT_TIMEOUT + 20
        try:
            self._wait_master(log, deadline, t0)
        except BaseException:
            self.close()
            raise

    def _wait_master(self, log: Path, deadline: float, t0: float) -> None:
        while time.monotonic() < deadline:
            if self.killed:
                raise device_error(self.device.where, "interrupted")
            if self._master.poll() is not None:
                raise classify(self.device, log.read_text(errors="replace"), connected=False)
            check = subprocess.run([*self._base(), "-O", "check", self.device.destination],
                                   stdin=subprocess.DEVNULL, capture_output=True)
            if check.returncode == 0:
                self.connect_s = time.perf_counter() - t0
                return
            time.sleep(0.05)
        raise device_error(self.device.where, f"host unreachable: no SSH session within {CONNECT_TIMEOUT + 20} s")

    def run(self, argv: list[str], *, stdin: IO[bytes] | None = None, hold_stdin: bool = False,
            timeout: float = 60, what: str = "command") -> Result:
        """Run argv on the device. hold_stdin: keep its stdin open until it ends (the remote supervisor
        ends its job when stdin closes). Raises DeviceError for ssh failures (exit 255)."""
        hold_r = hold_w = None
        if hold_stdin:
            hold_r, hold_w = os.pipe()
        src = stdin if stdin is not None else (hold_r if hold_stdin else subprocess.DEVNULL)
        cmd = [*self._base(), "-o", "ControlMaster=no", self.device.destination, remote_command(argv)]
        with self._lock:
            if self.killed:
                raise device_error(self.device.where, "interrupted")
            proc = subprocess.Popen(cmd, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            self._procs.add(proc)
        if hold_r is not None:
            os.close(hold_r)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise device_error(self.device.where, f"{what} did not finish within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._procs.discard(proc)
            if hold_w is not None:
                os.close(hold_w)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = err.decode(errors="replace")
        if self.killed:
            raise device_error(self.device.where, "interrupted")
        if proc.returncode == 255:
            raise classify(self.device, text, connected=True)
        return Result(proc.returncode, out, text)

    def kill_commands(self) -> None:
        """End the commands in flight (their remote jobs see stdin close and stop)."""
        with self._lock:
            self.killed = True
            procs = list(self._procs)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def revive(self) -> None:
        with self._lock:
            self.killed = False

    def close(self) -> None:
        self.kill_commands()
        if self._master_stdin is not None:
            os.close(self._master_stdin)  # the master's remote `cat` ends: a clean exit
            self._master_stdin = None
        if self._master is not None:
            try:
                self._master.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master = None
        shutil.rmtree(self._dir, ignore_errors=True)
