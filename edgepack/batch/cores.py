"""Whole physical cores for local jobs: each job slot gets its own cores, one logical CPU per core."""
from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> list[list[int]]:
    """Logical CPUs this process may use, grouped by physical core (SMT siblings together)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        allowed = list(range(os.cpu_count() or 1))
    groups: dict[tuple, list[int]] = {}
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key: tuple = (topo.joinpath("physical_package_id").read_text().strip(),
                          topo.joinpath("core_id").read_text().strip())
        except OSError:
            key = ("cpu", cpu)
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values())


def default_jobs(threads: int) -> int:
    return max(1, len(physical_cores()) // max(1, threads))


def core_slots(jobs: int, threads: int) -> tuple[list[list[int]] | None, str | None]:
    """One CPU list per job slot; None and a warning when the jobs need more cores than there are."""
    cores = physical_cores()
    if jobs * threads > len(cores):
        return None, (f"--jobs {jobs} × --threads {threads} needs {jobs * threads} cores but {len(cores)} physical "
                      "cores are available: timing jobs share cores, so latencies in this batch are noisy")
    return [[cores[i * threads + k][0] for k in range(threads)] for i in range(jobs)], None
