"""Ray executor: each job a Ray task that reserves `threads` CPUs (and a GPU when its target needs one).

The task runs the same `run_job` as the local executor. Without --shared-out its inputs come from the
object store when the worker's node lacks them, and the bundle comes back as a tar blob. A worker lost
mid-job (killed, node died, OOM) is retried once, on another node when there is one, then reported lost.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import EdgepackError, first_line
from .inputs import localize
from .plan import Job
from .run_job import JobResult, run_job
from .store import Layout, install, tar_folder, untar_bundle
from .tracker import Tracker

CANCEL_GRACE_S = 20.0


class RayUnavailable(EdgepackError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray, which is not installed",
                             hint='pip install "edgepack[ray]"') from None
    return ray


def _task(job: Job, attempt: int, batch_id: str, shared: str | None, exclusive: bool, events, blobs) -> dict:
    """On the worker: fetch missing inputs, run the pack, return the result (and the bundle unless shared)."""
    import ray

    try:  # a start notice for the driver's screen; the queue's actor may have been lost (Ray's OOM killer)
        events.put({"id": job.id, "attempt": attempt, "pid": os.getpid(), "host": socket.gethostname(),
                    "node": ray.get_runtime_context().get_node_id()}, timeout=10)
    except Exception:
        pass
    base = Path(tempfile.gettempdir()) / f"edgepack-batch-{batch_id}"
    root = Path(f"{base}-{job.model}--{job.target}")  # this job's own folder on the node
    try:
        mapping = localize(list(job.inputs), lambda f: ray.get(blobs[f.sha256]), root / "inputs")
        if shared:
            layout = Layout(Path(shared))
            scratch, log = layout.scratch(job), layout.log(job)
        else:
            scratch, log = root / "work", root / "job.log"
        lock = base.with_suffix(".lock") if exclusive else None  # one timing lock per node
        res = run_job(job, scratch, log, lock=lock, mapping=mapping)
        out: dict[str, Any] = {"result": res.to_dict(), "tar": None, "log": None}
        if not shared and res.status == "ok":
            out["tar"] = tar_folder(scratch / "bundle")
        if not shared:
            out["log"] = log.read_text(encoding="utf-8", errors="replace") if log.exists() else None
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_ray(jobs: list[Job], layout: Layout, tracker: Tracker, *, address: str, shared_out: bool,
            exclusive: bool, max_in_flight: int | None) -> tuple[list[str], dict[str, Any]]:
    """Run every job on the cluster; returns batch-level warnings and a description of the cluster."""
    ray = _ray()
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:  # ConnectionError, RuntimeError: no cluster at that address
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}",
                             hint="start one with `ray start --head`, or pass --ray ray://HEAD:10001") from None
    try:
        return _run(ray, jobs, layout, tracker, address=address, shared_out=shared_out, exclusive=exclusive,
                    max_in_flight=max_in_flight)
    finally:
        ray.shutdown()


def check_ray(address: str) -> None:
    """Ray is installed and something listens at the address: checked before any job is planned."""
    _ray()
    _reachable(address)


def _reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of reconnecting, when nothing listens at HOST:PORT."""
    if address == "auto":  # what Ray reads for "auto": $RAY_ADDRESS, else the last `ray start` on this host
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        found = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.is_file() else "")
        if not found:
            raise RayUnavailable("--ray auto: no Ray cluster was started on this host",
                                 hint="start one with `ray start --head`, or pass --ray HOST:PORT")
        address = found
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {e.strerror or e}",
                             hint="start one with `ray start --head`, or pass --ray ray://HEAD:10001") from None


def _run(ray: Any, jobs: list[Job], layout: Layout, tracker: Tracker, *, address: str, shared_out: bool,
         exclusive: bool, max_in_flight: int | None) -> tuple[list[str], dict[str, Any]]:
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in nodes}
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    warnings: list[str] = []
    if any(j.gpus for j in jobs) and not has_gpu:
        warnings.append("some targets need a GPU but the Ray cluster has none: those jobs ran without one "
                        "(their reports say 'not measured')")
    events = Queue(actor_options={"num_cpus": 0})
    blobs = {f.sha256: ray.put(Path(f.path).read_bytes()) for j in jobs for f in j.inputs}
    batch_id = uuid.uuid4().hex[:12]
    remote = ray.remote(_task)
    shared = str(layout.out.resolve()) if shared_out else None
    node_of: dict[str, str] = {}
    pending: dict[Any, tuple[Job, int]] = {}
    queue = list(jobs)

    def submit(job: Job, attempt: int, avoid: str | None = None) -> None:
        opts: dict[str, Any] = {"num_cpus": job.threads, "num_gpus": job.gpus if has_gpu else 0,
                                "max_retries": 0, "retry_exceptions": False, "name": f"edgepack {job.id}"}
        other = [n for n, c in node_cpus.items() if n != avoid and c >= job.threads]
        if avoid and other:  # the retry goes to another node when there is one
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(other[0], soft=True)
        pending[remote.options(**opts).remote(job, attempt, batch_id, shared, exclusive, events, blobs)] = (job, attempt)
        tracker.start(job, attempt)

    lost_queue: list[str] = []

    def drain() -> None:
        if lost_queue:
            return
        try:
            while not events.empty():
                ev = events.get_nowait()
                job = tracker.jobs[ev["id"]]
                node_of[job.id] = ev["node"]
                tracker.start(job, ev["attempt"], pid=ev["pid"], host=ev["host"], node=ev["node"])
        except Exception as e:  # its actor was killed (Ray's memory monitor picks any worker): jobs go on
            lost_queue.append(first_line(e)[:200])
            warnings.append(f"the jobs' start notices were lost ({lost_queue[0]}): later rows may lack their node")

    biggest = max(node_cpus.values(), default=0)
    try:
        while queue or pending:
            while queue and (max_in_flight is None or len(pending) < max_in_flight):
                job = queue.pop(0)
                if job.threads > biggest:
                    tracker.finish(job, JobResult(job.id, "failed", error=f"needs {job.threads} CPUs; the largest "
                                                  f"Ray node has {biggest:g}"), False)
                else:
                    submit(job, 1)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            drain()
            for ref in ready:
                job, attempt = pending.pop(ref)
                _collect(ray, ref, job, attempt, layout, tracker, shared_out, node_of, submit)
    except KeyboardInterrupt:
        _cancel(ray, list(pending))
        raise
    for n in nodes:  # whole cores: the CPUs Ray hands out should be physical cores
        cores = {r.get("cores") for r in tracker.rows.values() if r.get("node") == n["NodeID"]} - {None}
        if cores and node_cpus[n["NodeID"]] > max(cores):
            warnings.append(f"Ray node {n['NodeManagerAddress']} offers {node_cpus[n['NodeID']]:g} CPUs but has "
                            f"{max(cores)} physical cores: timing jobs may share cores (ray start --num-cpus "
                            f"{max(cores)})")
    return warnings, {"address": address, "nodes": len(nodes), "cpus": sum(node_cpus.values()), "gpu": has_gpu}


def _cancel(ray: Any, refs: list) -> None:
    """Stop running tasks: KeyboardInterrupt in each (it stops its pack, removes its folder), then force."""
    try:
        for ref in refs:
            ray.cancel(ref)
        late = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)[1] if refs else []
        for ref in late:  # what did not stop in time: kill the worker (never a task that has ended: force-
            ray.cancel(ref, force=True)  # cancelling one aborted the driver inside Ray, "task that was not pending")
    except Exception:  # best effort: the batch is ending anyway
        pass


def _collect(ray: Any, ref: Any, job: Job, attempt: int, layout: Layout, tracker: Tracker, shared_out: bool,
             node_of: dict[str, str], submit: Callable[..., None]) -> None:
    from ray.exceptions import RayError, RayTaskError, TaskCancelledError

    try:
        out = ray.get(ref)
    except RayTaskError as e:  # an exception inside run_job: a bug, not a lost worker
        res = JobResult(job.id, "crashed", error=f"job raised: {str(e).strip().splitlines()[-1]}")
        tracker.finish(job, res, False)
        return
    except TaskCancelledError:
        tracker.finish(job, JobResult(job.id, "interrupted", error="cancelled"), False)
        return
    except RayError as e:  # worker or node lost
        why = f"worker lost: {type(e).__name__}"
        if attempt == 1:
            tracker.retry(job, why)
            submit(job, 2, avoid=node_of.get(job.id))
        else:
            tracker.finish(job, JobResult(job.id, "lost", error=why + " (after one retry)"), False)
        return
    res = JobResult(**out["result"])
    res.extra = {"node": node_of.get(job.id)}
    if out["log"]:
        layout.log(job).parent.mkdir(parents=True, exist_ok=True)
        with open(layout.log(job), "a", encoding="utf-8") as f:
            f.write(out["log"])
    ok = False
    if res.status == "ok":
        try:
            built = layout.scratch(job) / "bundle" if shared_out else untar_bundle(out["tar"], layout.scratch(job))
            install(layout, job, built)
            ok = True
        except OSError as e:
            res.status, res.error = "failed", f"could not move the bundle into {layout.bundle(job)}: {e}"
    shutil.rmtree(layout.scratch(job), ignore_errors=True)
    tracker.finish(job, res, ok)
