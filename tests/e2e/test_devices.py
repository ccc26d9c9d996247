"""Measure on devices over SSH (issue #15), against a real OpenSSH server on 127.0.0.1: no mocks.

The "devices" are sshd on free ports with a throwaway host key and user key; their python is this test
run's interpreter, so the venv made on the "device" sees onnxruntime and nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import psutil
import pytest
import sshd

from edgepack.devices.agent import requirements_digest

pytestmark = pytest.mark.skipif(sshd.available() is not None, reason=f"no test SSH server: {sshd.available()}")
TIME = "0.2"  # seconds of timing per run: enough to get numbers, short for CI
ONE = ("--threads", "1")  # ORT's spinning thread pool would take both CPUs of a small CI machine


@dataclass
class Lab:
    root: Path
    a: sshd.SSHServer
    b: sshd.SSHServer
    user_key: Path
    other_key: Path
    known_hosts: Path
    devices: Path
    bundle: Path

    def env(self) -> dict:
        e = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}  # only the keys we give
        e.update(EDGEPACK_DEVICES=str(self.devices), COLUMNS="200")
        return e

    def cli(self, *args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "edgepack.devices", *map(str, args)], capture_output=True,
                           text=True, env=self.env(), timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"devices {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def local(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The devices-file commands (add, list, remove) in this process: nothing there touches SSH."""
        from typer.testing import CliRunner

        from edgepack.devices.cli import app

        r = CliRunner().invoke(app, [str(a) for a in args], env={"EDGEPACK_DEVICES": str(self.devices)})
        p = subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"devices {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgepack.devices", *map(str, args)], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def add(self, name: str, port: int, *, key: Path | None = None, known_hosts: Path | None = None,
            python: str = sys.executable, target: str = "cpu-x86", cache: Path | None = None, extra=()) -> Path:
        cache = cache or self.root / f"cache-{name}"
        run = self.cli if "--accept-new-host-key" in extra else self.local
        run("add", name, f"ssh://{self.a.user}@127.0.0.1:{port}", "--target", target, "--key",
                 key or self.user_key, "--python", python, "--cache-dir", cache, "-o",
                 f"UserKnownHostsFile={known_hosts or self.known_hosts}", "-o", "IdentitiesOnly=yes",
                 "--pip-arg=--no-index", "--force", *extra)
        return cache


@pytest.fixture(scope="module")
def lab(tmp_path_factory, digits_bundle) -> Lab:
    root = tmp_path_factory.mktemp("ssh")
    host_key = sshd.keygen(root / "host_key")
    user_key, other_key = sshd.keygen(root / "user_key"), sshd.keygen(root / "other_key")
    (root / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    a = sshd.SSHServer(root, host_key, root / "authorized_keys").start()
    b = sshd.SSHServer(root, host_key, root / "authorized_keys").start()  # the second device: another port
    known = root / "known_hosts"
    known.write_text(a.known_hosts_line() + b.known_hosts_line())
    bundle = root / "bundle"
    shutil.copytree(digits_bundle, bundle)  # profiles/ is written into it; the shared bundle stays as it is
    lab = Lab(root, a, b, user_key, other_key, known, root / "devices.toml", bundle)
    lab.add("a", a.port)
    lab.add("b", b.port)
    yield lab
    a.stop()
    b.stop()


def _where(name: str, port: int) -> str:
    return f"{name} (127.0.0.1:{port})"


def _last_error(p: subprocess.CompletedProcess) -> str:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")][-1]


def _benchmarks(cache: Path) -> list[psutil.Process]:
    """run.py --benchmark processes working under a device's cache folder."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if "--benchmark" in cmd and any(c.endswith("run.py") for c in cmd) and p.cwd().startswith(str(cache)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _wait_for_benchmark(cache: Path, proc: subprocess.Popen, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _benchmarks(cache)
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"ended before the benchmark started: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the remote benchmark did not start")


def _gone(procs: list[psutil.Process], timeout: float = 10) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def _leftovers(cache: Path) -> list[str]:
    """What a run left in a device's cache folder besides the venvs."""
    return sorted(p.name for p in cache.iterdir() if p.name != "venvs") if cache.exists() else []


# ------------------------------------------------------------------ devices file, check, profile


def test_add_list_check_remove(lab):
    listed = json.loads(lab.local("list", "--json").stdout)
    assert listed["a"]["port"] == lab.a.port and listed["a"]["target"] == "cpu-x86"
    assert listed["b"]["uri"] == f"ssh://{lab.a.user}@127.0.0.1:{lab.b.port}"
    checked = json.loads(lab.cli("check", "a", "b", "--json").stdout)
    for name in ("a", "b"):
        c = checked[name]
        assert c["reachable"] and c["arch"] == "x86_64" and c["cores"] >= 1
        assert c["python"] == ".".join(map(str, sys.version_info[:3]))
        assert c["runtimes"]["onnxruntime"] == onnxruntime.__version__
    human = lab.cli("check", "a").stdout
    assert f"a (ssh://{lab.a.user}@127.0.0.1:{lab.a.port}): reachable in" in human and "arch      x86_64" in human
    dup = lab.local("add", "a", "ssh://x@example.org", "--target", "cpu-x86", check=False)
    assert dup.returncode == 1
    assert _last_error(dup) == f"error: device 'a' already exists in {lab.devices}; pass --force to replace it"
    lab.local("add", "c", "ssh://pi@10.0.0.7", "--target", "cpu-arm64")
    assert "c" in json.loads(lab.local("list", "--json").stdout)
    lab.local("remove", "c")
    assert "c" not in json.loads(lab.local("list", "--json").stdout)
    bad = lab.local("add", "c", "ssh://pi@10.0.0.7", "--target", "no-such-target", check=False)
    assert bad.returncode == 1 and "unknown target 'no-such-target'" in bad.stderr


def test_profile_on_two_devices_in_parallel(lab):
    p = lab.cli("profile", lab.bundle, "--on", "a", "--on", "b", "--time", TIME, "--warmup", "3", "--json", *ONE)
    data = json.loads(p.stdout)
    assert data["errors"] == {} and set(data["profiles"]) == {"a", "b"}
    for name in ("a", "b"):
        prof = data["profiles"][name]
        assert prof["kind"] == "profile" and prof["measured_on"] == name
        assert prof["latency"]["p50"] > 0 and prof["latency"]["iterations"] >= 5
        assert prof["runtime"] == "onnxruntime" and prof["runtime_version"] == onnxruntime.__version__
        fp = prof["device"]
        assert fp["name"] == name and fp["arch"] == "x86_64" and fp["cores"] >= 1 and fp["cpu"] and fp["os"]
        assert fp["runtimes"]["onnxruntime"] == onnxruntime.__version__
        assert json.loads((lab.bundle / "profiles" / f"{name}.json").read_text())["measured_on"] == name
        cache = lab.root / f"cache-{name}"
        assert _leftovers(cache) == []  # the work folder is gone ...
        assert len(list((cache / "venvs").iterdir())) == 1  # ... the venv stays, keyed by requirements.txt
        assert Path(prof["remote"]["venv"]).name == requirements_digest(lab.bundle / "requirements.txt")[:16]
    # the bundle still verifies: profiles/ is not part of the manifest
    listed = json.loads((lab.bundle / "manifest.json").read_text())["files"]
    assert not any(rel.startswith("profiles/") for rel in listed)


def test_keep_then_only_changed_files_are_copied(lab):
    first = json.loads(lab.cli("profile", lab.bundle, "--on", "a", "--time", TIME, "--keep", "--json", *ONE).stdout)
    r1 = first["profiles"]["a"]["remote"]
    assert r1["kept"] and r1["files_sent"] == r1["files"]
    work = Path(r1["work"])
    assert (work / "run.py").is_file() and not (work / ".pids").exists()
    second = json.loads(lab.cli("profile", lab.bundle, "--on", "a", "--time", TIME, "--keep", "--json", *ONE).stdout)
    r2 = second["profiles"]["a"]["remote"]
    assert r2["work"] == r1["work"] and r2["files_sent"] == 0 and r2["bytes_sent"] == 0
    shutil.rmtree(work.parent)


def test_time_candidates_on_devices(lab):
    """pack --on: candidates timed on each device; the choice uses the slowest device unless told."""
    from edgepack.devices import pick_device, time_on_device, time_on_devices
    from edgepack.devices.measure import runner_path

    other = lab.root / "candidate-copy"
    if not other.exists():
        shutil.copytree(lab.bundle, other)
    cands = {"ort-cpu-int8": lab.bundle, "ort cpu/copy": other}
    one = time_on_device("a", cands, time_s=float(TIME), warmup=3, threads=1, devices_file=lab.devices)
    assert set(one) == set(cands)
    for lat in one.values():
        assert lat["measured_on"] == "a" and lat["p50"] > 0 and lat["iterations"] >= 5
        assert lat["measured_host"]["arch"] == "x86_64"
        assert lat["interleaved"] == ("--compare" in runner_path().read_text())  # run.py --compare when it has it
    both = time_on_devices(["a", "b"], {"ort-cpu-int8": lab.bundle}, lab.devices, time_s=float(TIME), warmup=3,
                           threads=1, progress=False)
    assert {d: set(v) for d, v in both.items()} == {"a": {"ort-cpu-int8"}, "b": {"ort-cpu-int8"}}
    slowest = max(both, key=lambda d: both[d]["ort-cpu-int8"]["p50"])
    assert pick_device(both) == slowest
    assert pick_device(both, "b") == "b"
    assert _leftovers(lab.root / "cache-a") == []


def test_edgepack_pack_on_device_chooses_from_device_numbers(lab, tmp_path):
    """The main CLI: pack --on a times the candidates on the device; profile --on a --on b returns both."""
    from conftest import DIGITS, run_cli

    out = tmp_path / "digits-on-a"
    p = run_cli("pack", str(DIGITS / "model.onnx"), "--calib", str(DIGITS / "calib.npz"), "--eval",
                str(DIGITS / "eval.npz"), "--precision", "int8,fp32", "--out", str(out), "--on", "a", "--bench-time",
                TIME, "--threads", "1", "--json", env=lab.env())
    report = json.loads(p.stdout)["report"]
    assert report["extra"]["measured_on"]["device"] == "a" and report["reason"].endswith("(measured on a)")
    timed = [c for c in report["candidates"] if c["latency"]]
    assert timed and all("measured on a" in c["notes"] for c in timed)
    p = run_cli("profile", str(lab.bundle), "--on", "a", "--on", "b", "--time", TIME, "--json", env=lab.env())
    data = json.loads(p.stdout)
    assert set(data["profiles"]) == {"a", "b"} and data["errors"] == {}


def test_fleet_with_one_unreachable_device_is_partial(lab):
    port = sshd.free_port()
    lab.add("down", port)
    p = lab.cli("profile", lab.bundle, "--on", "a", "--on", "down", "--time", TIME, "--json", *ONE,
                check=False)
    assert p.returncode == 5, p.stderr
    data = json.loads(p.stdout)
    assert set(data["profiles"]) == {"a"}
    assert data["errors"] == {"down": f"{_where('down', port)}: host unreachable: connect to host 127.0.0.1 "
                                      f"port {port}: Connection refused"}


# ------------------------------------------------------------------ faults, each with its exact message


def test_authentication_refused(lab):
    lab.add("refused", lab.a.port, key=lab.other_key)
    p = lab.cli("profile", lab.bundle, "--on", "refused", check=False)
    assert p.returncode == 1
    assert _last_error(p) == (f"error: {_where('refused', lab.a.port)}: authentication refused (key {lab.other_key}); "
                              f"add its public key to ~/.ssh/authorized_keys of {lab.a.user} on the device")


def test_host_key_changed(lab):
    impostor = sshd.keygen(lab.root / "impostor_host_key")
    changed = lab.root / "known_hosts_changed"
    changed.write_text(lab.a.known_hosts_line(impostor.with_suffix(".pub")))
    lab.add("changed", lab.a.port, known_hosts=changed)
    p = lab.cli("check", "changed", check=False)
    assert p.returncode == 1
    hk = f"[127.0.0.1]:{lab.a.port}"
    assert _last_error(p) == (f"error: {_where('changed', lab.a.port)}: host key for {hk} has changed; if you expect "
                              f"this, remove the old key with ssh-keygen -R '{hk}' -f {changed} and connect again")


def test_unknown_host_key_then_accept_new(lab):
    empty = lab.root / "known_hosts_empty"
    empty.write_text("")
    lab.add("fresh", lab.b.port, known_hosts=empty)
    p = lab.cli("check", "fresh", check=False)
    assert p.returncode == 1
    assert _last_error(p) == (f"error: {_where('fresh', lab.b.port)}: host key for [127.0.0.1]:{lab.b.port} is not "
                              f"known; check it once with ssh -p {lab.b.port} {lab.a.user}@127.0.0.1, or add the "
                              f"device with --accept-new-host-key")
    assert empty.read_text() == ""  # nothing was accepted silently
    lab.add("fresh", lab.b.port, known_hosts=empty, extra=("--accept-new-host-key",))
    assert empty.read_text().strip()
    lab.cli("check", "fresh")


def test_no_python_on_device(lab):
    lab.add("nopy", lab.a.port, python="/nonexistent/python3")
    p = lab.cli("check", "nopy", check=False)
    assert p.returncode == 1
    assert _last_error(p) == (f"error: {_where('nopy', lab.a.port)}: no python at /nonexistent/python3 on the "
                              f"device; install Python >= 3.9 or point the device at one with: edgepack devices add "
                              f"nopy ... --python PATH")


def _old_python() -> str | None:
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    cands = sorted(pyenv.glob("3.[5-8].*/bin/python")) + sorted(Path("/usr/bin").glob("python3.[5-8]"))
    return str(cands[-1]) if cands else None


def test_python_too_old_on_device(lab):
    old = _old_python()
    if not old:
        pytest.skip("no Python 3.5-3.8 interpreter on this machine to play the old device python")
    lab.add("oldpy", lab.a.port, python=old)
    p = lab.cli("profile", lab.bundle, "--on", "oldpy", check=False)
    assert p.returncode == 1
    version = subprocess.run([old, "-c", "import platform; print(platform.python_version())"], capture_output=True,
                             text=True).stdout.strip()
    assert _last_error(p) == (f"error: {_where('oldpy', lab.a.port)}: python {version} at {old} is too old; the "
                              f"bundle runner needs Python >= 3.9 (set another with --python PATH)")


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n < 1 << 20 else f"{n / 1048576:.1f} MB"


def test_no_space_on_device(lab):
    full = lab.root / "full"
    full.mkdir(exist_ok=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a 64 KB tmpfs here (needs root or CAP_SYS_ADMIN): {m.stderr.strip()}")
    try:
        lab.add("tiny", lab.a.port, cache=full)
        p = lab.cli("profile", lab.bundle, "--on", "tiny", check=False)
        assert p.returncode == 1
        manifest = json.loads((lab.bundle / "manifest.json").read_text())
        need = sum(v["size"] for v in manifest["files"].values()) + (lab.bundle / "manifest.json").stat().st_size
        st = os.statvfs(full)
        assert _last_error(p) == (f"error: {_where('tiny', lab.a.port)}: no space on the device: "
                                  f"{_size(st.f_bavail * st.f_frsize)} free at {full}; the files need {_size(need)}")
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)


def _retarget(src: Path, dst: Path, target: str) -> Path:
    """A copy of the bundle whose manifest names another target (its manifest digest recomputed)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("profiles"))
    m = json.loads((dst / "manifest.json").read_text())
    m["target"]["name"] = target
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    m["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                     ensure_ascii=True).encode()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def test_architecture_does_not_match_target(lab):
    arm = _retarget(lab.bundle, lab.root / "bundle-arm", "cpu-arm64")
    p = lab.cli("profile", arm, "--on", "a", check=False)
    assert p.returncode == 1
    assert _last_error(p) == (f"error: {_where('a', lab.a.port)}: the bundle is built for aarch64 (target cpu-arm64) "
                              f"but the device is x86_64; pack it for the device with --target cpu-x86")
    lab.add("armdev", lab.a.port, target="cpu-arm64")
    c = lab.cli("check", "armdev", check=False)
    assert _last_error(c) == (f"error: {_where('armdev', lab.a.port)}: the device is x86_64 but its target cpu-arm64 "
                              f"is for aarch64; fix it with: edgepack devices add armdev ssh://{lab.a.user}@127.0.0.1:"
                              f"{lab.a.port} --target cpu-x86 --force")
    assert _leftovers(lab.root / "cache-a") == []


def test_runtime_wheel_not_available(lab):
    odd = lab.root / "bundle-odd-runtime"
    shutil.copytree(lab.bundle, odd, ignore=shutil.ignore_patterns("profiles"))
    (odd / "requirements.txt").write_text("numpy>=1.24\nonnxruntime==0.0.1\n")
    p = lab.cli("profile", odd, "--on", "a", check=False)
    assert p.returncode == 1
    py = "%d.%d" % sys.version_info[:2]
    assert _last_error(p) == (f"error: {_where('a', lab.a.port)}: no onnxruntime==0.0.1 wheel for this device "
                              f"(x86_64, Python {py}): pip found no matching distribution")
    venvs = [v.name for v in (lab.root / "cache-a" / "venvs").iterdir()]
    assert requirements_digest(odd / "requirements.txt")[:16] not in venvs
    assert not [v for v in venvs if v.startswith(".")]  # the half-made venv was removed
    assert _leftovers(lab.root / "cache-a") == []


# ------------------------------------------------------------------ dropped connections, Ctrl-C


@pytest.fixture
def flaky(lab):
    """A device of its own whose server the test may kill."""
    srv = sshd.SSHServer(lab.root, lab.a.host_key, lab.a.authorized_keys).start()
    kh = lab.root / f"known_hosts_{srv.port}"
    kh.write_text(srv.known_hosts_line())
    cache = lab.add("flaky", srv.port, known_hosts=kh)
    yield srv, cache
    srv.stop()


def test_connection_dropped_mid_benchmark_is_retried(lab, flaky):
    srv, cache = flaky
    run = lab.start("profile", lab.bundle, "--on", "flaky", "--time", "1", "--json", *ONE)
    first = _wait_for_benchmark(cache, run)
    assert srv.drop_connections() >= 1
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    prof = json.loads(out)["profiles"]["flaky"]
    assert prof["remote"]["retries"] == 1 and prof["latency"]["p50"] > 0
    assert "connection dropped during benchmark" in err and "retrying once" in err
    assert _gone(first)  # the orphaned benchmark was ended on the device
    assert _leftovers(cache) == []


def test_connection_dropped_and_server_gone(lab, flaky):
    srv, cache = flaky
    run = lab.start("profile", lab.bundle, "--on", "flaky", "--time", "2", *ONE)
    first = _wait_for_benchmark(cache, run)
    srv.stop()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    last = [ln for ln in err.splitlines() if ln.startswith("error: ")][-1]
    assert last == (f"error: {_where('flaky', srv.port)}: connection dropped during benchmark; retried once: host "
                    f"unreachable: connect to host 127.0.0.1 port {srv.port}: Connection refused")
    assert _gone(first)


def test_ctrl_c_ends_remote_jobs_and_leaves_only_the_venv(lab):
    cache = lab.root / "cache-a"
    run = lab.start("profile", lab.bundle, "--on", "a", "--on", "b", "--time", "20", *ONE)
    jobs = _wait_for_benchmark(cache, run)
    time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("error: interrupted; the jobs on the devices were ended and their work "
                                            "folders removed (cached venvs stay)")
    assert _gone(jobs + _benchmarks(lab.root / "cache-b"))
    assert _benchmarks(cache) == [] and _benchmarks(lab.root / "cache-b") == []
    assert _leftovers(cache) == [] and _leftovers(lab.root / "cache-b") == []
