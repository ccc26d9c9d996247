"""fidelity: running data sets through real sessions, and the comparison numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import DataError
from edgepack.fidelity import compare, run_dataset
from edgepack.runtimes import open_session
from edgepack.target import RuntimeSpec
from edgepack.types import Artifact, ModelFormat

ORT_CPU = RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider")
OV_F32 = RuntimeSpec(runtime="openvino", device="CPU", inference_precision="f32")
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((32, 64)).astype(np.float32)
W2 = RNG.standard_normal((64, 10)).astype(np.float32)


def numpy_model(x):
    return np.maximum(x @ W1, 0) @ W2


def save_model(path: Path, batch="N") -> Artifact:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["scores"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return Artifact(path, ModelFormat.ONNX, (path,))


class Data:
    """The Dataset shape of data.py (inputs by name, axis 0 = samples)."""

    def __init__(self, inputs, source="test"):
        self.inputs, self.source = inputs, source

    def batches(self, n):
        total = len(next(iter(self.inputs.values())))
        for i in range(0, total, n):
            yield {k: v[i:i + n] for k, v in self.inputs.items()}


X = RNG.standard_normal((10, 32)).astype(np.float32)


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_run_dataset_dynamic_batch(tmp_path, spec):
    s = open_session(save_model(tmp_path / "m.onnx"), spec, threads=1)
    (y,) = run_dataset(s, Data({"x": X}), batch_size=4)
    assert y.shape == (10, 10)
    np.testing.assert_allclose(y, numpy_model(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [ORT_CPU, OV_F32], ids=["ort", "ov"])
def test_run_dataset_fixed_batch_pads_and_trims(tmp_path, spec):
    s = open_session(save_model(tmp_path / "s.onnx", batch=4), spec, threads=1)
    assert s.fixed_batch == 4
    (y,) = run_dataset(s, Data({"x": X}), batch_size=32)  # 10 samples: 4 + 4 + 2 padded to 4
    assert y.shape == (10, 10)
    np.testing.assert_allclose(y, numpy_model(X), rtol=1e-4, atol=1e-4)


def test_run_dataset_empty(tmp_path):
    s = open_session(save_model(tmp_path / "m.onnx"), ORT_CPU, threads=1)
    with pytest.raises(DataError, match="dataset empty.npz has no samples"):
        run_dataset(s, Data({"x": X[:0]}, source="empty.npz"), batch_size=4)


def test_compare_numbers():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [0.0, 0.0, 1.0]])
    same = compare([ref], [ref.copy()], labels=[0, 1, 2, 0])
    assert (same.n, same.top1_agreement, same.cosine, same.max_abs_diff, same.accuracy) == (4, 1.0, 1.0, 0.0, 0.75)
    out = ref.copy()
    out[3] = [2.0, 0.0, 1.0]  # the last sample's argmax flips from 2 to 0
    f = compare([ref], [out], labels=[0, 1, 2, 0])
    assert f.top1_agreement == 0.75 and f.accuracy == 1.0 and f.max_abs_diff == 2.0
    a, b = ref.ravel(), out.ravel()
    assert f.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    # Several outputs: cosine over all of them flattened together; a non-(N, classes) output has no top-1.
    g = compare([np.ones((4, 2, 2)), np.ones(4)], [np.ones((4, 2, 2)), -np.ones(4)])
    assert g.top1_agreement is None and g.accuracy is None and g.n == 4
    assert g.cosine == pytest.approx((16 - 4) / 20) and g.max_abs_diff == 2.0


def test_compare_errors_and_nan():
    ref = np.zeros((2, 3))
    with pytest.raises(DataError, match=r"output 0 has shape \(2, 4\) but the reference has \(2, 3\)"):
        compare([ref], [np.zeros((2, 4))])
    with pytest.raises(DataError, match="candidate has 2 outputs but the reference has 1"):
        compare([ref], [ref, ref])
    with pytest.raises(DataError, match=r"labels were given but the first output has shape \(2,\)"):
        compare([np.zeros(2)], [np.zeros(2)], labels=[0, 1])
    with pytest.raises(DataError, match="3 labels for 2 samples"):
        compare([ref], [ref], labels=[0, 1, 2])
    bad = compare([np.ones((2, 3))], [np.array([[np.nan, 1, 1], [1, 1, 1]])])
    assert bad.cosine == 0.0 and bad.max_abs_diff == float("inf")


def test_real_int8_candidate_against_fp32(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    art = save_model(tmp_path / "m.onnx")
    quantize_dynamic(str(art.path), str(tmp_path / "q.onnx"))
    x = RNG.standard_normal((200, 32)).astype(np.float32)
    ref = run_dataset(open_session(art, ORT_CPU, threads=1), Data({"x": x}), 64)
    q = run_dataset(open_session(Artifact(tmp_path / "q.onnx", ModelFormat.ONNX), ORT_CPU, threads=1),
                    Data({"x": x}), 64)
    labels = np.argmax(numpy_model(x), axis=1)
    f = compare(ref, q, labels)
    assert f.n == 200 and 0.9 <= f.top1_agreement < 1.0 + 1e-9 and f.accuracy == f.top1_agreement
    assert 0.99 < f.cosine < 1.0 and 0.0 < f.max_abs_diff < 5.0


def test_a_labelled_budget_finer_than_one_sample_is_warned_about():
    """48 labels and a 1-point budget: one flip (2.08 points) breaks it, so pack says how many labels it needs."""
    from edgepack.choice import plan_warnings
    from edgepack.recipe import Plan
    from edgepack.scoring import Scoring
    from edgepack.target import load_target

    tgt = load_target("cpu-x86")
    labelled = Scoring(None, [], np.zeros(48, np.int64), 1.0, 0.01, tgt.fidelity)
    plan = Plan(target=tgt, recipe=None, shared=(), candidates=())
    (warning,) = plan_warnings(plan, [], None, "", tgt, labelled)
    assert warning.startswith("the accuracy budget (1 point) is finer than one of the 48 labelled samples "
                              "(2.08 points each)") and "pass at least 100 labelled samples" in warning
    assert Scoring(None, [], np.zeros(100, np.int64), 1.0, 0.01, tgt.fidelity).coarse_budget() is None
    assert Scoring(None, [], None, None, 0.01, tgt.fidelity).coarse_budget() is None  # fidelity: no labels
    assert Scoring(None, [], np.zeros(48, np.int64), 1.0, 0.0, tgt.fidelity).coarse_budget() is None  # no drop at all
