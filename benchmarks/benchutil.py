"""Helpers shared by the benchmark scripts: the edgepack command, packing, timing a child process, output."""
from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
RESULTS = Path(__file__).resolve().parent / "results"
NOISE_NOTE = ("Timings are only as good as the machine was quiet: other processes on the same cores inflate "
              "p90 and can reorder close results. Rerun on an idle machine before quoting numbers.")


def ort_threads(settings: dict) -> int:
    """intra_op_num_threads for a manifest's settings, worked out here by hand: its count, else (threads 0,
    pin_threads off) the physical cores this process may use, given explicitly so that ONNX Runtime leaves its
    threads unpinned; 0 (ORT's own choice, pinned) where pin_threads is on or the topology is unknown."""
    if settings.get("threads"):
        return int(settings["threads"])
    if settings.get("pin_threads", False):
        return 0
    try:
        return len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                    for c in os.sched_getaffinity(0)})
    except (AttributeError, OSError):
        return 0


def edgepack_cmd() -> list[str]:
    """The installed `edgepack` console script next to this Python, else `python -m edgepack`."""
    script = Path(sys.executable).parent / "edgepack"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgepack"]


def host() -> dict:
    from edgepack.host import host_info

    h = host_info()
    return {"cpu": h.cpu, "cores": h.cores, "arch": h.arch, "os": h.os, "python": h.python,
            "features": list(h.features), **{name: rt.get("version") for name, rt in h.runtimes.items()}}


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_tracked(cmd: list[str], *, cwd: Path, poll_s: float = 0.01, env: dict | None = None) -> dict:
    """Run `cmd`, polling the memory of its whole process tree; wall time, peaks, exit code, output.

    peak_pss_mb: the largest sum of PSS over the tree (shared library pages split between the processes
    that map them: the tree's real footprint). peak_rss_sum_mb: the largest sum of RSS (counts shared pages
    once per process: an upper bound). peak_process_rss_mb: the largest single process, which is what
    `/usr/bin/time -v` reports as "Maximum resident set size".
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak = {"pss": 0.0, "rss_sum": 0.0, "rss_one": 0.0}
    while proc.poll() is None:
        pss = rss = one = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            pss += getattr(m, "pss", m.rss)
            rss += m.rss
            one = max(one, m.rss)
        for k, v in (("pss", pss), ("rss_sum", rss), ("rss_one", one)):
            peak[k] = max(peak[k], v / 2**20)
        time.sleep(poll_s)
    out, err = proc.communicate()
    return {"cmd": " ".join(cmd), "wall_s": time.perf_counter() - t0, "peak_pss_mb": peak["pss"],
            "peak_rss_sum_mb": peak["rss_sum"], "peak_process_rss_mb": peak["rss_one"],
            "returncode": proc.returncode, "stdout": out, "stderr": err}


def pack(model: Path | None, out: Path, *, calib: Path | None = None, eval: Path | None = None,
         target: str | Path = "cpu-x86", bench_time: float = 1.0, threads: int = 2,
         extra: list[str] | None = None) -> Path:
    """`edgepack pack` in a subprocess; returns the bundle path (raises with its stderr when it fails)."""
    cmd = [*edgepack_cmd(), "pack"]
    if model is not None:
        cmd.append(str(model))
    cmd += ["--target", str(target), "--out", str(out), "--force", "--bench-time", str(bench_time),
            "--threads", str(threads)]
    if calib:
        cmd += ["--calib", str(calib)]
    if eval:
        cmd += ["--eval", str(eval)]
    cmd += extra or []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return out


def median_wall(cmd: list[str], runs: int, *, cwd: Path) -> dict:
    """Wall time of `cmd` over `runs` runs after one untimed warm-up run (file cache)."""
    subprocess.run(cmd, cwd=cwd, capture_output=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, capture_output=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return {"cmd": " ".join(cmd), "runs": runs, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "times_s": times}


def write_results(name: str, data: dict, markdown: str, out_dir: Path = RESULTS) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    md.write_text(markdown, encoding="utf-8")
    return [md, js]


def finish(name: str, data: dict, markdown: str, out_dir: Path, started: float) -> int:
    """Write the results, print one PASS/FAIL line per target and where the files went."""
    import time

    data["total_s"] = time.perf_counter() - started
    paths = write_results(name, data, markdown(data) if callable(markdown) else markdown, out_dir)
    for t in data["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}")
    print(f"total {data['total_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


GAP_S = 0.05  # idle before a block that follows another function's: ONNX Runtime's threads spin for a while
SETTLE_S = 0.02  # untimed runs after that idle, at least two: threads woken from sleep run slow at first


def interleaved(fns: dict, feeds: dict, blocks: int = 10, budget_s: float = 6.0) -> dict:
    """Per-run ms of each function (feeds[name] its argument), run in alternating blocks (A B, B A, ...) in this
    process after a warm-up. A block that follows another function's starts after GAP_S idle, then untimed
    runs for SETTLE_S; a function alone runs on without pauses, as a user's loop does."""
    warm = {}
    for name, fn in fns.items():
        for _ in range(3):
            t = time.perf_counter()
            fn(feeds[name])
            warm[name] = time.perf_counter() - t
    runs = int(max(3, min(5000, budget_s / blocks / max(sum(warm.values()), 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    for b in range(blocks):
        for name in order if b % 2 == 0 else order[::-1]:
            if len(fns) > 1:
                time.sleep(GAP_S)
                t0, n = time.perf_counter(), 0
                while n < 2 or time.perf_counter() - t0 < SETTLE_S:
                    fns[name](feeds[name])
                    n += 1
            for _ in range(runs):
                t = time.perf_counter()
                fns[name](feeds[name])
                times[name].append((time.perf_counter() - t) * 1000)
    return times
