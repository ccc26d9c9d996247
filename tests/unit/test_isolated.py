"""isolated.Worker: each candidate timed in a process of its own (real ONNX Runtime and OpenVINO sessions)."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgepack.bench import measure, paired
from edgepack.errors import EdgepackError
from edgepack.isolated import Worker, close_all
from edgepack.target import BenchSettings, load_target
from edgepack.types import Artifact, ModelFormat

DIGITS = Path(__file__).resolve().parents[2] / "samples" / "digits" / "model.onnx"
FEEDS = {"input": np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}


def _workers() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_each_candidate_is_timed_in_a_process_of_its_own():
    """A worker per candidate (ONNX Runtime and OpenVINO): the session's facts come from that process (its
    load, its first run, its memory), the blocks interleave across processes, and closing ends them."""
    tgt = load_target("cpu-x86")
    art = Artifact(DIGITS, ModelFormat.ONNX, (DIGITS,))
    before = _workers()
    ws = {spec.runtime: Worker(art, spec, 1, FEEDS) for spec in tgt.runtimes}
    try:
        for name, w in ws.items():
            w.ready()
            assert w.runtime == name and w.threads == 1
            assert w.load_ms > 0 and w.first_ms > 0 and w.memory_mb > 0
        assert {w._proc.pid for w in ws.values()} <= _workers() - before and os.getpid() not in _workers()
        settings = BenchSettings(warmup=2, min_iterations=30, max_iterations=30, time_budget_s=0.001)
        r = measure(dict(ws), FEEDS, settings, batch=1)
        assert {k: v.iterations for k, v in r.items()} == {"onnxruntime": 30, "openvino": 30}
        assert r["openvino"].device == "CPU" and r["onnxruntime"].device == "CPUExecutionProvider"
        # turns side by side: every turn both ran pairs up (block sizes follow each one's warm-up speed)
        turns = min(len(r["onnxruntime"].block_sizes), len(r["openvino"].block_sizes))
        assert turns >= 1 and paired(r["onnxruntime"], r["openvino"])[2] == turns
        assert r["onnxruntime"].first_ms == ws["onnxruntime"].first_ms
    finally:
        close_all(ws.values())
    assert not any(w._proc.is_alive() or w._proc.pid in _workers() for w in ws.values())


def test_a_worker_that_cannot_open_its_model_says_why_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    w = Worker(Artifact(bad, ModelFormat.ONNX, (bad,)), load_target("cpu-x86").runtimes[0], 1, FEEDS)
    with pytest.raises(EdgepackError) as e:
        w.ready()
    assert "\n" not in str(e.value) and str(e.value)
    w.close()
    assert not w._proc.is_alive()


def test_workers_spawn_where_the_fork_server_socket_would_not_fit(monkeypatch, tmp_path):
    """A temp folder deep under --out (a batch job's) cannot hold the fork server's socket: workers spawn."""
    import edgepack.isolated as isolated

    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(isolated, "_CTX", None)
    monkeypatch.setattr("tempfile.tempdir", str(deep))
    monkeypatch.setitem(multiprocessing.process.current_process()._config, "tempdir", None)
    assert isolated._context().get_start_method() == "spawn"
    isolated.start_server()  # nothing to start
    w = Worker(Artifact(DIGITS, ModelFormat.ONNX, (DIGITS,)), load_target("cpu-x86").runtimes[0], 1, FEEDS)
    try:
        assert w.ready().runtime == "onnxruntime"
        r = measure({"w": w}, FEEDS, BenchSettings(warmup=1, min_iterations=5, max_iterations=5, time_budget_s=0.001),
                    batch=1)
        assert r["w"].iterations == 5
    finally:
        w.close()
        monkeypatch.setattr(isolated, "_CTX", None)


def _affinities(pid: int) -> set[str]:
    """Each thread's allowed CPUs (Linux /proc), as a set of Cpus_allowed_list values."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.add(line.split()[1])
    return out


MULTI_CORE_LINUX = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                      reason="thread affinity needs Linux with 2+ CPUs")

PINNED_PARENT = """
import json, os, sys
from pathlib import Path
import numpy as np
from edgepack.forked import ALLOWED  # read before anything is pinned, as at pack's start
from edgepack.isolated import Worker
from edgepack.target import load_target
from edgepack.types import Artifact, ModelFormat

if __name__ == "__main__":
    os.sched_setaffinity(0, {min(ALLOWED)})  # this thread pinned to one core (as a runtime pins its threads)
    model = Path(sys.argv[1])
    feeds = {"input": np.zeros((1, 1, 8, 8), np.float32)}
    ws = [Worker(Artifact(model, ModelFormat.ONNX, (model,)), spec, 0, feeds)
          for spec in load_target("cpu-x86").runtimes]
    for w in ws:
        w.ready()
    print(json.dumps([w._proc.pid for w in ws]), flush=True)
    sys.stdin.readline()
    for w in ws:
        w.close()
"""


@MULTI_CORE_LINUX
def test_a_worker_started_from_a_pinned_thread_runs_on_all_of_packs_cores(tmp_path):
    """The fork server starts from whichever thread asks first; one a runtime had pinned to a core made every
    worker (and every thread its session started) share that core: ONNX Runtime's and OpenVINO's int8 ran at one
    core's speed in some packs. Each worker takes back pack's CPUs before it opens its session."""
    import json
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    want = f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else None
    script = tmp_path / "pinned_parent.py"
    script.write_text(PINNED_PARENT)
    p = subprocess.Popen([sys.executable, str(script), str(DIGITS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        pids = json.loads(p.stdout.readline())
        assert len(pids) == 2
        for pid in pids:
            seen = _affinities(pid)
            assert len(seen) == 1, seen  # no thread of the worker pinned
            if want:
                assert seen == {want}
        p.communicate("\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0


@MULTI_CORE_LINUX
def test_onnx_runtime_sessions_leave_their_threads_unpinned_unless_asked():
    """ONNX Runtime pins its pool threads to cores when it picks their count (threads 0), never the caller's: a
    caller the scheduler puts on a pinned thread's core shares it (3.3x slower on a 2-core VM). The runner gives
    the same count itself, so nothing is pinned; pin_threads keeps ORT's own way."""
    import time

    from edgepack.runner import run as runner

    before = _affinities(os.getpid())
    sess = runner.open_onnxruntime(DIGITS, "CPUExecutionProvider", {"threads": 0})
    assert sess.handle.get_session_options().intra_op_num_threads == runner.physical_cores() >= 1
    for _ in range(20):  # (a pool thread pins itself once it runs)
        sess.handle.run(None, FEEDS)
    time.sleep(0.1)
    assert _affinities(os.getpid()) == before
    pinned = runner.open_onnxruntime(DIGITS, "CPUExecutionProvider", {"threads": 0, "pin_threads": True})
    assert pinned.handle.get_session_options().intra_op_num_threads == 0
    if runner.physical_cores() >= 2:  # ORT then pins its pool threads: each to one core
        deadline = time.monotonic() + 5
        while not _affinities(os.getpid()) - before and time.monotonic() < deadline:
            pinned.handle.run(None, FEEDS)
            time.sleep(0.01)
        assert _affinities(os.getpid()) - before
    del sess, pinned


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread states need Linux /proc")
def test_a_spinning_process_is_not_taken_for_idle():
    """quiet() waits on thread states, not CPU time: a process whose thread spins is runnable even in the
    milliseconds it sits off-CPU (with both cores busy, its CPU time then looked idle and it spun through the
    next candidate's block); a process blocked on a read is not."""
    import subprocess
    import sys

    from edgepack.isolated import _runnable

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        import time

        time.sleep(0.5)  # both started
        assert all(_runnable(spin.pid) for _ in range(20))
        assert not any(_runnable(idle.pid) for _ in range(20))
        assert _runnable(2 ** 22 + 12345) is None  # no such process
    finally:
        spin.kill()
        idle.kill()
        spin.wait()
        idle.wait()
