"""The benchmark scripts' own logic: target checks, summaries, the plain loop and child-process measurement."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import alternatives  # noqa: E402
import benchutil as common  # noqa: E402
import profile_accuracy  # noqa: E402


def _row(method, p50, within=True, candidate=None, ratio=1.0):
    return {"method": method, "p50_ms": p50, "within_budget": within, "candidate": candidate or method,
            "ratio_to_ort_fp32": ratio, "accuracy": 0.99, "top1_agreement": 1.0, "cosine": 0.9991}


def test_targets_compare_against_fastest_alternative_within_budget():
    models = {"resnet": {"labels": False, "pack_candidates": {}, "rows": [
        _row("ort-fp32", 10.0), _row("ov-nncf-int8", 3.0, within=False), _row("ov-fp32", 8.0),
        _row("edgepack", 8.2, candidate="ov-cpu-fp32", ratio=0.82)]}}
    out = {t["target"]: t for t in alternatives.check_targets(models, {"wall_s": 12.5, "peak_pss_mb": 290.0,
                                                               "peak_process_rss_mb": 280.0, "peak_rss_sum_mb": 450.0},
                                                               {"median_s": 0.31, "runs": 10})}
    best = out["resnet: chosen bundle <= 1.05x the best alternative within budget, and within budget itself"]
    assert best["pass"] is True  # 8.2 / 8.0 = 1.025; the faster int8 is outside the budget
    assert "vs best ov-fp32 8.0000 ms = 1.02x" in best["detail"]
    assert out["resnet: chosen bundle <= 0.30x ONNX Runtime fp32"]["pass"] is False
    assert out["edgepack pack (digits sample, no args) < 10 s"]["pass"] is False
    assert out["edgepack pack (digits sample, no args) < 400 MB peak"]["pass"] is True
    assert out["edgepack --help < 0.5 s"]["detail"] == "median 0.310 s of 10 runs"


def test_chosen_bundle_outside_budget_fails_even_when_fast():
    models = {"digits": {"labels": True, "pack_candidates": {}, "rows": [
        _row("ort-fp32", 1.0), _row("edgepack", 0.5, within=False)]}}
    (t,) = alternatives.check_targets(models, None, None)
    assert t["pass"] is False and "within budget: False" in t["detail"]


def test_within_uses_edgepack_rule():
    from edgepack.target import FidelityThresholds
    from edgepack.types import Fidelity

    th = FidelityThresholds()
    ref = Fidelity(n=10, top1_agreement=1.0, cosine=1.0, max_abs_diff=0.0, accuracy=0.90)
    assert alternatives.within(Fidelity(10, 1.0, 0.99, 0.1, 0.89), ref, True, th)       # 1 point lost
    assert not alternatives.within(Fidelity(10, 1.0, 0.99, 0.1, 0.885), ref, True, th)  # 1.5 points
    assert not alternatives.within(Fidelity(10, 1.0, 0.9985, 0.1, None), ref, False, th)
    assert alternatives.within(Fidelity(10, 0.99, 0.9991, 0.1, None), ref, False, th)


def test_profile_summary_and_verdicts():
    rounds = [{"edgepack": {"p50_ms": e}, "benchmark_app": {"median_ms": b}, "plain": {"median_ms": p}}
              for e, b, p in ((0.090, 0.060, 0.085), (0.100, 0.062, 0.095), (0.095, 0.061, 0.090))]
    data = {"bundles": {"digits-ov": {"rounds": rounds}, "digits-onnx": {"rounds": [
        {"edgepack": {"p50_ms": 0.050}, "plain": {"median_ms": 0.048}}] * 3}}}
    for b in data["bundles"].values():
        b["summary"] = profile_accuracy.summarize(b)
    s = data["bundles"]["digits-ov"]["summary"]
    assert s["edgepack_p50_ms"] == pytest.approx(0.095) and s["benchmark_app_ms"] == pytest.approx(0.061)
    assert s["vs_benchmark_app"] == pytest.approx(0.095 / 0.061 - 1)
    targets, notes = profile_accuracy.verdicts(data)
    # digits-ov: fails against benchmark_app (C++ timing), passes against a plain Python loop; digits-onnx passes
    assert [t["pass"] for t in targets] == [False, True, True]
    assert "+5.6%" in targets[1]["detail"] and "+4.2%" in targets[2]["detail"]
    assert "+34.0 µs per call off benchmark_app" in notes[0] and "+29.0 µs is the cost of call" in notes[0]
    assert s["range_ms"]["benchmark_app"] == [0.060, 0.062]
    assert not any("rounds vary" in n for n in notes)  # every tool's rounds within 20%


@pytest.mark.parametrize("line,ms", [("[ INFO ]    Median:        59.22 us", 0.05922),
                                     ("[ INFO ]    Median:        12.31 ms", 12.31)])
def test_benchmark_app_median_is_parsed_with_its_unit(line, ms):
    m = profile_accuracy._MEDIAN.search(line)
    assert float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0) == pytest.approx(ms)


def test_plain_loop_times_an_onnx_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(tmp_path / "in.npz", x=np.ones((5, 4), np.float32))
    r = subprocess.run([sys.executable, str(BENCH / "plain_loop.py"), "onnxruntime", str(model),
                        str(tmp_path / "in.npz"), "--time", "0.05"], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    assert out["iterations"] >= 20 and 0 < out["median_ms"] < 50
    assert out["settings"]["intra_op_num_threads"] == 2


def test_run_tracked_sees_peak_memory_of_child(tmp_path):
    code = "import time; b = bytearray(150 * 2**20); time.sleep(0.3)"
    r = common.run_tracked([sys.executable, "-c", code], cwd=tmp_path)
    assert r["returncode"] == 0
    assert r["peak_process_rss_mb"] >= 150 and r["peak_rss_sum_mb"] >= r["peak_process_rss_mb"]
    assert 150 <= r["peak_pss_mb"] <= r["peak_rss_sum_mb"] and r["wall_s"] >= 0.3


def test_resnet_is_resnet18_shaped():
    import resnet

    m = resnet.build()
    assert sum(p.numel() for p in m.parameters()) == 11_227_812
    x = resnet.images(2, 0)
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1.0 and 0.3 < float(x.std()) < 2.0


def test_md_table():
    assert common.md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_choice_agreement_pairs_each_pack_with_its_own_timers():
    """A host that runs 1.5x slower during the later packs moves all three timers alike: agreement is judged on
    each pack's run.py and plain p50 as ratios to its own pack p50, not on timers minutes apart."""
    import choice

    packs = [{"pack_p50": 1.0, "runpy": 1.05, "plain": 0.98}, {"pack_p50": 1.5, "runpy": 1.56, "plain": 1.47},
             {"pack_p50": 1.5, "runpy": 1.44, "plain": 1.53}, {"exit": 1, "pack_p50": None}]
    a = choice.agreement(packs)
    assert a["timed_packs"] == 3 and a["runpy_vs_pack"] == pytest.approx(1.04)
    assert a["plain_vs_pack"] == pytest.approx(0.98) and a["agreement"] == pytest.approx(1.04 / 0.98 - 1)
    assert a["host_drift"] == pytest.approx(1.56 / 1.05 - 1)  # run.py's own spread: the host, not the tool
    assert choice.agreement([{"exit": 1}]) == {}


def test_interleaved_alternates_blocks_and_lets_a_lone_loop_run_on():
    """Two functions: blocks alternate A B, B A, each after idle and settle runs (untimed); one alone: every call
    after the warm-up is timed, with no pause (a user's loop)."""
    calls = []
    fns = {"a": lambda f: calls.append(f), "b": lambda f: calls.append(f)}
    times = common.interleaved(fns, {"a": "a", "b": "b"}, blocks=4, budget_s=0.0)
    assert {k: len(v) for k, v in times.items()} == {"a": 12, "b": 12}  # 3 runs (the floor) x 4 blocks
    order = [c for i, c in enumerate(calls[6:]) if i == 0 or calls[6 + i - 1] != c]  # after 3 warm-up calls each
    assert order == ["a", "b", "a", "b", "a"] and len(calls) - 6 > 24 + 2 * 8  # b a then a b: the join merges
    calls.clear()
    alone = common.interleaved({"a": fns["a"]}, {"a": "a"}, blocks=4, budget_s=0.0)
    assert len(alone["a"]) == 12 and len(calls) == 3 + 12
