"""Every compression technique through the real CLI, with numbers: magnitude and structured pruning,
distillation, fp16, int4, the accuracy guard and recipes."""
from __future__ import annotations

import json
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, TRANSFORMER, run_cli

BENCH = ("--bench-time", "0.2")
EVAL = ("--eval", str(DIGITS / "eval.npz"))
FACTORY = (str(DIGITS / "model.py") + ":build", "--weights", str(DIGITS / "weights.pt"))


def _report(bundle: Path) -> dict:
    return json.loads((bundle / "report.json").read_text())


def _cand(report: dict, name: str) -> dict:
    return next(c for c in report["candidates"] if c["name"] == name)


def _pack_json(*args: str, **kw) -> dict:
    return json.loads(run_cli("pack", *args, *BENCH, "--json", **kw).stdout)


def _weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compression")


@pytest.fixture(scope="module")
def ort_target(work) -> Path:
    """cpu-x86 with ONNX Runtime only: the bundle then always holds model.onnx, so its zeros can be recounted."""
    path = work / "cpu-x86-ort.toml"
    path.write_text(textwrap.dedent("""\
        extends = "cpu-x86"
        precisions = ["int8", "int8-dynamic", "fp32"]

        [[runtimes]]
        runtime = "onnxruntime"
        provider = "CPUExecutionProvider"
        """))
    return path


@pytest.fixture(scope="module")
def dense(work, ort_target) -> Path:
    """The unpruned digits CNN, fp32 on ONNX Runtime: the baseline for archive size and for speed."""
    out = work / "dense"
    run_cli("pack", str(DIGITS / "model.onnx"), "--target", str(ort_target), "--precision", "fp32", *EVAL,
            "--out", str(out), "--archive", *BENCH)
    return out


@pytest.fixture(scope="module")
def sparse(work, ort_target) -> Path:
    out = work / "sparse"
    # 50% magnitude pruning without fine-tuning costs ~1.4 points on digits: allow 3
    run_cli("pack", str(DIGITS / "model.onnx"), "--target", str(ort_target), "--sparsity", "0.5", "--precision",
            "fp32", *EVAL, "--max-drop", "3", "--out", str(out), "--archive", *BENCH)
    return out


# --- 1. magnitude pruning ---------------------------------------------------------------------------

def _assert_recount(details: dict, bundle: Path) -> dict:
    from edgepack.steps.prune import count_sparsity

    recount = count_sparsity(bundle / "model.onnx")
    by_name = {x["name"]: x for x in recount["layers"]}
    pruned = [x for x in details["layers"] if x["pruned"]]
    assert pruned, details
    for layer in details["layers"]:
        got = by_name[layer["name"]]
        assert (got["zeros"], got["size"]) == (layer["zeros"], layer["size"]), layer["name"]
    zeros = sum(by_name[x["name"]]["zeros"] for x in pruned)
    size = sum(by_name[x["name"]]["size"] for x in pruned)
    assert zeros == details["zeros"] and size == details["size"]
    assert zeros / size == pytest.approx(details["overall_sparsity"], abs=1e-6)
    return recount


def test_sparsity_in_report_matches_the_bundle(sparse):
    rep = _report(sparse)
    details = rep["extra"]["prune"]
    assert details["overall_sparsity"] == pytest.approx(0.5, abs=0.001)
    _assert_recount(details, sparse)
    # first and last layers are skipped by default and stay dense
    assert {x["name"] for x in details["layers"] if not x["pruned"]} == set(details["skipped"]) and len(details["skipped"]) == 2
    assert "does not speed up dense kernels" in details["note"]
    step = _cand(rep, rep["chosen"])["steps"][0]
    assert step["kind"] == "prune" and step["changed"] and "no speed-up" in step["summary"]
    assert details["zlib_bytes_after"] < 0.8 * details["zlib_bytes_before"]


def test_sparsity_shrinks_the_archive(dense, sparse):
    small = sparse.with_name(sparse.name + ".tar.gz").stat().st_size
    big = dense.with_name(dense.name + ".tar.gz").stat().st_size
    print(f"archive: unpruned {big:,} B, 50% sparse {small:,} B ({small / big:.2f}x)")
    assert small < 0.8 * big
    # the archive holds the same kind of bundle: same files, only the model's weights differ
    with tarfile.open(sparse.with_name(sparse.name + ".tar.gz")) as a, tarfile.open(dense.with_name(dense.name + ".tar.gz")) as b:
        assert sorted(Path(m.name).name for m in a if m.isfile()) == sorted(Path(m.name).name for m in b if m.isfile())
    # and costs no more than the budget allowed
    rep = _report(sparse)
    acc = _cand(rep, rep["chosen"])["fidelity"]["accuracy"]
    assert rep["budget"]["reference_accuracy"] - acc <= 0.03


def test_threshold_pruning_saved_and_replayed_from_a_recipe(work, ort_target):
    recipe = work / "threshold.toml"
    flags = ("--target", str(ort_target), "--prune-threshold", "0.03", "--precision", "fp32", *EVAL)
    plan = _pack_json(str(DIGITS / "model.onnx"), *flags, "--save-recipe", str(recipe), "--dry-run")
    assert plan["recipe_saved"] == str(recipe)
    assert plan["shared_steps"][0]["kind"] == "prune" and plan["shared_steps"][0]["params"]["threshold"] == 0.03
    assert not (work / "threshold").exists()  # dry run: nothing written but the recipe
    replay_plan = _pack_json(str(DIGITS / "model.onnx"), "--recipe", str(recipe), *EVAL, "--dry-run")
    assert {k: replay_plan[k] for k in ("shared_steps", "candidates")} == {k: plan[k] for k in ("shared_steps", "candidates")}

    out = work / "threshold"
    res = _pack_json(str(DIGITS / "model.onnx"), "--recipe", str(recipe), *EVAL, "--max-drop", "3", "--out", str(out))
    rep = res["report"]
    assert [c["name"] for c in rep["candidates"]] == [c["name"] for c in plan["candidates"]]
    for c in rep["candidates"]:
        if c["name"] == "original":  # the model as given: no steps, measured for comparison only
            assert c["steps"] == [] and any("not shipped" in n for n in c["notes"])
            continue
        assert [s["kind"] for s in c["steps"]] == ["prune"] + [s["kind"] for s in next(
            p for p in plan["candidates"] if p["name"] == c["name"])["steps"]]
    details = rep["extra"]["prune"]
    assert details["threshold"] == 0.03 and 0.05 < details["overall_sparsity"] < 0.95
    _assert_recount(details, out)
    w = _weights(out / "model.onnx")
    for layer in (x for x in details["layers"] if x["pruned"]):
        a = np.abs(w[layer["name"]])
        assert a[a > 0].min() >= 0.03  # nothing below the threshold survived


def test_pruning_on_the_pytorch_path(work, ort_target):
    out = work / "torch-sparse"
    # per layer, 50% costs ~2.5 points on digits without fine-tuning
    rep = _pack_json(*FACTORY, "--target", str(ort_target), "--sparsity", "0.5", "--sparsity-scope", "per-layer",
                     "--precision", "fp32", *EVAL, "--max-drop", "5", "--out", str(out))["report"]
    from edgepack.steps.prune import count_sparsity

    details = rep["extra"]["prune"]
    assert details["scope"] == "per-layer" and details["skipped"] == ["classifier.weight", "features.1.weight"]
    for layer in details["layers"]:  # every pruned layer at 50% on its own, first and last dense
        assert layer["sparsity"] == (pytest.approx(0.5, abs=0.01) if layer["pruned"] else 0.0), layer
    assert [s["kind"] for s in _cand(rep, "ort-cpu-fp32")["steps"]][:2] == ["prune", "export-onnx"]
    # torch names (features.4.weight) differ from the exported ONNX names: match layers by order and shape.
    # Batch norm folds into the conv weights per channel, which keeps every zero a zero.
    recount = count_sparsity(out / "model.onnx")["layers"]
    assert [(x["shape"], x["zeros"]) for x in recount] == [(x["shape"], x["zeros"]) for x in details["layers"]]


def test_prune_all_layers_flag_reaches_the_step():
    plan = _pack_json(str(DIGITS / "model.onnx"), "--sparsity", "0.4", "--sparsity-scope", "per-layer",
                      "--prune-all-layers", "--precision", "fp32", "--dry-run")
    assert plan["shared_steps"] == [{"kind": "prune", "params": {"scope": "per-layer", "skip_first_last": False,
                                                                  "sparsity": 0.4}}]


# --- 2. structured pruning ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def structured(work, ort_target):
    """50% of channels removed, 3 epochs of fine-tuning, run as if in a terminal (Rich progress bar)."""
    out = work / "structured"
    p = run_cli("pack", *FACTORY, "--target", str(ort_target), "--structured-prune", "0.5", "--train",
                str(DIGITS / "train.npz"), *EVAL, "--epochs", "3", "--lr", "0.002", "--precision", "fp32",
                "--seed", "0", "--out", str(out), *BENCH, env={"TTY_COMPATIBLE": "1"})
    return out, p.stderr


def test_structured_pruning_is_faster_and_keeps_accuracy(structured, dense):
    from edgepack.bench import measure
    from edgepack.runtimes import open_session
    from edgepack.target import BenchSettings, RuntimeSpec
    from edgepack.types import Artifact, ModelFormat

    out, _ = structured
    rep, base = _report(out), _report(dense)
    assert rep["chosen"] == "ort-cpu-fp32"  # the pruned model: the unpruned original is measured, not shipped
    assert base["chosen"] in ("original", "ort-cpu-fp32")  # dense fp32: the model as given, or its optimized graph
    orig = _cand(rep, "original")
    assert orig["latency"] and orig["steps"] == []  # the unpruned model's latency, measured in the same run
    info = rep["extra"]["structured-prune"]
    assert info["params_after"] < 0.3 * info["params_before"]
    assert info["flops_after"] < 0.3 * info["flops_before"]
    assert info["accuracy_before"] == pytest.approx(base["budget"]["reference_accuracy"], abs=1e-6)
    assert info["accuracy_pruned"] < info["accuracy_finetuned"]  # fine-tuning repaired the pruned model
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    acc = _cand(rep, "ort-cpu-fp32")["fidelity"]["accuracy"]
    assert acc == pytest.approx(info["accuracy_finetuned"], abs=0.006)  # torch vs exported ONNX
    assert info["accuracy_before"] - acc <= 0.02

    # both bundles' models in one process, interleaved: a fair ratio on a noisy shared host
    spec = RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")
    sessions = {name: open_session(Artifact(path=b / "model.onnx", format=ModelFormat.ONNX, files=(b / "model.onnx",)),
                                   spec, threads=1) for name, b in (("dense", dense), ("pruned", out))}
    feeds = {"input": np.load(DIGITS / "eval.npz")["x"][:1]}
    res = measure(sessions, feeds, BenchSettings(time_budget_s=1.0, warmup=20, min_iterations=50), batch=1)
    speedup = res["dense"].p50 / res["pruned"].p50
    print(f"structured 50%: p50 {res['dense'].p50:.4f} -> {res['pruned'].p50:.4f} ms ({speedup:.2f}x), "
          f"accuracy {info['accuracy_before']:.4f} -> {acc:.4f}, params {info['params_before']} -> {info['params_after']}")
    assert speedup >= 1.3


def test_structured_pruning_shows_a_progress_bar(structured):
    import re

    _, stderr = structured
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", stderr)
    bars = [line for line in re.split(r"[\r\n]", text) if line.startswith("fine-tuning") and "━" in line]
    assert any(re.search(r"\b3/3\b", b) or re.search(r"\b2/3 loss \d+\.\d{4} eval acc 0\.\d{4}", b) for b in bars), bars[-3:]
    assert any(re.search(r"\b1/3 loss \d+\.\d{4} eval acc 0\.\d{4}", b) for b in bars), bars[-3:]


def test_structured_pruning_is_reproducible_with_a_seed(work, ort_target):
    d = np.load(DIGITS / "train.npz")
    small = work / "train-small.npz"
    np.savez(small, x=d["x"][:256], y=d["y"][:256])

    def run(name: str, seed: str) -> dict[str, np.ndarray]:
        out = work / name
        run_cli("pack", *FACTORY, "--target", str(ort_target), "--structured-prune", "0.5", "--train", str(small),
                "--epochs", "1", "--precision", "fp32", *EVAL, "--max-drop", "100", "--seed", seed, "--out", str(out),
                *BENCH)
        return _weights(out / "model.onnx")

    a, b, c = run("seed-a", "7"), run("seed-b", "7"), run("seed-c", "8")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # the seed is really used


# --- 3. distillation -------------------------------------------------------------------------------

def test_distilled_student_is_small_accurate_and_packable(work, ort_target):
    out = work / "student"
    info = json.loads(run_cli("distill", "--teacher", FACTORY[0], "--teacher-weights", FACTORY[2], "--student-width",
                              "0.45", "--train", str(DIGITS / "train.npz"), *EVAL, "--epochs", "3", "--lr", "0.003",
                              "--out", str(out), "--json").stdout)
    saved = json.loads((out / "distill.json").read_text())
    assert saved["student"]["parameters"] == info["student"]["parameters"]
    t, s = saved["teacher"], saved["student"]
    print(f"distill: teacher {t['parameters']} params acc {t['accuracy']:.4f} p50 {t['p50_ms']:.4f} ms; "
          f"student {s['parameters']} params acc {s['accuracy']:.4f} p50 {s['p50_ms']:.4f} ms")
    assert s["parameters"] <= t["parameters"] / 4 and saved["param_ratio"] == pytest.approx(s["parameters"] / t["parameters"], abs=1e-4)
    assert t["accuracy"] - s["accuracy"] <= 0.03
    assert t["p50_ms"] > 0 and s["p50_ms"] > 0
    assert (out / "model.pt2").is_file() and (out / "model.onnx").is_file()

    bundle = work / "student-bundle"
    rep = _pack_json(str(out / "model.pt2"), "--target", str(ort_target), "--precision", "fp32", *EVAL,
                     "--out", str(bundle))["report"]
    assert rep["model"]["format"] == "torch"
    acc = _cand(rep, rep["chosen"])["fidelity"]["accuracy"]
    assert rep["budget"]["reference_accuracy"] == pytest.approx(s["accuracy"], abs=0.003)
    assert t["accuracy"] - acc <= 0.03


# --- 4. fp16 and int4 -------------------------------------------------------------------------------

def test_fp16_weights_with_float32_io(work):
    import onnx
    from onnx import TensorProto

    from edgepack.target import load_target

    out = work / "fp16"
    rep = _pack_json(str(DIGITS / "model.onnx"), "--target", "nvidia-cuda", "--precision", "fp16", *EVAL,
                     "--out", str(out))["report"]
    assert rep["chosen"] == "ort-cuda-fp16"
    m = onnx.load(str(out / "model.onnx"))
    big = [t for t in m.graph.initializer if np.prod(t.dims) > 1]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in [*m.graph.input, *m.graph.output])
    fid = _cand(rep, "ort-cuda-fp16")["fidelity"]
    tol = load_target("nvidia-cuda").fidelity
    print(f"fp16: cosine {fid['cosine']:.6f}, top-1 agreement {fid['top1_agreement']:.4f}, max abs diff {fid['max_abs_diff']:.5f}")
    assert fid["cosine"] >= tol.min_cosine and fid["top1_agreement"] >= tol.min_top1_agreement
    assert rep["budget"]["reference_accuracy"] - fid["accuracy"] <= 0.01


@pytest.fixture(scope="module")
def int4_targets(work) -> tuple[Path, Path]:
    both = work / "cpu-x86-int4.toml"
    both.write_text('extends = "cpu-x86"\nprecisions = ["int4", "fp32"]\n')
    ort = work / "cpu-x86-int4-ort.toml"
    ort.write_text('extends = "cpu-x86-int4.toml"\n\n[[runtimes]]\nruntime = "onnxruntime"\n'
                   'provider = "CPUExecutionProvider"\n')
    return both, ort


def test_int4_matmulnbits_within_budget(work, int4_targets):
    import onnx

    both, ort = int4_targets
    out = work / "int4"
    rep = _pack_json(str(TRANSFORMER / "model.onnx"), "--target", str(ort), "--precision", "int4",
                     "--eval", str(TRANSFORMER / "eval.npz"), "--out", str(out))["report"]
    int4 = _cand(rep, "ort-cpu-int4")
    assert int4["status"] == "ok" and int4["within_budget"]
    assert rep["chosen"] in ("ort-cpu-int4", "original")  # int4 ships only where it is faster beyond noise
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node] if rep["chosen"] == "ort-cpu-int4" \
        else ["MatMulNBits"] * int4["steps"][-1]["details"]["matmul_nbits"]
    step = int4["steps"][-1]["details"]
    # every MatMul with a constant weight is 4-bit; the ones left multiply two activations (attention)
    assert ops.count("MatMulNBits") == step["matmul_nbits"] == step["eligible"] >= 10
    acc = _cand(rep, "ort-cpu-int4")["fidelity"]["accuracy"]
    print(f"int4: {ops.count('MatMulNBits')} MatMulNBits, accuracy {rep['budget']['reference_accuracy']:.4f} -> {acc:.4f}")
    assert rep["budget"]["reference_accuracy"] - acc <= 0.01

    # OpenVINO's int4 candidate too (NNCF adjusts the group size where 32 does not divide the channels)
    rep = _pack_json(str(TRANSFORMER / "model.onnx"), "--target", str(both), "--precision", "int4",
                     "--eval", str(TRANSFORMER / "eval.npz"), "--out", str(work / "int4-both"))["report"]
    ov = _cand(rep, "ov-cpu-int4")
    assert ov["status"] == "ok" and ov["within_budget"], ov.get("error")
    assert ov["steps"][-1]["kind"] == "nncf-int4" and ov["steps"][-1]["changed"]


def test_int4_on_a_cnn_says_nothing_to_change(work, int4_targets):
    _, ort = int4_targets
    rep = _pack_json(str(DIGITS / "model.onnx"), "--target", str(ort), *EVAL,
                     "--out", str(work / "int4-cnn"))["report"]
    cand = _cand(rep, "ort-cpu-int4")
    step = cand["steps"][-1]
    assert step["kind"] == "int4" and step["changed"] is False
    assert step["summary"].startswith("nothing to change") and "MatMul" in step["summary"]
    # an unchanged model is not kept as an "int4" candidate: it is reported as skipped, fp32 wins
    assert cand["status"] == "skipped" and "nothing to change" in cand["error"]
    assert rep["chosen"] in ("ort-cpu-fp32", "original")
    # asked for int4 alone: nothing to change, so the model as given ships, and the report says why
    p = run_cli("pack", str(DIGITS / "model.onnx"), "--target", str(ort), "--precision", "int4", *EVAL,
                "--out", str(work / "int4-only"), "--json", check=False)
    rep = json.loads(p.stdout)["report"]
    assert p.returncode == 0 and rep["chosen"] == "original"
    assert "nothing to change" in _cand(rep, "ort-cpu-int4")["error"]


# --- 5. accuracy guard ------------------------------------------------------------------------------

def _outlier_model(d: Path) -> None:
    """An MLP whose input feature 0 spans +-3000 (its weights are scaled down to match): per-tensor int8 of the
    input wipes out the other 15 features, so fc1 must stay float; fc2 and fc3 quantize fine."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [16, 64, 64, 10]
    ws = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32) for a, b in zip(dims[:-1], dims[1:])]
    ws[0][0, :] /= 1000
    nodes, x = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i + 1}"))
        x = f"h{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i + 1}"))
            x = f"r{i}"
    nodes[-1].output[0] = "logits"
    g = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(ws)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(d / "model.onnx"))

    def forward(a):
        for i, w in enumerate(ws):
            a = a @ w
            a = np.maximum(a, 0) if i < 2 else a
        return a

    for name, n, seed in (("calib", 128, 1), ("eval", 400, 2)):
        a = np.random.default_rng(seed).normal(0, 1, (4 * n, 16)).astype(np.float32)
        a[:, 0] *= 1000
        top2 = np.sort(forward(a), 1)[:, -2:]
        a = a[np.argsort(top2[:, 0] - top2[:, 1])[:n]]  # the clearest answers: labels with a margin
        np.savez(d / f"{name}.npz", x=a, y=forward(a).argmax(1).astype(np.int64))


def test_guard_keeps_the_outlier_layer_float(work):
    d = work / "outlier"
    d.mkdir()
    _outlier_model(d)
    rep = _pack_json(str(d / "model.onnx"), "--precision", "int8", "--guard", "--calib", str(d / "calib.npz"),
                     "--eval", str(d / "eval.npz"), "--out", str(d / "bundle"))["report"]
    ref = rep["budget"]["reference_accuracy"]
    plain, guarded = _cand(rep, "ort-cpu-int8"), _cand(rep, "ort-cpu-int8-guarded")
    assert ref == 1.0 and ref - plain["fidelity"]["accuracy"] > 0.2 and not plain["within_budget"]
    assert guarded["status"] == "ok" and guarded["within_budget"]
    assert ref - guarded["fidelity"]["accuracy"] <= 0.01
    g = rep["extra"]["guard"][0]
    print(f"guard: kept {g['kept_float']} float; accuracy {g['int8_accuracy']:.4f} -> {g['accuracy']:.4f}; "
          f"p50 {g['int8_p50_ms']} -> {g['p50_ms']} ms ({g['latency_cost_ms']:+.5f} ms)")
    assert g["candidate"] == "ort-cpu-int8-guarded" and g["kept_float"] == ["fc1"]
    assert g["latency_cost_ms"] == pytest.approx(g["p50_ms"] - g["int8_p50_ms"], abs=1e-6)
    noise = g["noise_db"]  # dB of SQNR each node loses: fc1's input range is all outlier, it loses the most by far
    assert noise["fc1"] > 10 + max(v for k, v in noise.items() if k != "fc1"), noise
    assert "fc1" in guarded["steps"][-1]["summary"]
    assert rep["chosen"] in {c["name"] for c in rep["candidates"] if c.get("within_budget")}
    assert "fc1" in (d / "bundle" / "report.md").read_text()


def test_the_guard_runs_while_openvino_builds_and_its_candidate_is_timed_with_the_others(work):
    """By default ONNX Runtime's int8 outside the budget is guarded in a process of its own while NNCF still
    builds (a core idles meanwhile): its candidate is timed in the first round, and no guard is left to run."""
    d = work / "outlier-early"
    d.mkdir()
    _outlier_model(d)
    for _ in range(3):  # the early guard is used only when done in time: on a loaded host it may be stopped
        p = run_cli("pack", str(d / "model.onnx"), "--calib", str(d / "calib.npz"), "--eval", str(d / "eval.npz"),
                    "--out", str(d / "bundle"), "--force", *BENCH, "--json", "-v", isolated=True)
        if "early guard of ort-cpu-int8: ort-cpu-int8-guarded" in p.stderr:
            break
    assert "early guard of ort-cpu-int8: ort-cpu-int8-guarded" in p.stderr, p.stderr[-3000:]
    rep = json.loads(p.stdout)["report"]
    guarded = _cand(rep, "ort-cpu-int8-guarded")
    assert guarded["within_budget"] and "fc1" in guarded["steps"][-1]["summary"]
    first = {c["name"]: c["latency"]["block_rounds"][0] for c in rep["candidates"] if c.get("latency")}
    assert first["ort-cpu-int8-guarded"] == first["original"] == min(first.values())  # in the first round
    assert "build ort-cpu-int8-guarded" not in p.stderr  # not guarded again in this process
    assert [c["name"] for c in rep["candidates"]].count("ort-cpu-int8-guarded") == 1
    assert not [f for f in (d / "bundle").rglob("*") if "guarded" in f.name]  # (no work files in the bundle)


# --- 6. early failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("model,extra,expect", [
    ((str(DIGITS / "model.onnx"),), ("--train", str(DIGITS / "train.npz")), "model.py:build --weights"),
    (FACTORY, (), "pass --train"),
])
def test_structured_prune_fails_early_with_what_to_pass(work, model, extra, expect):
    out = work / "never"
    p = run_cli("pack", *model, "--structured-prune", "0.5", *extra, *EVAL, "--out", str(out), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: step 'structured-prune'") and expect in lines[0]
    assert not out.exists()
