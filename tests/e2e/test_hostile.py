"""Hostile files and faults through real packs (issue 13): signed bundles and a tampered runner, kill -9 leftovers
swept by the next run (which writes nothing to HOME or the working directory), and a SIGTERM whose message
matches what is on disk. Four packs in all, each with one runtime and one precision.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import DIGITS, ROOT, run_cli

from edgepack.runner import run as runner

MODEL, CALIB = DIGITS / "model.onnx", DIGITS / "calib.npz"
FAST = ("--bench-time", "0.2", "--precision", "fp32")
ONE_RUNTIME = 'extends = "cpu-x86"\n\n[[runtimes]]\nruntime = "onnxruntime"\nprovider = "CPUExecutionProvider"\n'


def _target(tmp: Path) -> Path:
    t = tmp / "one.toml"
    t.write_text(ONE_RUNTIME)
    return t


def _keys(tmp: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv, pub = tmp / "key.pem", tmp / "key.pub.pem"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _rehash(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    for rel in m["files"]:
        m["files"][rel] = {"sha256": runner.sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}
    m["manifest_sha256"] = runner.manifest_digest(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def test_signed_pack_rejects_a_rehashed_runner(tmp_path):
    """pack signs; verify --trusted-key passes; run.py changed and every hash recomputed: verify names run.py,
    the signature check names manifest.json, and the changed run.py never runs."""
    from edgepack.api import pack

    priv, pub = _keys(tmp_path)
    out = tmp_path / "digits"
    pack(MODEL, target=_target(tmp_path), calib=CALIB, out=out, sign_key=priv, archive=True,
         recipe=_recipe(tmp_path))
    r = run_cli("verify", str(out), "--trusted-key", str(pub))
    assert "signed by trusted key sha256:" in r.stdout and "PASS selftest" in r.stdout
    run_cli("verify", str(out.with_name("digits.tar.gz")), "--trusted-key", str(pub), "--no-selftest")
    marker = tmp_path / "pwned"
    (out / "run.py").write_text(f"open({str(marker)!r}, 'w')\n" + (out / "run.py").read_text())
    _rehash(out)
    r = run_cli("verify", str(out), check=False)
    assert r.returncode == 1 and "run.py: differs from edgepack" in r.stderr, r.stderr
    r = run_cli("verify", str(out), "--allow-custom-runner", "--trusted-key", str(pub), check=False)
    assert r.returncode == 1 and "manifest.json changed after it was signed" in r.stderr, r.stderr
    r = run_cli("verify", str(out), "--allow-custom-runner")
    assert "accepted run.py: differs" in r.stdout and "PASS selftest" in r.stdout
    assert not marker.exists()


def _recipe(tmp: Path):
    from edgepack.recipe import recipe_from_flags

    return recipe_from_flags(None, target=str(_target(tmp)), precision=["fp32"], bench_time=0.2)


def _start(tmp: Path, out: Path, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepack", "pack", str(MODEL), "--calib", str(CALIB),
                             "--target", str(_target(tmp)), "--out", str(out), *FAST], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(where: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while not list(where.glob(pattern)):
        assert proc.poll() is None, f"pack ended before {pattern} appeared:\n{proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


def _env(tmp: Path) -> tuple[dict, Path, Path, Path]:
    tmpdir, home, cwd = tmp / "tmpdir", tmp / "home", tmp / "cwd"
    for d in (tmpdir, home, cwd):
        d.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(TMPDIR=str(tmpdir), HOME=str(home), COLUMNS="200", PYTHONPATH=str(ROOT))
    return env, tmpdir, home, cwd


def test_kill9_leftovers_are_swept_and_nothing_leaks(tmp_path):
    """kill -9 while the bundle is built next to --out: the work folder and .digits.tmp-* stay behind; the next
    pack removes them, and writes nothing to HOME, the working directory or the temp dir besides its own."""
    env, tmpdir, home, cwd = _env(tmp_path)
    dist = tmp_path / "dist"
    proc = _start(tmp_path, dist / "digits", env, cwd)
    _wait(dist, ".digits.tmp-*", proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = [p.name for p in tmpdir.iterdir()] + [p.name for p in dist.iterdir()]
    assert any(n.startswith(f"edgepack-work-{proc.pid}-") for n in left), left
    assert any(re.fullmatch(rf"\.digits\.tmp-{proc.pid}-[0-9a-f]{{8}}", n) for n in left), left
    p = subprocess.run([sys.executable, "-m", "edgepack", "pack", str(MODEL), "--calib", str(CALIB), "--target",
                        str(_target(tmp_path)), "--out", str(dist / "digits"), "--force", *FAST], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(p.name for p in dist.iterdir()) == ["digits"]
    assert list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []
    assert [str(f.relative_to(home)) for f in home.rglob("*") if f.is_file()] == []


def test_sigterm_message_matches_the_disk(tmp_path):
    """SIGTERM as the write ends: either the bundle is in place and the message says so, or nothing is."""
    env, tmpdir, _, cwd = _env(tmp_path)
    out = tmp_path / "digits"
    proc = _start(tmp_path, out, env, cwd)
    _wait(tmpdir, "edgepack-selftest-*", proc)  # the new bundle's self-test: the rename comes right after it
    while list(tmpdir.glob("edgepack-selftest-*")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if proc.returncode == 0:  # it finished before the signal landed
        assert errors == [] and out.is_dir()
    elif out.exists():
        assert proc.returncode == 130 and errors == [f"error: interrupted after the bundle was written: {out} is "
                                                     "complete and verified"], err[-2000:]
        run_cli("verify", str(out), "--no-selftest")
    else:
        assert proc.returncode == 130 and errors == ["error: interrupted; nothing was written"], err[-2000:]
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
