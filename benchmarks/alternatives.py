"""edgepack against the tools a user would pick instead, measured in one run on this machine.

Per model (digits CNN, a ResNet-18-shaped CNN at 3x224x224, the tiny transformer), batch 1, 2 threads, all
sessions timed together in one process by edgepack.bench.measure (interleaved in blocks of bench.BLOCK timed
runs, each turn starting with bench.SETTLE untimed runs; ONNX Runtime with its default thread spinning):

  edgepack          the bundle `edgepack pack --target cpu-x86` chose (its model and runtime from the manifest)
  ort-fp32          ONNX Runtime, the original model (the baseline every ratio is against)
  ort-int8-static   onnxruntime.quantization.quantize_static with its defaults (QDQ, QInt8/QInt8, per-tensor,
                    MinMax), on the same calibration data
  ort-int8-dynamic  quantize_dynamic with its defaults (QInt8 weights, per-tensor; every supported op incl.
                    Conv), as `optimum-cli onnxruntime quantize --avx512_vnni` without --per_channel
  ov-fp32           OpenVINO CPU reading the ONNX file, INFERENCE_PRECISION_HINT pinned to f32
  ov-nncf-int8      nncf.quantize(ov.convert_model(onnx), calibration) with its defaults, saved with
                    ov.save_model defaults, run with f32 pinned for the non-quantized parts

Quality: accuracy on the labelled eval.npz of every model (the ResNet's labels are its template classes, see
resnet.py), plus top-1 agreement and cosine to ORT fp32; "within budget" uses edgepack's own rule with labels:
at most 1 accuracy point below ORT fp32. The packs run with --bench-time 2 (their choice among near-equal
candidates); the table's timing, all sessions measured together afterwards, is what the ratios come from.
Also measured: `edgepack pack` (no arguments) wall time and peak memory, `edgepack --help` start-up time.

    .venv/bin/python benchmarks/alternatives.py [--models digits,resnet,tiny-transformer] [--bench-time 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as common

from edgepack.bench import BLOCK, SETTLE

log = logging.getLogger("alternatives")
THREADS = 2
MODELS = ("digits", "resnet", "tiny-transformer")
ALTERNATIVES = ("ort-fp32", "ort-int8-static", "ort-int8-dynamic", "ov-fp32", "ov-nncf-int8")
DESCRIPTIONS = {
    "edgepack": "edgepack pack --target cpu-x86 (chosen bundle)",
    "ort-fp32": "ONNX Runtime fp32 (baseline)",
    "ort-int8-static": "ORT quantize_static defaults (QDQ S8S8 per-tensor, MinMax)",
    "ort-int8-dynamic": "ORT quantize_dynamic defaults (= optimum-cli onnxruntime quantize)",
    "ov-fp32": "OpenVINO CPU fp32 (f32 pinned)",
    "ov-nncf-int8": "OpenVINO CPU + nncf.quantize defaults",
}


# ---------------------------------------------------------------- models and data

def model_files(name: str, work: Path) -> dict[str, Path]:
    if name == "resnet":
        import resnet

        return resnet.write(work / "resnet-src")
    d = common.SAMPLES / name
    return {"model": d / "model.onnx", "calib": d / "calib.npz", "eval": d / "eval.npz"}


def datasets(files: dict[str, Path]):
    from edgepack.data import load_dataset
    from edgepack.model.describe import io_specs
    from edgepack.model.load import load_model

    ins, _ = io_specs(load_model(files["model"]))
    return load_dataset(files["calib"], ins, kind="calib"), load_dataset(files["eval"], ins, kind="eval")


# ---------------------------------------------------------------- the alternatives

def _ort_spec():
    from edgepack.target import RuntimeSpec

    return RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")


def _ov_spec():
    from edgepack.target import RuntimeSpec

    return RuntimeSpec(runtime="openvino", device="CPU", inference_precision="f32")


def build_alternatives(model: Path, calib, work: Path) -> dict[str, tuple]:
    """{name: (Artifact, RuntimeSpec, build seconds)} for every third-party alternative."""
    import nncf
    import openvino as ov
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    from edgepack.types import Artifact, ModelFormat

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calib.batches(1))

        def get_next(self):
            return next(self._it, None)

    work.mkdir(parents=True, exist_ok=True)
    onnx_art = Artifact(path=model, format=ModelFormat.ONNX, files=(model,))
    out = {"ort-fp32": (onnx_art, _ort_spec(), 0.0), "ov-fp32": (onnx_art, _ov_spec(), 0.0)}

    t0 = time.perf_counter()
    static = work / "ort-int8-static.onnx"
    with contextlib.chdir(work):  # ORT's shape inference leaves sym_shape_infer_temp.onnx in the CWD
        quantize_static(str(model.absolute()), str(static.absolute()), Reader())
    out["ort-int8-static"] = (Artifact(static, ModelFormat.ONNX, (static,)), _ort_spec(), time.perf_counter() - t0)

    t0 = time.perf_counter()
    dynamic = work / "ort-int8-dynamic.onnx"
    quantize_dynamic(str(model), str(dynamic))
    out["ort-int8-dynamic"] = (Artifact(dynamic, ModelFormat.ONNX, (dynamic,)), _ort_spec(), time.perf_counter() - t0)

    t0 = time.perf_counter()
    items = [dict(b) for b in calib.batches(1)]
    quantized = nncf.quantize(ov.convert_model(str(model)), nncf.Dataset(items))
    xml = work / "ov-nncf-int8.xml"
    ov.save_model(quantized, str(xml))
    out["ov-nncf-int8"] = (Artifact(xml, ModelFormat.OPENVINO, (xml, xml.with_suffix(".bin"))), _ov_spec(),
                           time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- measuring

def size_of(files) -> int:
    return sum(Path(f).stat().st_size for f in files if Path(f).exists())


def within(fid, ref_fid, labels: bool, thresholds, max_drop: float = 0.01) -> bool:
    """edgepack's budget rule (scoring.Scoring.judge): 1 accuracy point with labels, else fidelity."""
    if labels:
        return ref_fid.accuracy - fid.accuracy <= max_drop + 1e-9
    top1 = fid.top1_agreement is None or fid.top1_agreement >= thresholds.min_top1_agreement
    return top1 and fid.cosine >= thresholds.min_cosine


def pack_candidates(bundle: Path) -> list[dict]:
    rep = json.loads((bundle / "report.json").read_text(encoding="utf-8"))
    rows = []
    for c in rep["candidates"]:
        f, lat = c.get("fidelity") or {}, c.get("latency") or {}
        rows.append({"name": c["name"], "status": c.get("status"), "p50": lat.get("p50"),
                     "accuracy": f.get("accuracy"), "top1": f.get("top1_agreement"), "cosine": f.get("cosine"),
                     "within_budget": c.get("within_budget"), "size": c.get("size_bytes"),
                     "chosen": c["name"] == rep.get("chosen"), "error": c.get("error")})
    return rows


def measure_model(name: str, files: dict[str, Path], bundles: dict[str, Path], work: Path, bench_time: float) -> dict:
    """Open every session (one at a time), time them interleaved, then score them on the eval set."""
    from edgepack.bench import measure
    from edgepack.bundle.manifest import load_manifest
    from edgepack.bundle.profile import bundle_session
    from edgepack.fidelity import compare, run_dataset
    from edgepack.runtimes import open_session
    from edgepack.target import BenchSettings, load_target

    calib, ev = datasets(files)
    labels = ev.labels
    t0 = time.perf_counter()
    alts = build_alternatives(files["model"], calib, work / f"{name}-alts")
    build_s = time.perf_counter() - t0

    sessions, info = {}, {}
    for key in ALTERNATIVES:
        art, spec, secs = alts[key]
        sessions[key] = open_session(art, spec, threads=THREADS)
        info[key] = {"candidate": key, "runtime": spec.runtime.value,
                     "precision": "fp32" if key.endswith("fp32") else "int8", "size": size_of(art.files),
                     "build_s": secs}
    for key, bundle in bundles.items():
        manifest = load_manifest(bundle)
        sessions[key] = bundle_session(bundle, manifest, THREADS, None)
        info[key] = {"candidate": manifest["candidate"], "runtime": manifest["runtime"]["name"],
                     "precision": manifest["precision"],
                     "size": size_of(bundle / f for f in manifest["files"] if f.startswith("model"))}
    for key, s in sessions.items():
        if getattr(s, "precision_used", "f32") not in ("f32", None):
            log.warning("%s runs in %s", key, s.precision_used)

    feeds = {k: v[:1] for k, v in next(iter(ev.batches(1))).items()}
    settings = BenchSettings(threads=THREADS, warmup=10, min_iterations=30, time_budget_s=bench_time)
    t0 = time.perf_counter()
    lat = measure(sessions, feeds, settings, batch=1)
    measure_s = time.perf_counter() - t0

    batch = 8 if name == "resnet" else 32
    ref = run_dataset(sessions["ort-fp32"], ev, batch)
    ref_fid = compare(ref, ref, labels)
    thresholds = load_target("cpu-x86").fidelity
    base = lat["ort-fp32"].p50
    rows = []
    for key, s in sessions.items():
        fid = compare(ref, run_dataset(s, ev, batch), labels)
        r = lat[key]
        rows.append({
            "method": key, "description": DESCRIPTIONS[key], **info[key], "device_used": s.device_used,
            "precision_used": getattr(s, "precision_used", None),
            "p50_ms": r.p50, "p90_ms": r.p90, "p50_ci95": list(r.p50_ci95), "cv": r.cv, "iterations": r.iterations,
            "ratio_to_ort_fp32": r.p50 / base, "load_ms": r.load_ms, "memory_mb": r.peak_memory_mb,
            "accuracy": fid.accuracy, "top1_agreement": fid.top1_agreement, "cosine": fid.cosine,
            "max_abs_diff": fid.max_abs_diff,
            "within_budget": within(fid, ref_fid, labels is not None, thresholds),
        })
    return {"model": name, "files": {k: str(v) for k, v in files.items()}, "labels": labels is not None,
            "reference_accuracy": ref_fid.accuracy, "eval_samples": len(ev), "calib_samples": len(calib),
            "rows": rows, "pack_candidates": {k: pack_candidates(b) for k, b in bundles.items()},
            "alternatives_build_s": build_s, "measure_s": measure_s}


# ---------------------------------------------------------------- targets and output

def check_targets(models: dict, pack_run: dict | None, help_run: dict | None) -> list[dict]:
    out = []
    for name, m in models.items():
        rows = {r["method"]: r for r in m["rows"]}
        ep = rows["edgepack"]
        alts = [r for r in m["rows"] if r["method"] in ALTERNATIVES]
        ok_alts = [r for r in alts if r["within_budget"]]
        out_alts = [r for r in alts if not r["within_budget"]]
        best = min(ok_alts, key=lambda r: r["p50_ms"]) if ok_alts else None
        compared = ("compared against (within budget): " + ", ".join(
            f"{r['method']} {r['p50_ms']:.4f} ms" for r in sorted(ok_alts, key=lambda r: r["p50_ms"])))
        excluded = ("; not counted (outside the budget, " + _budget_rule(m) + "): " + ", ".join(
            f"{r['method']} {r['p50_ms']:.4f} ms, {_quality(r, m['labels'])}" for r in out_alts)) if out_alts else ""
        if best is not None:
            ratio = ep["p50_ms"] / best["p50_ms"]
            out.append({"target": f"{name}: chosen bundle <= 1.05x the best alternative within budget, "
                                  "and within budget itself",
                        "pass": ep["within_budget"] and ratio <= 1.05,
                        "compared": [r["method"] for r in ok_alts], "excluded": [r["method"] for r in out_alts],
                        "detail": f"edgepack {ep['candidate']} {ep['p50_ms']:.4f} ms ({_quality(ep, m['labels'])}, "
                                  f"within budget: {ep['within_budget']}) vs best {best['method']} "
                                  f"{best['p50_ms']:.4f} ms = {ratio:.2f}x; {compared}{excluded}"})
        else:
            out.append({"target": f"{name}: chosen bundle <= 1.05x the best alternative within budget",
                        "pass": ep["within_budget"], "compared": [], "excluded": [r["method"] for r in out_alts],
                        "detail": f"no alternative is within budget{excluded}; edgepack {ep['candidate']} "
                                  f"within budget: {ep['within_budget']}"})
        if name == "resnet":
            r = ep["ratio_to_ort_fp32"]
            out.append({"target": "resnet: chosen bundle <= 0.30x ONNX Runtime fp32", "pass": r <= 0.30,
                        "detail": f"{ep['candidate']}: {ep['p50_ms']:.3f} ms / {rows['ort-fp32']['p50_ms']:.3f} ms = {r:.2f}x"})
    if pack_run is not None:
        out.append({"target": "edgepack pack (digits sample, no args) < 10 s", "pass": pack_run["wall_s"] < 10,
                    "detail": f"{pack_run['wall_s']:.1f} s wall"})
        out.append({"target": "edgepack pack (digits sample, no args) < 400 MB peak",
                    "pass": pack_run["peak_pss_mb"] < 400,
                    "detail": f"{pack_run['peak_pss_mb']:.0f} MB PSS of the process tree (largest single process "
                              f"{pack_run['peak_process_rss_mb']:.0f} MB RSS, as /usr/bin/time reports; RSS summed "
                              f"over the tree {pack_run['peak_rss_sum_mb']:.0f} MB, counting shared pages twice)"})
    if help_run is not None:
        out.append({"target": "edgepack --help < 0.5 s", "pass": help_run["median_s"] < 0.5,
                    "detail": f"median {help_run['median_s']:.3f} s of {help_run['runs']} runs"})
    return out


def findings(models: dict) -> list[str]:
    """Plain-language reasons behind the results: what was fastest, and why edgepack did or did not pick it."""
    notes = []
    for name, m in models.items():
        rows = {r["method"]: r for r in m["rows"]}
        ep = rows["edgepack"]
        fastest = min(m["rows"], key=lambda r: r["p50_ms"])
        notes.append(f"{name}: fastest session overall is {fastest['method']} ({fastest['p50_ms']:.4f} ms, "
                     f"{_quality(fastest, m['labels'])}, within budget: {fastest['within_budget']}); edgepack chose "
                     f"{ep['candidate']} ({ep['p50_ms']:.4f} ms, {ep['ratio_to_ort_fp32']:.2f}x ORT fp32).")
        for c in m["pack_candidates"].get("edgepack", []):
            if c["status"] == "ok" and c["within_budget"] is False:
                q = (f"accuracy {c['accuracy']:.4f}" if c["accuracy"] is not None
                     else f"top-1 {c['top1']:.4f}, cosine {c['cosine']:.5f}")
                notes.append(f"{name}: the pack built {c['name']} (p50 {c['p50']:.4f} ms in the pack's own timing, {q}) "
                             f"and rejected it as outside the budget.")
        for c in m["pack_candidates"].get("edgepack", []):
            if c["status"] != "ok":
                notes.append(f"{name}: the pack's candidate {c['name']} was {c['status']}: {c['error']}")
    return notes


def _quality(r: dict, labels: bool) -> str:
    fid = f"top-1 agreement {r['top1_agreement']:.4f}, cosine {r['cosine']:.5f}"
    return f"accuracy {r['accuracy']:.4f}, {fid}" if labels else fid


def _budget_rule(m: dict) -> str:
    if m["labels"]:
        return f"accuracy >= {m['reference_accuracy'] - 0.01:.4f}, 1 point below ORT fp32's {m['reference_accuracy']:.4f}"
    return "top-1 agreement >= 0.99 and cosine >= 0.999"


def _f(v, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(data: dict) -> str:
    h = data["host"]
    lines = ["# edgepack against the alternatives", "",
             f"Run {data['date']} on {h['cpu']} ({h['cores']} cores, {h['os']}), ONNX Runtime {h['onnxruntime']}, "
             f"OpenVINO {h['openvino']}; batch 1, {THREADS} threads, sessions timed together by edgepack.bench.measure "
             f"(blocks of {data['settings']['block']} timed runs after {data['settings']['settle']} untimed settle "
             f"runs per turn, {data['settings']['bench_time_s']} s of timing each; ONNX Runtime with its default thread "
             f"spinning). Packs ran with --bench-time {data['settings']['pack_bench_time_s']}. "
             f"Whole run: {data['total_s']:.0f} s.", "",
             f"> {common.NOISE_NOTE}", ""]
    for name, m in data["models"].items():
        lines += [f"## {name}", "",
                  f"Eval: {m['eval_samples']} samples ({'labelled' if m['labels'] else 'no labels: fidelity to ORT fp32'}"
                  f"{', ORT fp32 accuracy %.4f' % m['reference_accuracy'] if m['labels'] else ''}); "
                  f"calibration: {m['calib_samples']} samples. Budget: {_budget_rule(m)}.", ""]
        rows = []
        for r in m["rows"]:
            acc = f"{r['accuracy']:.4f}" if m["labels"] else "—"
            label = r["method"] + (f" ({r['candidate']})" if r["method"].startswith("edgepack") else "")
            rows.append([label, r["runtime"], r["precision"], f"{r['p50_ms']:.4f}", f"{r['p90_ms']:.4f}",
                         f"{r['ratio_to_ort_fp32']:.2f}x", acc, f"{r['top1_agreement']:.3f}", f"{r['cosine']:.5f}",
                         "yes" if r["within_budget"] else "**no**", f"{r['size'] / 1e6:.2f} MB"])
        lines += [common.md_table(["method", "runtime", "precision", "p50 ms", "p90 ms", "vs ORT fp32", "accuracy",
                                   "top-1 agreement", "cosine to fp32", "within budget", "model size"], rows), ""]
        pc = m["pack_candidates"].get("edgepack", [])
        if pc:
            lines += [f"The pack's own candidates (`--bench-time {data['settings']['pack_bench_time_s']}`, timed "
                      "inside the pack; the table above is the source of the ratios):", ""]
            lines += [common.md_table(["candidate", "status", "p50 ms (pack)", "accuracy", "top-1 agreement", "cosine",
                                       "within budget", "chosen"],
                                      [[c["name"], c["status"], _f(c["p50"], 4), _f(c["accuracy"], 4), _f(c["top1"], 4),
                                        _f(c["cosine"], 5), {True: "yes", False: "**no**"}.get(c["within_budget"], "—"),
                                        "**yes**" if c["chosen"] else ""] for c in pc]), ""]
    lines += ["## Targets", ""]
    lines += [f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['detail']}" for t in data["targets"]]
    lines += ["", "## Findings", ""] + [f"- {n}" for n in data["findings"]]
    if data.get("pack_digits"):
        p = data["pack_digits"]
        lines += ["", f"`edgepack pack` (digits, no arguments): {p['wall_s']:.1f} s wall, "
                      f"peak memory {p['peak_pss_mb']:.0f} MB PSS summed over the process tree "
                      f"(largest process {p['peak_process_rss_mb']:.0f} MB RSS; RSS summed {p['peak_rss_sum_mb']:.0f} MB). "
                      "The pack verifies the bundle by running its run.py in a child process, so two Pythons "
                      "with a runtime loaded overlap for a moment."]
    if data.get("help"):
        lines += [f"`edgepack --help`: median {data['help']['median_s']:.3f} s over {data['help']['runs']} runs."]
    lines += ["", "Methods:", ""] + [f"- `{k}`: {v}" for k, v in DESCRIPTIONS.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--bench-time", type=float, default=3.0, help="seconds of timing per session")
    ap.add_argument("--pack-bench-time", type=float, default=2.0,
                    help="--bench-time for the packs (the no-argument digits pack uses the target's 2 s)")
    ap.add_argument("--no-cli", action="store_true", help="skip the pack wall-time and --help start-up checks")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--work", type=Path, help="keep intermediate files here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")

    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = {"date": common.now(), "host": common.host(), "threads": THREADS,
            "settings": {"bench_time_s": args.bench_time, "pack_bench_time_s": args.pack_bench_time,
                         "block": BLOCK, "settle": SETTLE},
            "models": {}, "pack_digits": None, "help": None}
    try:
        if not args.no_cli:
            log.info("edgepack pack (no arguments) ...")
            cwd = work / "pack-default"
            cwd.mkdir(exist_ok=True)
            shutil.rmtree(cwd / "dist", ignore_errors=True)
            run = common.run_tracked([*common.edgepack_cmd(), "pack"], cwd=cwd)
            if run["returncode"] != 0:
                raise RuntimeError(f"edgepack pack failed:\n{run['stderr'][-2000:]}")
            data["pack_digits"] = {k: v for k, v in run.items() if k not in ("stdout", "stderr")}
            log.info("  %.1f s, %.0f MB PSS", run["wall_s"], run["peak_pss_mb"])
            data["help"] = common.median_wall([*common.edgepack_cmd(), "--help"], 10, cwd=work)
            log.info("edgepack --help: median %.3f s", data["help"]["median_s"])
        for name in names:
            log.info("%s: preparing model and packing ...", name)
            t0 = time.perf_counter()
            files = model_files(name, work)
            bundles = {}
            default = work / "pack-default" / "dist" / "digits-cpu-x86"
            if name == "digits" and default.exists():
                bundles["edgepack"] = default  # `edgepack pack` with no args packs exactly this with these data
            else:
                bundles["edgepack"] = common.pack(files["model"], work / f"{name}-edgepack", calib=files["calib"],
                                                  eval=files["eval"], bench_time=args.pack_bench_time)
            pack_s = time.perf_counter() - t0
            log.info("%s: building alternatives and measuring ...", name)
            m = measure_model(name, files, bundles, work, args.bench_time)
            m["pack_s"] = pack_s
            data["models"][name] = m
            for r in m["rows"]:
                log.info("  %-18s p50 %9.4f ms  %.2fx  within budget %s", r["method"], r["p50_ms"],
                         r["ratio_to_ort_fp32"], r["within_budget"])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    data["targets"] = check_targets(data["models"], data["pack_digits"], data["help"])
    data["findings"] = findings(data["models"])
    return common.finish("alternatives", data, markdown, args.out, start)


if __name__ == "__main__":
    sys.exit(main())
