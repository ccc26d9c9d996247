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
