"""report.py: JSON round trip, Markdown/HTML content, Rich table, compare of profile JSONs."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgepack.cli.render import candidates_table
from edgepack.errors import EdgepackError
from edgepack.report.build import noise_warnings
from edgepack.report.compare import compare_reports
from edgepack.report.document import write_reports
from edgepack.report.json import read_report, report_from_dict, report_to_dict
from edgepack.types import SCHEMA_VERSION, BenchResult, CandidateResult, Fidelity, Report, StepRecord

GPU_NOTE = "not measured: CUDAExecutionProvider not available on this host"


def bench(p50: float, spread: float, device: str = "CPUExecutionProvider", n: int = 40) -> BenchResult:
    # deterministic samples around p50; the stats below are the ones a real run would report for them
    samples = tuple(round(p50 + spread * (((i * 37) % 17) - 8) / 8, 4) for i in range(n))
    return BenchResult(runtime="onnxruntime", device=device, batch=1, threads=2, warmup=10, iterations=n,
                       p50=p50, p90=round(p50 + 0.75 * spread, 4), p99=round(p50 + spread, 4), mean=p50,
                       std=round(spread / 2, 4), min=round(p50 - spread, 4), max=round(p50 + spread, 4),
                       p50_ci95=(round(p50 - spread / 8, 4), round(p50 + spread / 8, 4)),
                       throughput=round(1000 / p50, 3), load_ms=12.5, first_ms=3.25, peak_memory_mb=41.5,
                       cv=round(spread / 2 / p50, 4), samples_ms=samples)


def make_report() -> Report:
    int8 = CandidateResult(
        name="onnxruntime-int8", runtime="onnxruntime", device="CPUExecutionProvider", precision="int8",
        status="ok", size_bytes=2_621_440, compressed_bytes=1_835_008,
        steps=(StepRecord("optimize-graph", {}, False, "nothing to change: graph already optimal", seconds=0.05),
               StepRecord("quantize-static", {"per_channel": True}, True, "quantized 12 of 14 Conv/MatMul nodes",
                          seconds=1.5)),
        fidelity=Fidelity(n=500, top1_agreement=0.994, cosine=0.99912, max_abs_diff=0.0731, accuracy=0.962),
        latency=bench(1.25, 0.1), kernels={"int_ops": 3, "float_ops": 2, "int_time_share": 0.82},
        within_budget=True, files=("model.onnx",))
    fp32 = CandidateResult(
        name="onnxruntime-fp32", runtime="onnxruntime", device="CPUExecutionProvider", precision="fp32",
        status="ok", size_bytes=10_485_760, compressed_bytes=9_699_328,
        fidelity=Fidelity(n=500, top1_agreement=1.0, cosine=1.0, max_abs_diff=0.0, accuracy=0.968),
        latency=bench(3.5, 0.3), kernels={"int_ops": 0, "float_ops": 5, "int_time_share": 0.0},
        within_budget=True, files=("model.onnx",))
    gpu = CandidateResult(
        name="onnxruntime-cuda-fp16", runtime="onnxruntime", device="CUDAExecutionProvider", precision="fp16",
        status="ok", size_bytes=5_242_880, compressed_bytes=4_718_592,
        steps=(StepRecord("fp16", {"keep_io_types": True}, True, "converted 40 initializers to fp16", seconds=0.4),),
        fidelity=Fidelity(n=500, top1_agreement=0.998, cosine=0.99997, max_abs_diff=0.0042, accuracy=0.966),
        latency=None, latency_note=GPU_NOTE, within_budget=True, notes=("fidelity checked on CPUExecutionProvider",))
    failed = CandidateResult(
        name="openvino-int4", runtime="openvino", device="CPU", precision="int4", status="failed",
        error="nncf-int4: no MatMul with 2-D weights to compress")
    return Report(
        schema_version=SCHEMA_VERSION, edgepack_version="0.1.0", created="2025-01-02T03:04:05Z",
        target={"name": "cpu-x86", "description": "x86 CPU with VNNI", "source": "targets/cpu-x86.toml",
                "runtimes": [{"runtime": "onnxruntime", "provider": "CPUExecutionProvider"},
                             {"runtime": "openvino", "device": "CPU", "inference_precision": "f32"}]},
        host={"cpu": "Intel(R) Xeon(R) Platinum 8375C", "arch": "x86_64", "cores": 2,
              "features": ["avx2", "avx512f", "avx512_vnni"], "os": "Linux 6.1", "python": "3.11.9",
              "runtimes": {"onnxruntime": {"version": "1.32.0", "devices": ["CPUExecutionProvider"]},
                           "openvino": {"version": "2026.4.0", "devices": ["CPU"]}}, "threads": 2},
        model={"source": "/models/resnet_tiny.onnx", "sha256": "ab" * 32, "format": "onnx", "parameters": 2_600_000,
               "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 3, 32, 32]}],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}], "metadata": {}},
        budget={"max_drop": 0.01, "metric": "accuracy"},
        candidates=(int8, fp32, gpu, failed), baseline="onnxruntime-fp32", chosen="onnxruntime-int8",
        reason="fastest within budget: 2.8x faster than fp32, accuracy drop 0.6% <= 1%",
        op_profile=({"op": "QLinearConv", "ms": 0.81, "share": 0.648, "int": True, "device": "CPUExecutionProvider",
                     "calls": 3},
                    {"op": "Softmax", "ms": 0.2, "share": 0.16, "int": False, "device": "CPUExecutionProvider",
                     "calls": 1},
                    {"op": "MatMulInteger", "ms": 0.19, "share": 0.152, "int": True,
                     "device": "CPUExecutionProvider", "calls": 1},
                    {"op": "Gelu", "ms": 0.05, "share": 0.04, "int": False, "device": "OtherExecutionProvider",
                     "calls": 1}),
        batch_sweep=({"candidate": "onnxruntime-int8", "batch": 1, "p50": 1.25, "throughput": 800.0},
                     {"candidate": "onnxruntime-int8", "batch": 8, "p50": 6.5, "throughput": 1230.77}),
        warnings=("calibration used 64 samples (fewer than the 128 asked)",),
        extra={"pruning": {"target_sparsity": 0.5,
                           "per_layer": {"conv1.weight": {"sparsity": 0.41, "params": 864},
                                         "fc.weight": {"sparsity": 0.55, "params": 5120}}},
               "structured_pruning": {"before": {"params": 2600000, "macs": 41000000},
                                      "after": {"params": 1300000, "macs": 19000000}},
               "distillation": {"teacher": "resnet_tiny", "student": "resnet_tiny-pruned", "epochs": 3,
                                "teacher_accuracy": 0.968, "student_accuracy": 0.962}})


def md_row(md: str, name: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {name} "))


@pytest.fixture
def written(tmp_path):
    paths = write_reports(make_report(), tmp_path)
    return {p.name: p.read_text(encoding="utf-8") for p in paths}


def test_json_round_trip_is_exact(tmp_path):
    report = make_report()
    d = report_to_dict(report)
    assert d["schema_version"] == 2 and d["kind"] == "report"
    assert json.loads(json.dumps(d)) == d  # JSON-safe
    assert report_from_dict(json.loads(json.dumps(d))) == report
    write_reports(report, tmp_path)
    shipped = read_report(tmp_path / "report.json")  # as written: no absolute path of this machine
    assert shipped == replace(report, model={**report.model, "source": "resnet_tiny.onnx"})
    gpu = d["candidates"][2]
    assert gpu["latency"] is None and gpu["latency_note"] == GPU_NOTE
    assert d["candidates"][0]["latency"]["p50_ci95"] == [1.2375, 1.2625]


def test_to_dict_normalizes_enums_tuples_and_floats():
    from edgepack.types import Precision

    r = replace(make_report(), extra={"p": Precision.INT8, "t": (1, 2), "f": 1 / 3, "nan": float("nan"),
                                      "path": Path("/a/b")})
    nan_cv = replace(r.candidates[0], latency=replace(r.candidates[0].latency, cv=float("inf")))
    back = report_from_dict(report_to_dict(replace(r, candidates=(nan_cv,))))
    assert report_to_dict(replace(r, candidates=(nan_cv,)))["candidates"][0]["latency"]["cv"] is None
    assert math.isnan(back.candidates[0].latency.cv)
    assert report_to_dict(r)["extra"] == {"p": "int8", "t": [1, 2], "f": 0.333333, "nan": None, "path": "/a/b"}


def test_from_dict_errors_name_the_field():
    d = report_to_dict(make_report())
    del d["candidates"][0]["latency"]["p50"]
    with pytest.raises(EdgepackError, match=r"r\.json\.candidates\[0\]\.latency: missing field\(s\) p50"):
        report_from_dict(d, "r.json")
    d = report_to_dict(make_report())
    d["candidates"][1]["latency"]["p90"] = "fast"
    with pytest.raises(EdgepackError, match=r"candidates\[1\]\.latency\.p90: expected a number, got 'fast'"):
        report_from_dict(d, "r.json")
    with pytest.raises(EdgepackError, match="schema_version 3 is not supported"):
        report_from_dict({**report_to_dict(make_report()), "schema_version": 3}, "r.json")


def test_markdown_environment_and_result(written):
    md = written["report.md"]
    for line in ("- **CPU:** Intel(R) Xeon(R) Platinum 8375C (x86_64)", "- **CPU features:** avx2, avx512f, avx512_vnni",
                 "- **Cores / threads used:** 2 physical cores / 2 threads", "- **OS:** Linux 6.1",
                 "- **Python:** 3.11.9", "- **onnxruntime:** 1.32.0 (devices: CPUExecutionProvider)",
                 "- **openvino:** 2026.4.0 (devices: CPU)",
                 "- **Provider/device used:** onnxruntime/CPUExecutionProvider",
                 "- **Precision hint:** openvino/CPU: f32", "- **Batch:** 1"):
        assert line in md
    assert ("Chosen: onnxruntime-int8: the fastest within the budget (accuracy at most 1 point below the "
            "original's): p50 1.25 ms, 0.36× the onnxruntime-fp32; accuracy 96.20%.") in md
    assert "- **Budget:** accuracy at most 1 point below the original's" in md


def test_markdown_candidate_rows(written):
    md = written["report.md"]
    int8 = md_row(md, "onnxruntime-int8 ★").split(" | ")
    assert int8[1:] == ["onnxruntime", "CPUExecutionProvider", "int8", "ok", "2.50 MB", "1.75 MB", "1.25",
                        "1.32", "1.35", "800.0 |"]
    details = [line for line in md.splitlines() if line.startswith("| onnxruntime-int8 ★")][1]
    assert details == "| onnxruntime-int8 ★ | 1.25 ± 0.050 | 1.24–1.26 | 12.50 | 3.25 | 41.5 |"
    fp32 = md_row(md, "onnxruntime-fp32")
    assert "| 3.50 | 3.73 | 3.80 | 285.7 |" in fp32
    gpu = md_row(md, "onnxruntime-cuda-fp16")
    assert "| CUDAExecutionProvider |" in gpu and "→" not in gpu  # nothing used: no arrow to nothing
    assert f"| {GPU_NOTE} |" in gpu
    latency_cells = gpu.split(GPU_NOTE)[1]
    assert not re.search(r"\d", latency_cells), latency_cells  # no number where latency would be
    failed = md_row(md, "openvino-int4")
    assert "| failed |" in failed and "not measured: failed" in failed
    # quality table: accuracy / fidelity / kernels / budget
    q = [line for line in md.splitlines() if line.startswith("| onnxruntime-int8 ★")][2]
    assert q == "| onnxruntime-int8 ★ | 500 | 96.20% | 99.40% | 0.999120 | 0.0731 | int 3/5 ops, 82% of time | yes |"


def test_markdown_steps_failures_ops_sweep_warnings_extra(written):
    md = written["report.md"]
    assert "- optimize-graph (0.05 s): no change: graph already optimal" in md
    assert "- quantize-static (1.50 s): quantized 12 of 14 Conv/MatMul nodes" in md
    assert "- note: fidelity checked on CPUExecutionProvider" in md
    assert "- openvino-int4: nncf-int4: no MatMul with 2-D weights to compress" in md
    assert "| QLinearConv | 3 | 0.810 | 64.80% | int | CPUExecutionProvider |  |" in md
    assert "| Softmax | 1 | 0.200 | 16.00% | float | CPUExecutionProvider | float |" in md
    assert "| Gelu | 1 | 0.050 | 4.00% | float | OtherExecutionProvider | float, on OtherExecutionProvider |" in md
    assert "| onnxruntime-int8 | 8 | 6.5 | 1231 |" in md
    assert "- calibration used 64 samples (fewer than the 128 asked)" in md
    assert "## Pruning" in md and "- **target sparsity:** 0.5" in md
    assert "| conv1.weight | 0.41 | 864 |" in md
    assert "| after | 1,300,000 | 19,000,000 |" in md
    assert "- **teacher:** resnet_tiny" in md and "- **student accuracy:** 0.962" in md  # keys as words


def test_noise_warnings():
    r = make_report()
    assert noise_warnings(r) == []  # int8 and fp32 CIs are far apart, cv 0.04
    close = replace(r.candidates[1], latency=replace(bench(1.26, 0.5), cv=0.2))
    ws = noise_warnings(replace(r, candidates=(r.candidates[0], close, *r.candidates[2:])))
    assert ws[0].startswith("latency is noisy on 1 of 2 candidates (p90 up to 30% above p50 on onnxruntime-fp32, cv 0.20)")
    # a high cv from a few outliers, with a tight bulk (p90 near p50), is not flagged
    spiky = replace(r.candidates[1], latency=replace(r.candidates[1].latency, cv=3.0))
    assert not any("noisy" in w for w in noise_warnings(replace(r, candidates=(r.candidates[0], spiky, *r.candidates[2:]))))
    assert ws[1].startswith("onnxruntime-int8 and onnxruntime-fp32 (p50 1.25 vs 1.26 ms): their p50 95% CIs overlap "
                            "(1.24–1.26 vs 1.20–1.32 ms)")


def test_html_self_contained_with_four_plots(written):
    html = written["report.html"]
    assert html.count("<svg") == 4
    for pid in ("plot-latency", "plot-tradeoff", "plot-size", "plot-ops"):
        assert f'id="{pid}"' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "url(" not in html and "@import" not in html
    assert GPU_NOTE in html and "not measured" in html.split('id="plot-latency"')[1].split("</svg>")[0]
    latency_svg = html.split('id="plot-latency"')[1].split("</svg>")[0]
    assert latency_svg.count('class="box"') == 2  # the two measured candidates
    tradeoff = html.split('id="plot-tradeoff"')[1].split("</svg>")[0]
    assert tradeoff.count("<circle") == 3 and tradeoff.count('class="point chosen"') == 1
    assert 'class="pareto"' in tradeoff
    assert html.split('id="plot-size"')[1].split("</svg>")[0].count('class="bar"') == 6  # 3 sized x 2
    assert html.split('id="plot-ops"')[1].split("</svg>")[0].count('class="bar"') == 4


def test_html_escapes_text(tmp_path):
    r = replace(make_report(), warnings=("<script>alert(1)</script> & more",))
    html = (write_reports(r, tmp_path)[2]).read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html


def test_pareto_front():
    from edgepack.report.plots import Point, pareto_front

    pts = [Point("a", 1.0, 0.90), Point("b", 2.0, 0.95), Point("c", 3.0, 0.93), Point("d", 4.0, 0.97),
           Point("e", None, 0.99)]
    assert [p.name for p in pareto_front(pts)] == ["a", "b", "d"]


def test_rich_table():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(candidates_table(make_report()))
    text = console.export_text()
    assert "onnxruntime-int8 ★" in text and "0.9620" in text and "not measured: CUDAExecutionProvider" in text
    row = next(line for line in text.splitlines() if "onnxruntime-fp32" in line)
    assert "3.50" in row and "1.00×" in row and "10.00 MB" in row


def profile_json(path: Path, cpu: str, p50: float, p90: float, p99: float, thr: float) -> Path:
    b = bench(p50, 0.1)
    lat = {**b.to_dict(), "p50": p50, "p90": p90, "p99": p99, "throughput": thr}
    path.write_text(json.dumps({"schema_version": 1, "kind": "profile",
                                "bundle": {"name": "resnet_tiny", "target": "cpu-x86", "precision": "int8"},
                                "host": {"cpu": cpu}, "runtime": "onnxruntime", "device_used": "CPUExecutionProvider",
                                "latency": lat, "batch_sweep": []}), encoding="utf-8")
    return path


def test_compare_ratio_column(tmp_path):
    a = profile_json(tmp_path / "laptop.json", "Intel i7-1165G7", 2.0, 2.4, 3.0, 500.0)
    b = profile_json(tmp_path / "pi5.json", "Cortex-A76", 5.0, 6.0, 7.5, 200.0)
    md_path, html_path = compare_reports([a, b], tmp_path / "cmp")
    md = md_path.read_text(encoding="utf-8")
    assert ("| laptop.json · resnet_tiny/int8 · Intel i7-1165G7 · CPUExecutionProvider | 2.00 | 2.40 | 3.00 | 500.0 |"
            " 1.00× |") in md
    assert "| pi5.json · resnet_tiny/int8 · Cortex-A76 · CPUExecutionProvider | 5.00 | 6.00 | 7.50 | 200.0 | 2.50× |" in md
    html = html_path.read_text(encoding="utf-8")
    assert html.count("<svg") == 1 and html.count('class="whisker"') == 2 and "https://" not in html
    assert "(log scale)" in html and "dot p50, whisker to p90" in html  # p99 no longer dominates


def test_compare_with_a_report_and_bad_files(tmp_path):
    write_reports(make_report(), tmp_path / "run1")
    prof = profile_json(tmp_path / "p.json", "Cortex-A76", 2.5, 3.0, 3.5, 400.0)
    md = compare_reports([tmp_path / "run1" / "report.json", prof], tmp_path)[0].read_text(encoding="utf-8")
    assert "| report.json · onnxruntime-int8 · Intel(R) Xeon(R) Platinum 8375C · CPUExecutionProvider | 1.25 |" in md
    assert "| 400.0 | 2.00× |" in md
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(EdgepackError, match=r"bad\.json: not valid JSON"):
        compare_reports([bad], tmp_path)
    other = tmp_path / "other.json"
    other.write_text('{"kind": "manifest"}', encoding="utf-8")
    with pytest.raises(EdgepackError, match=r"other\.json: neither an edgepack report\.json nor a profile JSON"):
        compare_reports([other], tmp_path)
    nolat = tmp_path / "nolat.json"
    nolat.write_text('{"schema_version": 1, "kind": "profile", "latency": {"p50": "fast"}}', encoding="utf-8")
    with pytest.raises(EdgepackError, match=r"nolat\.json: latency\.p50 is missing or not a number"):
        compare_reports([nolat], tmp_path)
    with pytest.raises(EdgepackError, match=r"missing\.json(: cannot read| not found)"):
        compare_reports([tmp_path / "missing.json"], tmp_path)


def test_report_with_nothing_measured(tmp_path):
    r = replace(make_report(), candidates=(make_report().candidates[3],), chosen=None, baseline=None, op_profile=(),
                batch_sweep=(), warnings=(), extra={}, reason="every candidate failed")
    md, html = (p.read_text(encoding="utf-8") for p in write_reports(r, tmp_path)[1:])
    assert "No candidate chosen. Reason: every candidate failed" in md
    assert "- **Provider/device used:** none (nothing measured)" in md and "## Operator profile" not in md
    assert html.count("<svg") == 4 and "operator time not measured on this host" in html
    assert html.count("latency not measured on this host") == 2  # latency and trade-off plots say so


def test_zip_size_of_big_weights_is_sampled_within_2_percent():
    """Compressing every candidate's 30-70 MB of weights whole took 8-18 s of a pack; over 16 MiB it is sampled."""
    import zlib

    from edgepack.report.build import EXACT_BYTES, _packed

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, 6_000_000).astype(np.float32)
    w[rng.random(w.size) < 0.7] = 0  # a pruned layer: 70% zeros
    data = w.tobytes()
    assert len(data) > EXACT_BYTES
    assert abs(_packed(data) / len(zlib.compress(data, 6)) - 1) < 0.02
    small = data[: EXACT_BYTES // 4]
    assert _packed(small) == len(zlib.compress(small, 6))
