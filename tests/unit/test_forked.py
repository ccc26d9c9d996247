"""edgepack.forked: a function in a forked child, its result, its failure, its log lines, and its death with the parent."""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepack.forked import Forked

ROOT = Path(__file__).resolve().parents[2]


def test_result_failure_and_log_lines_come_back(caplog):
    caplog.set_level(logging.INFO, logger="edgepack")
    log = logging.getLogger("edgepack.test")

    def work():
        log.info("built %d candidates", 3)
        return {"a": [1, 2]}

    assert Forked(work).result() == {"a": [1, 2]}
    assert "built 3 candidates" in caplog.text
    with pytest.raises(RuntimeError, match="ValueError: bad graph"):
        Forked(lambda: (_ for _ in ()).throw(ValueError("bad graph"))).result()


def _state(pid: int) -> str:
    try:
        return next(x.split()[1] for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State"))
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_child_dies_with_a_killed_parent():
    code = ("import time\nfrom edgepack.forked import Forked\nf = Forked(lambda: time.sleep(60))\n"
            "print(f._proc.pid, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(p.stdout.readline())
    assert _state(child) in ("S", "R")
    p.kill()
    p.wait()
    end = time.time() + 5
    while _state(child) not in ("Z", "gone") and time.time() < end:
        time.sleep(0.1)
    assert _state(child) in ("Z", "gone")  # killed (a zombie where PID 1 does not reap)


def test_done_tells_without_waiting_and_an_unfinished_early_guard_is_stopped_and_its_files_removed(tmp_path):
    from edgepack.pipeline import Built, finish_early_guard
    from edgepack.recipe import CandidatePlan
    from edgepack.target import RuntimeSpec
    from edgepack.types import Precision

    quick = Forked(lambda: 7)
    end = time.time() + 10
    while not quick.done() and time.time() < end:
        time.sleep(0.01)
    assert quick.done() and quick.result() == 7

    slow = Forked(lambda: time.sleep(60))
    assert not slow.done()
    plan = CandidatePlan("ort-cpu-int8", RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider"), Precision.INT8, ())
    (tmp_path / "ort-cpu-int8-guarded" / "quantize-guarded").mkdir(parents=True)
    events = []
    t0 = time.time()
    assert finish_early_guard([(Built(plan), slow)], tmp_path, lambda *a, **k: events.append(k)) == (None, [])
    assert time.time() - t0 < 5 and not slow._proc.is_alive()
    assert not (tmp_path / "ort-cpu-int8-guarded").exists() and events == []
