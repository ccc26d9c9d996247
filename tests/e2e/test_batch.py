"""`edgepack batch` with the local executor, through the real command (`python -m edgepack.batch`).

The same scenarios run on a local Ray cluster in test_batch_ray.py, which reuses the helpers here:
  * the main batch: 2 sample models × 2 targets, plus a broken model and a job that times out;
  * a pack killed mid-job (retried once), then Ctrl-C during the next job, then --resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from conftest import DIGITS, TRANSFORMER
from typer.testing import CliRunner

from edgepack.batch.board import render_html
from edgepack.batch.jobs import JobsFileError, load_jobs

BENCH = 0.2
REAL = ("digits/cpu-x86", "digits/intel-cpu", "tiny-transformer/cpu-x86", "tiny-transformer/intel-cpu")
_RUNS: dict = {}  # executor -> main batch result, shared with test_batch_ray.py


# ---------------------------------------------------------------- helpers

def model_block(name: str, sample: Path, extra: str = "") -> str:
    return (f'[[models]]\nname = "{name}"\nmodel = "{sample / "model.onnx"}"\ncalib = "{sample / "calib.npz"}"\n'
            f'eval = "{sample / "eval.npz"}"\n{extra}\n')


def main_jobs(folder: Path) -> Path:
    """2 models × 2 targets, a model that is not ONNX, and a job that cannot finish in 1 s."""
    (folder / "broken.onnx").write_bytes(b"this is not an onnx model")
    text = (f'targets = ["cpu-x86", "intel-cpu"]\n\n[defaults]\nbench_time = {BENCH}\n\n'
            + model_block("digits", DIGITS) + model_block("tiny-transformer", TRANSFORMER)
            + '[[models]]\nname = "broken"\nmodel = "broken.onnx"\n\n'
            + model_block("slow", DIGITS, "timeout = 1")
            + "".join(f'[[jobs]]\nmodel = "{j.split("/")[0]}"\ntarget = "{j.split("/")[1]}"\n\n'
                      for j in (*REAL, "broken/cpu-x86", "slow/intel-cpu")))
    path = folder / "jobs.toml"
    path.write_text(text)
    return path


def batch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgepack.batch", *args]


def run_batch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(batch_cmd(*args), capture_output=True, text=True, timeout=timeout)


def board(out: Path) -> dict:
    doc = json.loads((out / "batch.json").read_text())
    doc["by_id"] = {r["id"]: r for r in doc["jobs"]}
    return doc


def wait_marker(out: Path, job_id: str, pred, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The running marker the driver writes for a job (attempt, pid, host), once `pred` holds."""
    model, target = job_id.split("/")
    path = out / ".work" / model / f"{target}.running.json"
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"batch exited {proc.returncode} early: {proc.stderr.read()}"
        try:
            m = json.loads(path.read_text())
            if pred(m):
                return m
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{job_id} never reached the expected state")


def main_batch(executor: str, tmp_factory, *args: str) -> dict:
    """Run the main batch once per executor per session (test_batch_ray.py compares against the local one)."""
    if executor not in _RUNS:
        folder = tmp_factory.mktemp(f"batch-{executor}")
        out = folder / "dist"
        t0 = time.time()
        p = run_batch(str(main_jobs(folder)), "--out", str(out), "--json", *args)
        _RUNS[executor] = {"proc": p, "out": out, "folder": folder, "wall": time.time() - t0}
    return _RUNS[executor]


def why(out: Path, row: dict) -> str:
    """A failed job's row and the end of its log, for the assertion message."""
    log = out / row["log"] if row.get("log") else None
    tail = log.read_text()[-3000:] if log and log.exists() else "(no log)"
    return f"{row['id']}: {row['status']}: {row.get('error')}\n{tail}"


def check_main_batch(run: dict) -> None:
    p, out = run["proc"], run["out"]
    assert p.returncode == 5, p.stderr  # partial success
    doc = board(out)
    assert json.loads(p.stdout)["status"] == doc["status"] == "partial"
    assert doc["models"] == ["digits", "tiny-transformer", "broken", "slow"]
    for job_id in REAL:
        row = doc["by_id"][job_id]
        assert row["status"] == "ok", why(out, row)
        s = row["summary"]
        assert s["chosen"] and s["p50_ms"] > 0 and s["speedup"] > 0 and s["size_bytes"] > 0
        assert 0.9 < s["accuracy"] <= 1 and s["within_budget"]
        manifest = json.loads((out / job_id / "manifest.json").read_text())
        assert manifest["target"]["name"] == job_id.split("/")[1]
        assert manifest["candidate"] == s["chosen"]
        record = json.loads((out / f"{job_id}.job.json").read_text())
        assert record["status"] == "ok" and len(record["digest"]) == 64
        assert "--threads 1" in (out / f"{job_id}.log").read_text()  # one core per job by default
    broken, slow = doc["by_id"]["broken/cpu-x86"], doc["by_id"]["slow/intel-cpu"]
    assert broken["status"] == "failed" and broken["exit_code"] == 1 and broken["error"], broken
    assert slow["status"] == "timeout" and "1 s" in slow["error"], slow
    assert not (out / "broken" / "cpu-x86").exists() and not (out / "slow" / "intel-cpu").exists()
    assert not (out / ".work").exists()
    html = (out / "batch.html").read_text()
    for needle in ("digits", "tiny-transformer", "intel-cpu", "timeout", "speed-up"):
        assert needle in html
    assert "<script" not in html and "<link" not in html and "http" not in html.replace("http-equiv", "")


def killed_then_interrupted(folder: Path, *args: str, resume_args: tuple[str, ...] = ()) -> dict:
    """Kill the first job's process mid-job (retried), Ctrl-C during the second, then --resume."""
    jobs = folder / "jobs.toml"
    jobs.write_text(f'targets = ["intel-cpu"]\n\n[defaults]\nbench_time = {BENCH}\nprecision = ["fp32"]  # short packs\n\n'
                    + model_block("digits", DIGITS) + model_block("tiny-transformer", TRANSFORMER))
    out = folder / "dist"
    t0 = time.time()
    proc = subprocess.Popen(batch_cmd(str(jobs), "--out", str(out), "--jobs", "1", "--json", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_marker(out, "digits/intel-cpu", lambda m: m.get("pid") and m["attempt"] == 1, proc)
        time.sleep(0.5)  # mid-job (a short pack ends in about 2 s)
        os.kill(first["pid"], signal.SIGKILL)
        wait_marker(out, "tiny-transformer/intel-cpu", lambda m: m.get("pid"), proc)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert (out / "batch.json").is_file(), f"exit {proc.returncode}, no batch.json:\n{stderr}"
    interrupted = {"rc": proc.returncode, "board": board(out), "stderr": stderr,
                   "listing": sorted(str(p.relative_to(out)) for p in out.rglob("*")), "wall": time.time() - t0}
    resumed = run_batch(str(jobs), "--out", str(out), "--jobs", "1", "--resume", "--json", *args, *resume_args)
    return {"out": out, "first": first, "interrupted": interrupted, "resumed": resumed}


def check_killed_then_interrupted(r: dict) -> None:
    out, first = r["out"], r["interrupted"]
    assert first["rc"] == 130, first["stderr"]
    doc = first["board"]
    done, cut = doc["by_id"]["digits/intel-cpu"], doc["by_id"]["tiny-transformer/intel-cpu"]
    assert doc["status"] == "interrupted"
    assert done["status"] == "ok" and done["attempts"] == 2 and done["retries"] == 1, why(out, done)
    assert doc["retries"] == 1
    assert cut["status"] == "interrupted"
    # the finished bundle is intact, the interrupted one left nothing behind
    assert "digits/intel-cpu/manifest.json" in first["listing"]
    assert not any(p.startswith(("tiny-transformer/intel-cpu/", ".work")) for p in first["listing"]), first["listing"]
    assert "tiny-transformer/intel-cpu.job.json" not in first["listing"]
    res = r["resumed"]
    assert res.returncode == 0, res.stderr
    doc = board(out)
    assert doc["by_id"]["digits/intel-cpu"]["status"] == "skipped"
    assert doc["by_id"]["tiny-transformer/intel-cpu"]["status"] == "ok", why(out, doc["by_id"]["tiny-transformer/intel-cpu"])
    assert doc["by_id"]["digits/intel-cpu"]["summary"]["chosen"]  # the row comes from the stored record
    assert (out / "tiny-transformer" / "intel-cpu" / "manifest.json").is_file()


# ---------------------------------------------------------------- end to end, local executor

def test_main_batch_local(tmp_path_factory):
    check_main_batch(main_batch("local", tmp_path_factory))


def test_resume_skips_verified_bundles_and_reruns_failures(tmp_path_factory):
    run = main_batch("local", tmp_path_factory)
    p = run_batch(str(run["folder"] / "jobs.toml"), "--out", str(run["out"]), "--resume", "--json")
    assert p.returncode == 5, p.stderr
    doc = board(run["out"])
    assert [doc["by_id"][j]["status"] for j in REAL] == ["skipped"] * 4
    assert doc["by_id"]["broken/cpu-x86"]["status"] == "failed"  # failures are not skipped: rerun
    # a changed input (bench time) changes the digest: that job runs again
    jobs = run["folder"] / "jobs.toml"
    jobs.write_text(jobs.read_text().replace(f"bench_time = {BENCH}", "bench_time = 0.25"))
    from edgepack.batch.plan import make_jobs

    new = {j.id: j.digest for j in make_jobs(jobs, threads=1, timeout=None, version="0.1.0")}
    assert new["digits/cpu-x86"] != doc["by_id"]["digits/cpu-x86"]["digest"]


def test_killed_job_is_retried_and_interrupt_then_resume_local(tmp_path):
    check_killed_then_interrupted(killed_then_interrupted(tmp_path))


def test_exclusive_timing_runs_one_pack_at_a_time(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")  # packs that fail fast still hold the lock while they run
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('targets = ["cpu-x86", "intel-cpu"]\n[[models]]\nname = "bad"\nmodel = "bad.onnx"\n')
    p = run_batch(str(jobs), "--out", str(tmp_path / "o"), "--jobs", "2", "--exclusive-timing", "--json")
    assert p.returncode == 1, p.stderr  # every job failed
    rows = json.loads(p.stdout)["jobs"]
    assert all(r["status"] == "failed" for r in rows)
    a, b = sorted(rows, key=lambda r: r["started"] + r["lock_wait_s"])  # by when each got the lock
    assert b["lock_wait_s"] > 0.3, rows  # the second waited while the first ran
    assert b["started"] + b["lock_wait_s"] > a["started"] + a["lock_wait_s"] + 0.3
    assert not (tmp_path / "o" / ".timing.lock").exists()


# ---------------------------------------------------------------- jobs.toml, board, command (no packs)

def _jobs(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "jobs.toml"
    p.write_text(text)
    return p


def test_product_and_overrides(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "r.toml").write_text("")
    jobs = load_jobs(_jobs(tmp_path, 'targets = ["cpu-x86", {name = "arm", profile = "r.toml", max_drop = 2}]\n'
                                      '[defaults]\nbench_time = 0.5\nrecipe = "r.toml"\n'
                                      '[[models]]\nname = "a"\nmodel = "m.onnx"\nmax_drop = 0.5\n'
                                      '[[models]]\nname = "b"\nmodel = "m.onnx"\n'))
    assert [j.id for j in jobs] == ["a/cpu-x86", "a/arm", "b/cpu-x86", "b/arm"]
    by = {j.id: j for j in jobs}
    assert by["a/cpu-x86"].options["max_drop"] == 0.5 and by["a/arm"].options["max_drop"] == 2  # target wins
    assert by["b/cpu-x86"].options["bench_time"] == 0.5 and by["b/arm"].target_ref.endswith("r.toml")


@pytest.mark.parametrize("text, message", [
    ('targets = ["cpu-x86"]\n[[models]]\nname = "a"\nmodel = "m.onnx"\ncalibb = "c.npz"\n', "models[0].calibb: unknown key"),
    ('targets = ["cpu-x86"]\n[[models]]\nname = "a"\nmodel = "missing.onnx"\n', "models 'a'.model: no such file"),
    ('[[models]]\nname = "a"\nmodel = "m.onnx"\n[[jobs]]\nmodel = "b"\ntarget = "cpu-x86"\n', "jobs[0].model: no [[models]] entry named 'b'"),
    ('targets = ["cpu-x86"]\n[[models]]\nname = "a"\nmodel = "m.onnx"\nbench_time = -1\n', "models[0].bench_time"),
    ('targets = ["cpu-x86"]\n[[models]]\nname = "a"\nmodel = "m.onnx"\nargs = ["--out", "x"]\n', "args: --out is set by edgepack batch"),
    ('targets = ["cpu-x86"]\n[[models]]\nname = "a/b"\nmodel = "m.onnx"\n', "models[0].name"),
    ("targets = [\n", "not valid TOML"),
])
def test_jobs_file_errors_name_file_and_key(tmp_path, text, message):
    (tmp_path / "m.onnx").write_bytes(b"x")
    path = _jobs(tmp_path, text)
    with pytest.raises(JobsFileError) as e:
        load_jobs(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_bad_jobs_file_is_one_line_exit_1(tmp_path):
    p = run_batch(str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path / 'nope.toml'}: no such jobs file"
    (tmp_path / "m.onnx").write_bytes(b"x")
    jobs = _jobs(tmp_path, '[[models]]\nname = "a"\nmodel = "m.onnx"\n[[jobs]]\nmodel = "a"\ntarget = "nope"\n')
    p = run_batch(str(jobs), "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and "target 'nope': unknown target 'nope'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_digest_follows_contents_not_paths(tmp_path):
    from edgepack.batch.plan import make_jobs

    for name, data in (("one", b"same bytes"), ("two", b"same bytes"), ("three", b"other bytes")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.onnx").write_bytes(data)
    jobs = _jobs(tmp_path, 'targets = ["cpu-x86"]\n' + "".join(f'[[models]]\nname = "{n}"\nmodel = "{n}/m.onnx"\n'
                                                               for n in ("one", "two", "three")))
    d = {j.model: j.digest for j in make_jobs(jobs, threads=1, timeout=None, version="0.1.0")}
    assert d["one"] == d["two"] != d["three"]  # same bytes in another folder: same digest
    assert make_jobs(jobs, threads=2, timeout=None, version="0.1.0")[0].digest != d["one"]  # flags count
    assert make_jobs(jobs, threads=1, timeout=None, version="0.2.0")[0].digest != d["one"]  # and the version


def test_html_is_escaped_and_self_contained():
    row = {"id": "m/t", "model": "m", "target": "t", "status": "failed", "error": "<b>bad</b>", "log": "m/t.log",
           "summary": None, "warnings": ["<i>noisy</i>"], "retries": 0}
    doc = {"targets": ["t"], "models": ["m"], "jobs": [row], "counts": {"failed": 1}, "status": "failed",
           "retries": 0, "created": "now", "executor": {"kind": "local"}, "warnings": []}
    html = render_html(doc)
    assert "<b>bad</b>" not in html and "&lt;b&gt;bad&lt;/b&gt;" in html and "&lt;i&gt;noisy" in html
    assert "<script" not in html and "src=" not in html


def test_mounts_as_edgepack_batch(tmp_path):
    from edgepack.batch.cli import batch

    parent = typer.Typer()
    parent.callback()(lambda: None)
    parent.command("batch")(batch)
    r = CliRunner().invoke(parent, ["batch", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no such jobs file" in r.output
    r = CliRunner().invoke(parent, ["batch", "--help"])
    assert "--exclusive-timing" in r.output and "--ray" in r.output


def test_missing_ray_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from edgepack.batch.ray_exec import _ray\n"
            "try:\n    _ray()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RayUnavailable" in p.stdout and 'pip install "edgepack[ray]"' in p.stdout, p.stdout + p.stderr
