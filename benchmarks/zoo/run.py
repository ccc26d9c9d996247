"""Pack every zoo model with edgepack, then check the bundle against the original independently of edgepack.

    python benchmarks/zoo/run.py [--only NAME ...] [--target cpu-x86] [--bench-time S] [--timeout S]
                                 [--future] [--verbose] [--selftest]

Per model: fetch the package, write calib.npz / eval.npz (different samples) under .cache/work/NAME/,
run `edgepack pack` (--timeout, default 900 s), read the bundle's manifest and report, run the bundle's
model (ONNX Runtime or OpenVINO, as its manifest says) and the original (plain ONNX Runtime, default
options) on the eval inputs, apply the task's own check, and time both interleaved at batch 1. --selftest only checks each task check:
original vs itself must pass, original vs corrupted outputs must fail. Results: benchmarks/results/zoo.*
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from benchutil import interleaved, ort_threads  # noqa: E402
from fetch import CACHE  # noqa: E402
from models import BY_NAME, ZOO  # noqa: E402

ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EDGEPACK = ROOT / ".venv" / "bin" / "edgepack"


# ---- data and originals -----------------------------------------------------------------------------------

def write_data(e, work: Path, regen: bool) -> dict:
    """calib.npz (seed 1) and eval.npz (seed 2), rewritten when the generating code changed; eval arrays."""
    code = "".join((HERE / f).read_text() for f in ("models.py", "images.py", "signals.py", "dsp.py"))
    stamp = hashlib.sha256(f"{code}{e.n_calib}{e.n_eval}".encode()).hexdigest()
    if regen or not (work / "data.stamp").exists() or (work / "data.stamp").read_text() != stamp:
        for kind, n, seed in (("calib", e.n_calib, 1), ("eval", e.n_eval, 2)):
            np.savez(work / f"{kind}.npz", **e.data(n, seed))
        (work / "data.stamp").write_text(stamp)
    return dict(np.load(work / "eval.npz"))


def first_sample(data: dict) -> dict:
    """Sample 0 of every array that holds the samples on axis 0 (for timing at batch 1)."""
    n = max(len(v) for v in data.values() if v.ndim)
    return {k: v[:1] if v.ndim and len(v) == n else v for k, v in data.items()}


def calls(e, data: dict) -> list[dict]:
    if e.calls:
        return e.calls(data)
    data = {k: v for k, v in data.items() if k != "y"}
    n = len(next(iter(data.values())))
    return [{k: v[i:i + e.batch] for k, v in data.items()} for i in range(0, n, e.batch)]


def original(e, work: Path, example: dict) -> Path:
    """The original ONNX file; for a factory, an ONNX export made here with torch (checked against eager)."""
    if not e.factory:
        return e.path
    out = work / "original.onnx"
    if out.exists():
        return out
    import importlib.util

    import torch

    weights = e.path  # fetches the package first: a factory may import its code from there (crepe.py)
    file, fn = e.factory.split(":")
    spec = importlib.util.spec_from_file_location("zoo_factory", HERE / "factories" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, fn)()
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    x = torch.from_numpy(next(iter(example.values())))
    with torch.no_grad():
        eager = model(x)
    eager = [t.numpy() for t in (eager if isinstance(eager, (tuple, list)) else [eager])]
    names = [f"out{i}" for i in range(len(eager))]
    with warnings.catch_warnings():  # the legacy exporter's deprecation and constant-folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(out), input_names=["x"], output_names=names, opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in ["x", *names]}, dynamo=False)
    got = ort_session(out).run(None, {"x": x.numpy()})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(eager, got))
    print(f"  exported {out.name} from torch: max |onnx - eager| = {diff:.2e}", flush=True)
    return out


# ---- sessions -------------------------------------------------------------------------------------------------

def ort_session(path, provider="CPUExecutionProvider", options=None, threads=0, disabled=()):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=[(provider, options or {})], disabled_optimizers=list(disabled))


class Runner:
    """Runs feeds on a session, renaming a lone input to the model's input name; outputs in `names` order
    where every name is found (outputs: one set of names per output), else in the model's order."""

    def __init__(self, run, inputs, outputs):
        self._run, self.inputs, self.outputs = run, inputs, outputs

    def __call__(self, feeds, names=None):
        if len(feeds) == 1 and len(self.inputs) == 1:
            feeds = {self.inputs[0]: next(iter(feeds.values()))}
        outs = self._run(feeds)
        index = [next((i for i, o in enumerate(self.outputs) if n in o), None) for n in names or []]
        return [outs[i] for i in index] if index and None not in index else outs


def ort_runner(path, provider="CPUExecutionProvider", options=None, threads=0, disabled=()) -> Runner:
    s = ort_session(path, provider, options, threads, disabled)
    return Runner(lambda f: s.run(None, f), [i.name for i in s.get_inputs()], [{o.name} for o in s.get_outputs()])


def bundle_runner(bundle: Path, manifest: dict) -> Runner:
    """The bundle's model on the runtime, provider/device, inference precision and settings of its manifest."""
    rt = manifest["runtime"]
    st = rt.get("settings") or {}
    if rt["name"] == "onnxruntime":  # the other ORT settings edgepack writes are ORT's defaults (pin_threads aside)
        return ort_runner(bundle / "model.onnx", rt.get("provider") or "CPUExecutionProvider",
                          rt.get("provider_options"), ort_threads(st), st.get("disabled_optimizers") or ())
    import openvino as ov

    config = {k: v for k, v in {"INFERENCE_PRECISION_HINT": rt.get("inference_precision"),
                                "PERFORMANCE_HINT": st.get("performance_hint"),
                                "NUM_STREAMS": str(st["num_streams"]) if st.get("num_streams") else None,
                                "INFERENCE_NUM_THREADS": st.get("threads") or None,
                                "ENABLE_CPU_PINNING": st.get("cpu_pinning")}.items() if v is not None}
    compiled = ov.Core().compile_model(str(bundle / "model.xml"), rt.get("device") or "CPU", config)
    req = compiled.create_infer_request()

    def run(feeds):
        res = req.infer(feeds)
        return [np.array(res[p]) for p in compiled.outputs]

    return Runner(run, [p.get_any_name() for p in compiled.inputs], [set(p.get_names()) for p in compiled.outputs])


def run_all(runner: Runner, feeds: list[dict], names, merge: str) -> list[np.ndarray]:
    per_call = [runner(f, names) for f in feeds]
    k = len(per_call[0])
    if merge == "stack":
        return [np.stack([c[i] for c in per_call]) for i in range(k)]
    axis = 1 if merge == "concat1" else 0
    return [np.concatenate([np.asarray(c[i]) for c in per_call], axis=axis) for i in range(k)]


def corrupt(outs: list[np.ndarray]) -> list[np.ndarray]:
    """Clearly broken outputs for the self-test: samples shifted by one and the last axis reversed."""
    return [np.flip(np.roll(o, 1, axis=0), axis=-1) if o.ndim else -o for o in outs]


# ---- timing ---------------------------------------------------------------------------------------------------

# ---- one model ------------------------------------------------------------------------------------------------

def pack(e, work: Path, args) -> dict:
    bundle = work / "bundle"
    model = [str(HERE / "factories" / e.factory), "--weights", str(e.path)] if e.factory else [str(e.path)]
    cmd = [str(EDGEPACK), *(["-v"] if args.verbose else []), "pack", *model, "--target", args.target, "--calib", str(work / "calib.npz"),
           "--eval", str(work / "eval.npz"), "--out", str(bundle), "--force", "--bench-time", str(args.bench_time),
           *e.flags, *(e.future_flags if args.future else [])]
    t, log, killed, load = time.perf_counter(), work / "pack.log", [], os.getloadavg()[0]
    with open(log, "w") as f:  # stderr straight to the log, to follow a long pack; COLUMNS: no wrapped lines
        cap = int(args.mem_limit_gb * 2**30)  # address-space cap: a runaway pack fails alone, not via the OOM killer
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "COLUMNS": "300"},
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
        timer = threading.Timer(args.timeout, lambda: (killed.append(1), p.kill()))
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # wait4: this child's own peak RSS
        timer.cancel()
        code = p.returncode = os.waitstatus_to_exitcode(status)
    lines = [l.strip() for l in log.read_text().splitlines() if l.strip()]
    errors = [l for l in lines if l.lower().startswith(("error", "internal error"))]
    last = lines[-1] if lines else ""
    if killed:
        code = "timeout"
        errors.append(f"timed out after {args.timeout} s; last line: {last}")
    elif code < 0:
        errors.append(f"killed by signal {-code}{' (the OOM killer?)' if code == -9 else ''}; last line: {last}")
    return {"exit": code, "wall_s": round(time.perf_counter() - t, 1), "peak_rss_mb": usage.ru_maxrss // 1024,
            "loadavg_1min": [round(load, 1), round(os.getloadavg()[0], 1)],  # at start and end: others' load
            "last_stderr": last,
            "error": errors[-1] if errors else None, "cmd": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}


def batch_job(out: Path, name: str, target: str) -> tuple[dict, Path]:
    """This model's job in an `edgepack batch --out OUT` run: its pack result and bundle folder."""
    f = out / name / f"{target}.job.json"
    j = json.loads(f.read_text()) if f.exists() else {"status": "not run", "error": f"no {f}"}
    code = j.get("exit_code")
    return ({"exit": code if code is not None else j.get("status"), "wall_s": j.get("seconds"),
             "error": j.get("error"), "last_stderr": j.get("status"), "threads": j.get("threads"),
             "retries": j.get("retries"), "cmd": f"edgepack batch (job {j.get('id')})"}, out / name / target)


def read_bundle(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    r = json.loads((bundle / "report.json").read_text())
    cands = {c["name"]: c for c in r.get("candidates", [])}
    return {"manifest": m, "chosen": r.get("chosen") or m.get("candidate"), "precision": m.get("precision"),
            "runtime": m["runtime"]["name"], "reason": r.get("reason"),
            "within_budget": (cands.get(r.get("chosen")) or {}).get("within_budget"),
            "candidates": {n: candidate(c) for n, c in cands.items()}}


def candidate(c: dict) -> dict:
    """A report candidate in short: status, budget, p50, and the per-output fidelity measures that failed."""
    fid = c.get("fidelity") or {}
    failed = [f"{o.get('output')}: {o.get('kind')} {o.get('metric')} {o.get('value')} (threshold {o.get('threshold')})"
              for o in fid.get("outputs") or [] if not o.get("passed")]
    return {"status": c.get("status"), "within_budget": c.get("within_budget"), "error": c.get("error"),
            "p50_ms": (c.get("latency") or {}).get("p50"), "failed_outputs": failed or None,
            "output_kinds": {o.get("output"): o.get("kind") for o in fid.get("outputs") or []} or None}


def previous(name: str) -> dict:
    """This model's row in the last results (for --reuse)."""
    f = RESULTS / "zoo.json"
    rows = json.loads(f.read_text())["models"] if f.exists() else []
    return next((r for r in rows if r["name"] == name), {})


def evaluate(e, args) -> dict:
    work = CACHE / "work" / e.name
    work.mkdir(parents=True, exist_ok=True)
    res = {"name": e.name, "kind": e.kind, "package": e.pkg, "file": e.file, "factory": e.factory}
    print(f"== {e.name}: {e.kind}", flush=True)
    data = write_data(e, work, args.regen)
    feeds = calls(e, data)
    orig = ort_runner(original(e, work, feeds[0]))
    names = [next(iter(o)) for o in orig.outputs]
    ref = run_all(orig, feeds, names, e.merge)
    check = e.check(data)
    if args.selftest:
        res["selftest"] = {"self": check(ref, ref), "corrupted": check(ref, corrupt(ref))}
        ok = res["selftest"]["self"]["passed"] and not res["selftest"]["corrupted"]["passed"]
        print(f"  selftest {'OK' if ok else 'BAD'}: {json.dumps(res['selftest'])}", flush=True)
        return res
    bundle = work / "bundle"
    if args.from_batch:
        res["pack"], bundle = batch_job(args.from_batch, e.name, args.target)
    else:
        res["pack"] = previous(e.name).get("pack", {"exit": "not run"}) if args.reuse else pack(e, work, args)
    print(f"  pack exit {res['pack']['exit']} in {res['pack']['wall_s']} s: {res['pack']['error'] or res['pack']['last_stderr']}",
          flush=True)
    if res["pack"].get("exit") != 0 or not (bundle / "manifest.json").exists():
        return res
    info = read_bundle(bundle)
    res.update({k: v for k, v in info.items() if k != "manifest"})
    threads = (info["manifest"]["runtime"].get("settings") or {}).get("threads") or 0
    if threads:  # a bundle pinned to N threads (batch: one per job) against the original on as many
        orig = ort_runner(original(e, work, feeds[0]), threads=threads)
    try:
        bun = bundle_runner(bundle, info["manifest"])
        got = run_all(bun, feeds, names, e.merge)
        res["check"] = check(ref, got)
        one = calls(e, first_sample(data))[0]
        ms = interleaved({"original": orig, "bundle": bun}, {"original": one, "bundle": one}, budget_s=args.time_s)
        t = {k: round(statistics.median(v), 3) for k, v in ms.items()}
        res["latency"] = {"original_ms": t["original"], "bundle_ms": t["bundle"], "runs_each": len(ms["bundle"]),
                          "ratio": round(t["bundle"] / t["original"], 3), "loadavg_1min": os.getloadavg()[0],
                          "measured": time.strftime("%Y-%m-%d %H:%M")}
    except Exception as x:  # the bundle does not run on our feeds: that is a finding too
        res["bundle_error"] = f"{type(x).__name__}: {str(x).splitlines()[0][:300]}"
    print(f"  chosen {res.get('chosen')}, check {res.get('check', {}).get('passed')} "
          f"{res.get('check', {}).get('value')}, latency {res.get('latency', {}).get('ratio')}x "
          f"{res.get('bundle_error') or ''}", flush=True)
    return res


# ---- results --------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("| model | kind | pack exit | wall s | peak MB | chosen | within budget (edgepack) | task check | value (measure) "
            "| latency vs original ORT |\n|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        p, c, lat = r.get("pack", {}), r.get("check"), r.get("latency")
        check = ("pass" if c["passed"] else "FAIL") if c else ("bundle error" if r.get("bundle_error") else "-")
        value = f"{c['value']} ({c['measure']})" if c else "-"
        ratio = f"{lat['ratio']}x ({lat['bundle_ms']} / {lat['original_ms']} ms)" if lat else "-"
        chosen = f"{r['chosen']} ({r['runtime']})" if r.get("chosen") else "-"
        out.append(f"| {r['name']} | {r['kind']} | {p.get('exit', '-')} | {p.get('wall_s', '-')} | {p.get('peak_rss_mb', '-')} | {chosen} "
                   f"| {r.get('within_budget', '-')} | {check} | {value} | {ratio} |")
    fails = [f"- **{r['name']}**: `{r['pack'].get('error') or r['pack'].get('last_stderr')}`"
             for r in rows if r.get("pack", {}).get("exit") not in (0, None)]
    fails += [f"- **{r['name']}** (bundle run): `{r['bundle_error']}`" for r in rows if r.get("bundle_error")]
    return head + "\n".join(out) + summary(rows) + ("\n\nFailures:\n\n" + "\n".join(fails) if fails else "") + "\n"


def summary(rows: list[dict]) -> str:
    """The issue's goals in one line: exits, compressed bundles that pass, failures within budget, median ratio."""
    ratios = [r["latency"]["ratio"] for r in rows if r.get("latency")]
    packed = [r for r in rows if r.get("pack", {}).get("exit") == 0]
    good = [r for r in packed if r.get("chosen") not in (None, "original") and (r.get("check") or {}).get("passed")]
    bad = [r["name"] for r in rows if r.get("within_budget") is True and (r.get("check") or {}).get("passed") is False]
    exit4 = [r["name"] for r in rows if r.get("pack", {}).get("exit") == 4]
    return (f"\n\n{len(packed)} of {len(rows)} packed (exit 4: {', '.join(exit4) or 'none'}); {len(good)} of {len(rows)} "
            f"compressed and passing their task check; within budget but failing it: {', '.join(bad) or 'none'}; "
            f"median latency vs the original {round(statistics.median(ratios), 3) if ratios else '-'}x, slowest "
            f"{max(ratios) if ratios else '-'}x.")


def write_results(rows: list[dict], args) -> None:
    from edgepack.runner.run import host_fingerprint

    RESULTS.mkdir(exist_ok=True)
    stem = "zoo-batch" if args.from_batch else "zoo"
    jf = RESULTS / f"{stem}.json"
    old = json.loads(jf.read_text())["models"] if jf.exists() else []
    merged = {r["name"]: r for r in old} | {r["name"]: r for r in rows}
    rows = [merged[e.name] for e in ZOO if e.name in merged]
    meta = {"target": args.target, "bench_time": args.bench_time, "future_flags": args.future,
            "host": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
            "cpu": host_fingerprint(),
            "date": time.strftime("%Y-%m-%d"), "from_batch": str(args.from_batch or "")}
    jf.write_text(json.dumps({"meta": meta, "models": rows}, indent=1, default=str) + "\n")
    how = (f"the bundles of one `edgepack batch` run ({args.from_batch}), checked with `python benchmarks/zoo/run.py "
           f"--from-batch`" if args.from_batch else
           f"`python benchmarks/zoo/run.py --bench-time {args.bench_time}{' --future' if args.future else ''}`")
    md = (f"# edgepack real-model zoo\n\nFrom {how} on {meta['date']}, target {args.target}. Task checks and latency "
          "are measured outside edgepack: the bundle's model on its manifest's runtime and settings vs the original in "
          "plain ONNX Runtime (default session options; as many threads as the bundle when it pins a count), same "
          "eval inputs; latency at batch 1, both timed interleaved in blocks in one process (median per run). "
          f"Host: {meta['cpu']['cpu']}, {meta['cpu']['cores']} cores, {' '.join(meta['cpu']['features'])}. "
          "Models: benchmarks/zoo/README.md.\n\n" + table(rows))
    (RESULTS / f"{stem}.md").write_text(md)
    print("\n" + md)


def write_jobs(args) -> None:
    """The zoo as a jobs file for `edgepack batch` (same models, data and flags as the packs above)."""
    lines = [f'targets = ["{args.target}"]', "", "[defaults]", f"bench_time = {args.bench_time}",
             f"timeout = {args.timeout}", ""]
    for e in [BY_NAME[n] for n in args.only] if args.only else ZOO:
        work = CACHE / "work" / e.name
        work.mkdir(parents=True, exist_ok=True)
        write_data(e, work, args.regen)
        model = HERE / "factories" / e.factory if e.factory else Path(e.path)
        flags = (["--weights", str(e.path)] if e.factory else []) + [str(f) for f in e.flags]
        flags += [str(f) for f in e.future_flags] if args.future else []
        lines += ["[[models]]", f"name = {json.dumps(e.name)}", f"model = {json.dumps(str(model))}",
                  f"calib = {json.dumps(str(work / 'calib.npz'))}", f"eval = {json.dumps(str(work / 'eval.npz'))}"]
        lines += [f"args = {json.dumps(flags)}", ""] if flags else [""]
    args.jobs_toml.write_text("\n".join(lines))
    print(f"wrote {args.jobs_toml}: run `edgepack batch {args.jobs_toml} --out DIR`")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BY_NAME), help="models to run (default: all)")
    ap.add_argument("--target", default="cpu-x86")
    ap.add_argument("--bench-time", type=float, default=0.5, help="passed to edgepack pack")
    ap.add_argument("--time-s", type=float, default=6.0, help="our own interleaved timing budget per model")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per edgepack pack")
    ap.add_argument("--mem-limit-gb", type=float, default=16, help="address-space limit per edgepack pack")
    ap.add_argument("--verbose", action="store_true", help="edgepack -v: stage timings in pack.log")
    ap.add_argument("--future", action="store_true", help="also pass each model's future_flags")
    ap.add_argument("--reuse", action="store_true",
                    help="no packing: check and time the bundles already built (pack results from the last run)")
    ap.add_argument("--selftest", action="store_true", help="only check the task checks (no packing)")
    ap.add_argument("--regen", action="store_true", help="rewrite calib/eval data")
    ap.add_argument("--from-batch", type=Path, metavar="OUT",
                    help="no packing: check and time the bundles of `edgepack batch ... --out OUT`")
    ap.add_argument("--jobs-toml", type=Path, metavar="FILE",
                    help="no packing: write the zoo as one `edgepack batch` jobs file (data under .cache/work)")
    args = ap.parse_args(argv)
    if args.jobs_toml:
        return write_jobs(args)
    rows = []
    for e in [BY_NAME[n] for n in args.only] if args.only else ZOO:
        try:
            rows.append(evaluate(e, args))
        except Exception as x:  # a broken entry must not stop the zoo
            rows.append({"name": e.name, "kind": e.kind, "zoo_error": f"{type(x).__name__}: {x}"})
            print(f"  zoo error: {type(x).__name__}: {x}", flush=True)
    if not args.selftest:
        write_results(rows, args)


if __name__ == "__main__":
    main()
