"""A real OpenSSH server on 127.0.0.1 for the device tests: throwaway host and user keys, a free port.

Needs /usr/sbin/sshd (Debian's openssh-server, installed by .ci/run) and ssh-keygen; runs as the current user.
"""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> str | None:
    """None when a test server can run here, else why not."""
    if not Path(SSHD).is_file():
        return "sshd not installed (apt-get install openssh-server)"
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "OpenSSH client (ssh, ssh-keygen) not installed"
    return None


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHServer:
    """sshd -D on 127.0.0.1:port with its own host key and authorized_keys."""

    def __init__(self, root: Path, host_key: Path, authorized_keys: Path, port: int | None = None):
        self.root, self.host_key, self.authorized_keys = root, host_key, authorized_keys
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None
        self.config = root / f"sshd_{self.port}.conf"
        self.log = root / f"sshd_{self.port}.log"

    def start(self) -> SSHServer:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.root / f'sshd_{self.port}.pid'}", f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "StrictModes no", "UsePAM no", "MaxSessions 50",
            "MaxStartups 50:30:100", "LogLevel VERBOSE", ""]))
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def sessions(self) -> list[psutil.Process]:
        """The per-connection sshd processes (not the jobs they run)."""
        if not self.proc:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in kids if _name(p) == "sshd"]

    def drop_connections(self) -> int:
        """Kill every session's sshd: clients see the connection drop; the jobs lose their stdin."""
        victims = self.sessions()
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return len(victims)

    def stop(self) -> None:
        """Stop the server and end its sessions: the port refuses connections afterwards."""
        self.drop_connections()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def known_hosts_line(self, pub: Path | None = None) -> str:
        key = (pub or self.host_key.with_suffix(".pub")).read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n"


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return ""
