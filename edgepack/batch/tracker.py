"""The driver's view of every job: state on screen (Rich), running markers, job.json records, retries."""
from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from .plan import Job
from .run_job import JobResult
from .store import Layout, write_json

DONE = ("ok", "skipped")


class Tracker:
    def __init__(self, layout: Layout, jobs: list[Job], *, version: str, console: Console, show: bool):
        self.layout, self.version, self.console = layout, version, console
        self.jobs = {j.id: j for j in jobs}
        self.rows: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._live = show and console.is_terminal
        self._quiet_lines = show and not console.is_terminal
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                  TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console,
                                  disable=not self._live)
        self._all = self._progress.add_task("[bold]batch", total=len(jobs), state="")
        self._task: dict[str, TaskID] = {j.id: self._progress.add_task(j.id, total=1, state="queued", start=False)
                                         for j in jobs}

    def __enter__(self) -> Tracker:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def _state(self, job_id: str, state: str, done: bool = False) -> None:
        t = self._task[job_id]
        if not self._progress.tasks[t].started:
            self._progress.start_task(t)
        self._progress.update(t, state=state, completed=1 if done else 0)
        if done:
            self._progress.stop_task(t)
            self._progress.advance(self._all)
            counts = self.counts()
            self._progress.update(self._all, state="  ".join(f"{k} {v}" for k, v in counts.items()))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows.values():
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def skipped(self, job: Job, record: dict[str, Any]) -> None:
        with self._lock:
            self.rows[job.id] = {**record, "status": "skipped", "resumed_from": record.get("finished"),
                                 "attempts": 0, "retries": 0}
            self._state(job.id, "[cyan]skipped: bundle verifies, same inputs", done=True)
            self._line(job.id, "skipped (bundle verifies, same inputs)")

    def start(self, job: Job, attempt: int, **where: Any) -> None:
        with self._lock:
            self.attempts[job.id] = attempt
            write_json(self.layout.marker(job), {"id": job.id, "attempt": attempt, "since": time.time(), **where})
            label = "[yellow]running[/]" if where.get("pid") else "waiting"
            self._state(job.id, label + (f" (attempt {attempt})" if attempt > 1 else ""))

    def retry(self, job: Job, why: str) -> None:
        with self._lock:
            self._state(job.id, f"[magenta]retrying[/]: {why}")
            self._line(job.id, f"retrying: {why}")

    def finish(self, job: Job, res: JobResult, bundle_ok: bool) -> dict[str, Any]:
        attempts = self.attempts.get(job.id, 1)
        row = self._record(job, res, attempts, bundle_ok)
        with self._lock:
            self.rows[job.id] = row
            self.layout.marker(job).unlink(missing_ok=True)
            if res.status != "interrupted":
                write_json(self.layout.record(job), row)
            s = row.get("summary") or {}
            text = (f"[green]ok[/] {s.get('chosen')} {_ms(s.get('p50_ms'))}" if res.status == "ok"
                    else f"[red]{res.status}[/]: {res.error}")
            self._state(job.id, text, done=True)
            self._line(job.id, f"{res.status} in {row['seconds']:.1f} s" + (f": {res.error}" if res.error else ""))
        return row

    def _record(self, job: Job, res: JobResult, attempts: int, bundle_ok: bool) -> dict[str, Any]:
        out = self.layout.out
        summary = res.summary or {}
        warnings = list(summary.get("warnings", [])) + list(summary.get("noise", []))
        if res.load and res.cores and max(res.load) > res.cores + 0.5:
            warnings.append(f"host load {max(res.load):.1f} on {res.cores} physical cores while this job ran: "
                            "timing may have shared cores")
        return {
            "id": job.id, "model": job.model, "target": job.target, "status": res.status,
            "digest": job.digest, "edgepack_version": self.version,
            "bundle": str(self.layout.bundle(job).relative_to(out)) if bundle_ok else None,
            "log": str(self.layout.log(job).relative_to(out)),
            "attempts": attempts, "retries": attempts - 1,
            "started": res.started, "finished": res.finished, "seconds": round(res.finished - res.started, 3),
            "exit_code": res.exit_code, "error": res.error, "host": res.host, "pid": res.pid,
            "cores": res.cores, "load": res.load, "lock_wait_s": res.lock_wait_s, "threads": job.threads,
            "summary": res.summary, "warnings": warnings, **res.extra,
        }

    def _line(self, job_id: str, text: str) -> None:
        if self._quiet_lines:
            self.console.print(f"{job_id}: {text}", highlight=False, markup=False)


def _ms(v: float | None) -> str:
    return "not measured" if v is None else f"p50 {v:.3f} ms"
