"""`edgepack batch JOBS.toml --out DIR`: the command (mounted by edgepack's CLI; also `python -m edgepack.batch`).

Exit codes (as for a device fleet): 0 every job succeeded (or was skipped by --resume), 5 some jobs failed,
1 every job failed or a user error (bad jobs file, --out), 4 internal error, 130 interrupted (finished
bundles are kept).
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import EdgepackError

EXIT_PARTIAL = 5
EXIT_ALL_FAILED = 1
EXIT_BY_STATUS = {"ok": 0, "partial": EXIT_PARTIAL, "failed": EXIT_ALL_FAILED, "interrupted": 130}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


@app.command()
def batch(
    jobs_file: Path = typer.Argument(..., help="jobs.toml: models, targets, their product or a job list."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundles go to OUT/<model>/<target>/, plus batch.json/html."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Jobs at once (default: physical cores ÷ --threads; with --ray: no limit)."),
    threads: int = typer.Option(1, "--threads", help="Threads per job, passed to pack; each job gets that many whole cores."),
    exclusive_timing: bool = typer.Option(False, "--exclusive-timing", help="One job at a time holds the timing lock (per host)."),
    job_timeout: Optional[float] = typer.Option(None, "--job-timeout", help="Seconds before a job is stopped and reported as timed out."),
    resume: bool = typer.Option(False, "--resume", help="Skip jobs whose bundle verifies and was built from the same inputs."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on a Ray cluster: auto, HOST:PORT or ray://HEAD:10001."),
    shared_out: bool = typer.Option(False, "--shared-out", help="With --ray: --out is on a file system every worker shares."),
    as_json: bool = typer.Option(False, "--json", help="Print batch.json on stdout."),
):
    """Pack many models for many targets; one `edgepack pack` per job, and a leaderboard."""
    err = Console(stderr=True, soft_wrap=True)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        from .driver import run_batch

        doc = run_batch(jobs_file, out, jobs=jobs, threads=threads, exclusive=exclusive_timing,
                        job_timeout=job_timeout, resume=resume, ray=ray, shared_out=shared_out, console=err,
                        show=not as_json)
    except EdgepackError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted before any job ran; nothing was written")
        raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        _print(doc, out)
    if doc["status"] == "interrupted":
        err.print("[bold red]error:[/] interrupted; finished bundles are kept, run again with --resume")
    raise typer.Exit(EXIT_BY_STATUS[doc["status"]])


def _print(doc: dict, out: Path) -> None:
    con = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    t = Table(title=f"edgepack batch: {doc['status']} ({doc['wall_s']:.1f} s, {doc['retries']} retried)")
    for col in ("job", "status", "chosen", "p50 ms", "speed-up", "fidelity", "size"):
        t.add_column(col)
    for r in doc["jobs"]:
        s = r.get("summary") or {}
        fid = s.get("accuracy") if s.get("accuracy") is not None else s.get("top1_agreement")
        t.add_row(r["id"], r["status"], str(s.get("chosen") or "-"),
                  f"{s['p50_ms']:.4g}" if s.get("p50_ms") else "", f"{s['speedup']:.2f}x" if s.get("speedup") else "",
                  f"{fid:.4f}" if fid is not None else "", f"{s['size_bytes']:,}" if s.get("size_bytes") else "")
    con.print(t)
    for r in doc["jobs"]:
        if r.get("error"):
            con.print(f"{r['id']}: {r['status']}: {r['error']} (log: {out / str(r.get('log'))})", highlight=False,
                      markup=False)
    for w in doc.get("warnings", []):
        Console(stderr=True).print(f"[yellow]warning:[/] {w}", highlight=False)
    con.print(f"leaderboard: {out / 'batch.html'}\nbatch.json: {out / 'batch.json'}", highlight=False)
