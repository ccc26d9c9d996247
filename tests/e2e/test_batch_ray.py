"""`edgepack batch --ray` on a local Ray cluster: the scenarios of test_batch.py, on Ray workers.

The cluster is the one .ci/run starts (EDGEPACK_TEST_RAY_ADDRESS), or else one started here
(`ray start --head --block` on 127.0.0.1 with 2 CPUs) and stopped at the end of the module.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_batch import REAL, board, check_killed_then_interrupted, check_main_batch, killed_then_interrupted, main_batch

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    if os.environ.get("EDGEPACK_TEST_RAY_ADDRESS"):
        yield os.environ["EDGEPACK_TEST_RAY_ADDRESS"]
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    ray = Path(sys.executable).with_name("ray")
    with open(log, "w") as f:
        head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "false",
                                 "--port", str(port), "--ray-client-server-port", str(_free_port()),
                                 "--dashboard-agent-listen-port", str(_free_port())],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < end, f"ray start failed:\n{log.read_text()}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops every process of this head
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_main_batch_ray_matches_local(ray_address, tmp_path_factory):
    run = main_batch("ray", tmp_path_factory, "--ray", ray_address)
    check_main_batch(run)
    doc = board(run["out"])
    assert doc["executor"]["kind"] == "ray" and doc["executor"]["ray"]["cpus"] == 2
    assert all(doc["by_id"][j].get("node") for j in REAL)
    local = board(main_batch("local", tmp_path_factory)["out"])
    for job_id in REAL:
        a, b = local["by_id"][job_id]["summary"], doc["by_id"][job_id]["summary"]
        if a["chosen"] != b["chosen"]:  # allowed only where a run itself says the two are within noise
            tied = [w for w in a["noise"] + b["noise"] if a["chosen"] in w and b["chosen"] in w and "overlap" in w]
            # or one run measured the other run's pick within 15% of its own, or the two picks ran within 15% of
            # each other (two runs, two processes, a shared host: the guard may run in one and not the other)
            same_speed = abs(a["p50_ms"] / b["p50_ms"] - 1) < 0.15
            assert tied or same_speed or any(_within(x, y["chosen"], 0.15) for x, y in ((a, b), (b, a))), \
                f"{job_id}: local chose {a['chosen']} ({a['p50_ms']} ms), Ray chose {b['chosen']} ({b['p50_ms']} ms)"


def _within(run: dict, other: str, margin: float) -> bool:
    p50 = {c["name"]: c["p50_ms"] for c in run["candidates"] if c["p50_ms"]}
    return other in p50 and p50[other] <= p50[run["chosen"]] * (1 + margin)


def test_killed_worker_is_retried_and_interrupt_then_resume_ray(ray_address, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("edgepack-batch-*"))
    r = killed_then_interrupted(tmp_path, "--ray", ray_address, resume_args=("--shared-out",))
    check_killed_then_interrupted(r)  # the resumed job wrote its bundle straight into --out (--shared-out)
    assert board(r["out"])["executor"]["kind"] == "ray"
    # the killed attempt's and the cancelled job's folders on the worker are gone
    assert set(Path(tempfile.gettempdir()).glob("edgepack-batch-*")) <= before
