"""Data of any layout and task-aware budgets: rank-0 inputs, a state whose batch axis is 1, a time-major output,
a detector whose scores collapse while its boxes stay close, embeddings, checkpoints with `model_state`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.data import Dataset, batch_axes, load_dataset, output_axes
from edgepack.errors import DataError
from edgepack.fidelity import compare, guess_kinds, run_dataset
from edgepack.runtimes import open_session, reference_spec
from edgepack.target import FidelityThresholds
from edgepack.types import Artifact, ModelFormat, TensorSpec

RNG = np.random.default_rng(0)
T = FidelityThresholds()


def _save(path: Path, nodes, inputs, outputs, inits=()) -> Artifact:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return Artifact(path, ModelFormat.ONNX, (path,))


def rank0_model(path: Path) -> Artifact:
    """y = x * scale, with scale a rank-0 input (a sample rate, a gain)."""
    return _save(path, [helper.make_node("Mul", ["x", "scale"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                  helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])


def state_model(path: Path) -> Artifact:
    """A recurrent-style cell: state [2, batch, 4] (batch on axis 1) and a time-major output [3, batch, 4]."""
    w = numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
             helper.make_node("Add", ["h", "s"], ["y0"]),
             helper.make_node("Unsqueeze", ["y0", "axes0"], ["y1"]),
             helper.make_node("Concat", ["y1", "y1", "y1"], ["seq"], axis=0),
             helper.make_node("Concat", ["y1", "y1"], ["state_out"], axis=0)]
    axes0 = numpy_helper.from_array(np.array([0], np.int64), "axes0")
    return _save(path, nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                  helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4])],
                 [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [3, "batch", 4]),
                  helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 4])], [w, axes0])


def test_batch_axes_from_symbolic_dims_and_overrides():
    specs = [TensorSpec("x", "float32", ("batch", 8)), TensorSpec("state", "float32", (2, "batch", 4)),
             TensorSpec("sr", "int64", ())]
    assert batch_axes(specs) == {"x": 0, "state": 1, "sr": None}
    assert batch_axes(specs, {"state": -2}) == {"x": 0, "state": 1, "sr": None}
    with pytest.raises(DataError, match="--batch-axis names no input h0"):
        batch_axes(specs, {"h0": 1})
    outs = [TensorSpec("seq", "float32", (3, "batch", 4)), TensorSpec("mos", "float32", ())]
    assert output_axes(outs, specs) == {"seq": 1, "mos": None}


def test_rank0_input_is_one_value_for_all_samples(tmp_path):
    art = rank0_model(tmp_path / "m.onnx")
    specs = [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("scale", "float32", ())]
    x = RNG.standard_normal((10, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, scale=np.float32(3.0))
    ds = load_dataset(tmp_path / "d.npz", specs, kind="calib")
    assert len(ds) == 10 and ds.axes == {"x": 0, "scale": None}
    batches = list(ds.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2] and all(b["scale"].shape == () for b in batches)
    s = open_session(art, reference_spec(), threads=1)
    (y,) = run_dataset(s, ds, 4)
    np.testing.assert_allclose(y, 3.0 * x, rtol=1e-6)


def test_state_on_axis_1_and_time_major_output(tmp_path):
    art = state_model(tmp_path / "m.onnx")
    specs = [TensorSpec("x", "float32", ("batch", 8)), TensorSpec("state", "float32", (2, "batch", 4))]
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    state = RNG.standard_normal((2, 6, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, state=state)
    ds = load_dataset(tmp_path / "d.npz", specs, kind="calib")
    assert len(ds) == 6 and ds.axes == {"x": 0, "state": 1}
    assert [b["state"].shape for b in ds.batches(4)] == [(2, 4, 4), (2, 2, 4)]
    s = open_session(art, reference_spec(), threads=1)
    seq, st = run_dataset(s, ds, 4, {0: 1, 1: 1})
    assert seq.shape == (3, 6, 4) and st.shape == (2, 6, 4)  # joined on their own batch axis
    np.testing.assert_allclose(seq[0], x @ numpy_helper.to_array(onnx.load(art.path).graph.initializer[0])
                               + state.sum(0), rtol=1e-5, atol=1e-5)
    # one start state for all samples: repeated per sample
    np.savez(tmp_path / "one.npz", x=x, state=state[:, :1])
    assert load_dataset(tmp_path / "one.npz", specs, kind="calib").inputs["state"].shape == (2, 6, 4)


def test_state_model_packs_and_bundle_selftest_passes(tmp_path):
    from edgepack import api
    from edgepack.recipe import Recipe

    art = state_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((24, 8)).astype(np.float32),
             state=RNG.standard_normal((2, 24, 4)).astype(np.float32))
    r = api.pack(art.path, target="cpu-x86", out=tmp_path / "b", calib=tmp_path / "calib.npz",
                 recipe=Recipe(precisions=("int8-dynamic", "fp32"), bench_time_s=0.05))
    m = json.loads((r.bundle / "manifest.json").read_text())
    assert [i["batch_axis"] for i in m["inputs"]] == [0, 1] and [o["batch_axis"] for o in m["outputs"]] == [1, 1]
    with np.load(r.bundle / "reference" / "outputs.npz") as z:
        assert z["seq"].shape[1] == z["state_out"].shape[1] == 16  # cut on the batch axis, not axis 0
    kinds = {o["output"]: o["kind"] for o in r.report.budget["outputs"]}
    assert kinds == {"seq": "sequence", "state_out": "regression"}


def test_collapsed_detector_scores_fail_while_boxes_stay_close():
    n, anchors, classes = 8, 50, 3
    boxes = RNG.uniform(0, 640, (n, anchors, 4)).astype(np.float32)
    scores = RNG.uniform(0, 0.05, (n, anchors, classes)).astype(np.float32)
    scores[:, :5, 0] = 0.62  # five detections per image
    names, axes = ["boxes", "scores"], [0, 0]
    kinds = guess_kinds(names, [boxes, scores], axes)
    assert kinds == ["boxes", "detection"]
    collapsed = scores * 0.2  # max score 0.62 -> 0.12: every detection lost
    f = compare([boxes, scores], [boxes + 0.5, collapsed], names=names, kinds=kinds, axes=axes, thresholds=T)
    assert f.cosine > 0.999  # pixel coordinates drown the scores in one flattened cosine ...
    det = next(r for r in f.outputs if r["output"] == "scores")
    assert det["kind"] == "detection" and det["value"] == 0.0 and not det["passed"]  # ... not per output
    good = compare([boxes, scores], [boxes + 0.5, scores + 0.01], names=names, kinds=kinds, axes=axes, thresholds=T)
    det = next(r for r in good.outputs if r["output"] == "scores")
    assert det["passed"] and det["value"] == 1.0 and det["box_iou"] > 0.95


def test_embeddings_are_judged_by_cosine_and_neighbours_not_argmax():
    centres = RNG.standard_normal((5, 384))
    e = (np.repeat(centres, 4, axis=0) + 0.3 * RNG.standard_normal((20, 384))).astype(np.float32)  # 5 topics
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert guess_kinds(["sentence_embedding"], [e], [0]) == ["embedding"]
    noisy = e + 0.003 * RNG.standard_normal(e.shape).astype(np.float32)
    f = compare([e], [noisy], names=["sentence_embedding"], kinds=["embedding"], axes=[0], thresholds=T)
    row = f.outputs[0]
    assert row["metric"] == "cosine per sample" and row["value"] > 0.99 and row["nn_agreement"] == 1.0 and row["passed"]
    shuffled = compare([e], [e[::-1].copy()], names=["e"], kinds=["embedding"], axes=[0], thresholds=T)
    assert not shuffled.outputs[0]["passed"]


def test_dense_detector_heads_are_not_sequences():
    """PicoDet-style heads: per stride, class scores (N, A, 11) and box distributions (N, A, 32) over the same
    anchors; a CTC model has one (N, T, C) output."""
    outs = [RNG.random((2, 475, 11)).astype(np.float32), RNG.random((2, 119, 11)).astype(np.float32),
            RNG.standard_normal((2, 475, 32)).astype(np.float32), RNG.standard_normal((2, 119, 32)).astype(np.float32)]
    kinds = guess_kinds(["s8", "s16", "b8", "b16"], outs, [0, 0, 0, 0])
    assert kinds == ["detection", "detection", "regression", "regression"]
    assert guess_kinds(["logits"], [outs[0]], [0]) == ["sequence"]

def test_ctc_sequences_and_time_major():
    logits = RNG.standard_normal((20, 4, 37)).astype(np.float32)  # (T, N, C)
    kinds = guess_kinds(["output"], [logits], [1])
    assert kinds == ["sequence"]
    same = compare([logits], [logits + 1e-4], names=["output"], kinds=kinds, axes=[1], thresholds=T)
    assert same.outputs[0]["value"] == 1.0 and same.n == 4
    broken = logits.copy()
    broken[3, 2] = -broken[3, 2]  # one step of one sample decodes differently
    f = compare([logits], [broken], names=["output"], kinds=kinds, axes=[1], thresholds=T)
    assert f.outputs[0]["value"] == pytest.approx(0.75) and not f.outputs[0]["passed"]


def test_metric_overrides_are_checked():
    with pytest.raises(DataError, match="--metric names no output boxes"):
        guess_kinds(["y"], [np.zeros((2, 3))], [0], overrides={"boxes": "detection"})
    with pytest.raises(DataError, match="--metric kind colour is unknown"):
        guess_kinds(["y"], [np.zeros((2, 3))], [0], overrides={"y": "colour"})
    assert guess_kinds(["y"], [np.zeros((2, 3))], [0], overrides={"y": "ignore"}) == ["ignore"]


def test_checkpoint_with_model_state(tmp_path):
    torch = pytest.importorskip("torch")
    from edgepack.model.load import load_model

    (tmp_path / "net.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n\n"
                                     "def example_inputs():\n    return torch.zeros(1, 4)\n")
    net = torch.nn.Linear(4, 2)
    torch.save({"epoch": 3, "model_state": net.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    art = load_model(f"{tmp_path / 'net.py'}:build", weights=tmp_path / "ckpt.pt")
    assert torch.equal(art.module.weight, net.weight)


def test_dataset_take_keeps_constant_inputs():
    ds = Dataset({"x": np.zeros((5, 2)), "sr": np.array(16000)}, None, "mem", {"x": 0, "sr": None})
    sub = ds.take(2)
    assert sub.inputs["x"].shape == (2, 2) and sub.inputs["sr"].shape == () and len(sub) == 2


def _head(tmp_path, tail: list, width: int, extra_inits=()) -> dict[str, str]:
    """x (N, 8) -> MatMul -> ``tail`` nodes -> y; the output roles of that graph."""
    from edgepack.model.onnx import output_roles

    w = numpy_helper.from_array(RNG.standard_normal((8, width)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), *tail]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], [w, *extra_inits])
    return output_roles(helper.make_model(g))


def test_output_roles_pick_the_metric(tmp_path):
    """A 2-value MOS head (sigmoid * 4 + 1, aecmos) and a 3-value linear head (dnsmos) are scores, not classes;
    a mean-pooled 384-d vector (MiniLM) is an embedding, not 384 classes; a softmax is classes."""
    c = [numpy_helper.from_array(np.array(4.0, np.float32), "four"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    mos = _head(tmp_path, [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["s", "four"], ["m"]),
                           helper.make_node("Add", ["m", "one"], ["y"])], 2, c)
    assert mos == {"y": "scaled-sigmoid"}
    assert _head(tmp_path, [helper.make_node("Identity", ["h"], ["y"])], 3) == {"y": "linear"}
    assert _head(tmp_path, [helper.make_node("Softmax", ["h"], ["y"])], 10) == {"y": "softmax"}
    pooled = _head(tmp_path, [helper.make_node("ReduceL2", ["h"], ["n"], keepdims=1),
                              helper.make_node("Div", ["h", "n"], ["y"])], 384)
    assert pooled == {"y": "pooled"}
    scores, logits = RNG.uniform(1, 5, (12, 2)), RNG.standard_normal((12, 10))
    emb = RNG.standard_normal((12, 384))
    assert guess_kinds(["output"], [scores], [0], roles={"output": "scaled-sigmoid"}) == ["regression"]
    assert guess_kinds(["Identity:0"], [scores], [0], roles={"Identity:0": "linear"}) == ["regression"]
    assert guess_kinds(["461"], [emb], [0], roles={"461": "pooled"}) == ["embedding"]
    assert guess_kinds(["y"], [logits], [0], roles={"y": "linear"}) == ["classes"]
    assert guess_kinds(["pitch"], [RNG.uniform(80, 400, (12, 100))], [0], roles={"pitch": "Exp"}) == ["regression"]
    assert guess_kinds(["output"], [scores], [0]) == ["classes"]  # without the graph: shape alone


def test_scores_are_judged_by_their_worst_error_about_their_spread():
    """aecmos: int8 moved one MOS by 0.17 on a 1-5 scale; the SQNR over all values (25 dB about the mean)
    passed. A handful of scores per sample is also judged by its worst error against the scores' spread."""
    ref = RNG.uniform(1.5, 4.5, (12, 2))
    close = ref + RNG.normal(0, 0.01, ref.shape)
    off = ref.copy()
    off[3, 1] += 0.17
    f = compare([ref], [close], names=["mos"], kinds=["regression"], axes=[0], thresholds=T)
    assert f.outputs[0]["passed"] and f.outputs[0]["worst_db"] > 20
    f = compare([ref], [off], names=["mos"], kinds=["regression"], axes=[0], thresholds=T)
    row = f.outputs[0]
    assert row["value"] >= 20 and row["worst_db"] < 20 and not row["passed"]
    assert row["metric"] == "SQNR dB (and worst error dB)" and row["worst_threshold"] == 20
    from edgepack.choice import _row_text

    assert _row_text(row).startswith(f"mos SQNR dB (and worst error dB) {row['value']:.4g} ≥ 20, worst ")
    offset = compare([ref], [ref + 0.2], names=["mos"], kinds=["regression"], axes=[0], thresholds=T)
    assert offset.outputs[0]["value"] < 20  # an offset of 0.2 on values 3 +- 0.9 is not 24 dB of fidelity


def test_a_gated_output_is_judged_where_its_gate_says_so():
    """swift-f0: a pitch per frame is meaningful only where the voicing confidence says voiced. Its int8 kept
    99.9% of voiced frames within 50 cents, yet the SQNR over all frames (unvoiced ones hold any pitch) read
    10 dB. `--metric pitch=regression@confidence` judges the pitch on the frames the original calls voiced."""
    from edgepack.fidelity import check_gates, gates_of
    from edgepack.recipe import recipe_from_flags

    conf = RNG.uniform(0, 1, (8, 200))
    pitch = RNG.uniform(100, 400, conf.shape)
    voiced = conf >= 0.7
    got = np.where(voiced, pitch * 1.01, RNG.uniform(50, 1000, conf.shape))  # voiced: 17 cents off; else any
    names, kinds = ["pitch", "confidence"], ["regression", "regression"]
    plain = compare([pitch, conf], [got, conf], names=names, kinds=kinds, axes=[0, 0], thresholds=T)
    assert not plain.outputs[0]["passed"] and plain.outputs[0]["value"] < 10
    flags = recipe_from_flags(None, metric=["pitch=regression@confidence>=0.7"])
    assert flags.metrics == {"pitch": "regression@confidence>=0.7"}
    gates = gates_of(names, flags.metrics)
    assert gates == {0: (1, 0.7)} and guess_kinds(names, [pitch, conf], [0, 0], overrides=flags.metrics)[0] == "regression"
    f = compare([pitch, conf], [got, conf], names=names, kinds=kinds, axes=[0, 0], thresholds=T, gates=gates)
    row = f.outputs[0]
    assert row["passed"] and row["value"] > 30 and row["metric"] == "SQNR dB where confidence >= 0.7"
    assert row["gated_values"] == voiced.sum() and row["values"] == conf.size
    assert gates_of(names, {"pitch": "regression@confidence"}) == {0: (1, 0.5)}  # the default threshold
    with pytest.raises(DataError, match="only a regression output can be gated"):
        gates_of(names, {"pitch": "classes@confidence"})
    with pytest.raises(DataError, match="the gate 'voicing' is not another output of the model"):
        gates_of(names, {"pitch": "regression@voicing"})
    with pytest.raises(DataError, match="has no number after '>='"):
        gates_of(names, {"pitch": "regression@confidence>=high"})
    with pytest.raises(DataError, match="no gate output after '@'"):
        gates_of(names, {"pitch": "regression@"})
    with pytest.raises(DataError, match="--metric kind regresion is unknown"):
        guess_kinds(names, [pitch, conf], [0, 0], overrides={"pitch": "regresion@confidence"})
    with pytest.raises(DataError, match="the original's confidence reaches 70 nowhere"):  # a percent for a 0-1 mark
        check_gates(names, [pitch, conf], [0, 0], gates_of(names, {"pitch": "regression@confidence>=70"}))
    nan_unvoiced = np.where(voiced, got, np.nan)  # NaN where the gate does not look: judged as before
    f = compare([pitch, conf], [nan_unvoiced, conf], names=names, kinds=kinds, axes=[0, 0], thresholds=T, gates=gates)
    assert f.outputs[0]["passed"] and f.outputs[0]["value"] == row["value"]
    nan_voiced = got.copy()
    nan_voiced[voiced.nonzero()[0][0], voiced.nonzero()[1][0]] = np.nan
    f = compare([pitch, conf], [nan_voiced, conf], names=names, kinds=kinds, axes=[0, 0], thresholds=T, gates=gates)
    assert f.outputs[0]["metric"] == "finite values" and not f.outputs[0]["passed"]
    flags = recipe_from_flags(None, metric=["a=b@c=regression@confidence", "x@1=classes"], batch_axis=["in@0=1"])
    assert flags.metrics == {"a=b@c": "regression@confidence", "x@1": "classes"} and flags.batch_axes == {"in@0": 1}
    with pytest.raises(DataError, match=r"the gate output confidence has shape \(3,\) per sample"):
        compare([pitch, conf[:, :3]], [got, conf[:, :3]], names=names, kinds=kinds, axes=[0, 0], thresholds=T,
                gates=gates)
