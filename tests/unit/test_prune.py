"""Magnitude pruning on hand-built ONNX graphs (initializer + Constant weights) and torch modules."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import StepError
from edgepack.steps import Context, get_step, make_config
from edgepack.steps.prune import count_sparsity, prune
from edgepack.target import RuntimeSpec, Target
from edgepack.types import Artifact, ModelFormat

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(8, 1, 3, 3)).astype(np.float32)  # initializer
W2 = RNG.normal(size=(8, 8, 3, 3)).astype(np.float32)  # Constant node
W3 = RNG.normal(size=(512, 10)).astype(np.float32)  # initializer (MatMul)
B1 = RNG.normal(size=(8,)).astype(np.float32)  # bias: never pruned


def _model(path: Path, external: bool = False) -> Path:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(W2, "w2")),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"), numpy_helper.from_array(W3, "w3")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _ctx(tmp_path) -> Context:
    target = Target(name="t", description="test", precisions=("fp32",),
                    runtimes=(RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider"),))
    return Context(workdir=tmp_path / "work", target=target)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _onnx_artifact(path: Path) -> Artifact:
    return Artifact(path=path, format=ModelFormat.ONNX, files=(path,), metadata={"k": "v"})


def test_threshold_zeroes_exactly_below_t_in_initializer_and_constant(tmp_path):
    src = _model(tmp_path / "m.onnx")
    cfg = make_config("prune", {"threshold": 0.5, "skip_first_last": False})
    new, rec = prune(_onnx_artifact(src), cfg, _ctx(tmp_path))
    assert new.path.name == "model.onnx" and new.path.parent.parent == tmp_path / "work"
    assert new.metadata == {"k": "v"}
    got = _arrays(new.path)
    for name, w in (("w1", W1), ("w2", W2), ("w3", W3)):
        np.testing.assert_array_equal(got[name], np.where(np.abs(w) < 0.5, 0.0, w))
    np.testing.assert_array_equal(got["b1"], B1)  # bias untouched
    layers = {x["name"]: x for x in rec.details["layers"]}
    assert set(layers) == {"w1", "w2", "w3"}
    assert layers["w2"]["zeros"] == int((np.abs(W2) < 0.5).sum())
    assert rec.details["threshold"] == 0.5 and "shrinks the compressed archive" in rec.details["note"]
    assert rec.changed and "3 of 3" in rec.summary
    # the input file is unchanged and the pruned model still runs
    np.testing.assert_array_equal(_arrays(src)["w1"], W1)
    x = RNG.normal(size=(2, 1, 8, 8)).astype(np.float32)
    assert _run(new.path, x).shape == (2, 10)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_sparsity_target_hit_within_one_percent(tmp_path, scope):
    src = _model(tmp_path / "m.onnx")
    cfg = make_config("prune", {"sparsity": 0.6, "scope": scope, "skip_first_last": False})
    new, rec = prune(_onnx_artifact(src), cfg, _ctx(tmp_path))
    assert abs(rec.details["overall_sparsity"] - 0.6) < 0.01
    got = _arrays(new.path)
    total = sum(int((got[n] == 0).sum()) for n in ("w1", "w2", "w3"))
    assert abs(total / (W1.size + W2.size + W3.size) - 0.6) < 0.01
    if scope == "per-layer":
        for x in rec.details["layers"]:
            assert abs(x["sparsity"] - 0.6) < 0.01, x
        assert rec.details["threshold"] is None
    else:  # one threshold: the smallest kept magnitude is >= t, the largest zeroed < t
        t = rec.details["threshold"]
        for n, w in (("w1", W1), ("w2", W2), ("w3", W3)):
            np.testing.assert_array_equal(got[n], np.where(np.abs(w) < t, 0.0, w))


def test_skip_first_last_and_recount(tmp_path):
    src = _model(tmp_path / "m.onnx")
    cfg = make_config("prune", {"sparsity": 0.5})  # skip_first_last defaults to True
    new, rec = prune(_onnx_artifact(src), cfg, _ctx(tmp_path))
    got = _arrays(new.path)
    np.testing.assert_array_equal(got["w1"], W1)
    np.testing.assert_array_equal(got["w3"], W3)
    assert rec.details["skipped"] == ["w1", "w3"]
    assert abs(float((got["w2"] == 0).mean()) - 0.5) < 0.01
    counted = {x["name"]: x for x in count_sparsity(new.path)["layers"]}
    for x in rec.details["layers"]:
        assert counted[x["name"]]["zeros"] == x["zeros"] and counted[x["name"]]["size"] == x["size"]
    assert counted["w2"]["sparsity"] == pytest.approx(rec.details["overall_sparsity"])


def test_min_size_and_nothing_to_change(tmp_path):
    src = _model(tmp_path / "m.onnx")
    cfg = make_config("prune", {"threshold": 0.1, "min_size": 100_000})
    art = _onnx_artifact(src)
    new, rec = prune(art, cfg, _ctx(tmp_path))
    assert new is art and not rec.changed and rec.summary.startswith("nothing to change")


def test_external_data_kept(tmp_path):
    src = _model(tmp_path / "m.onnx", external=True)
    assert (tmp_path / "w.data").is_file()
    cfg = make_config("prune", {"threshold": 0.5, "skip_first_last": False})
    new, rec = prune(_onnx_artifact(src), cfg, _ctx(tmp_path))
    assert [p.name for p in new.files] == ["model.onnx", "model.onnx.data"]
    assert new.files[1].stat().st_size > W3.nbytes // 2
    np.testing.assert_array_equal(_arrays(new.path)["w3"], np.where(np.abs(W3) < 0.5, 0.0, W3))
    x = RNG.normal(size=(1, 1, 8, 8)).astype(np.float32)
    assert np.isfinite(_run(new.path, x)).all()


def test_count_sparsity_sees_quantized_weights(tmp_path):
    # a DequantizeLinear weight counts as zero where it equals its zero point
    q = np.array([[3, 3, 0], [0, 5, 3]], dtype=np.int8)  # zeros: (1,0), (0,1), (0,2)
    zp = np.array([0, 3, 0], dtype=np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.ones(3, np.float32), "s"),
         numpy_helper.from_array(zp, "zp")])
    path = tmp_path / "q.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    got = count_sparsity(path)
    assert got["zeros"] == 3 and got["size"] == 6 and got["overall_sparsity"] == 0.5


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv2(self.conv1(x))).flatten(1))


def test_torch_module_pruned_in_a_copy(tmp_path):
    torch.manual_seed(0)
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    art = Artifact(path=tmp_path / "m.py", format=ModelFormat.TORCH, module=module,
                   example_inputs=(torch.zeros(1, 1, 8, 8),))
    cfg = make_config("prune", {"sparsity": 0.5, "scope": "per-layer", "skip_first_last": False})
    new, rec = prune(art, cfg, _ctx(tmp_path))
    assert new.module is not module and new.format is ModelFormat.TORCH
    assert new.example_inputs is art.example_inputs
    for k, v in module.state_dict().items():  # the input module is unchanged
        assert torch.equal(v, before[k])
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        w = new.module.state_dict()[name]
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.01, name
    assert torch.equal(new.module.conv1.bias, module.conv1.bias)  # biases and BN untouched
    assert torch.equal(new.module.bn.weight, module.bn.weight)
    assert [x["name"] for x in rec.details["layers"]] == ["conv1.weight", "conv2.weight", "fc.weight"]


def test_config_errors():
    with pytest.raises(StepError, match="exactly one of 'threshold' or 'sparsity'"):
        make_config("prune", {})
    with pytest.raises(StepError, match="sparsity"):
        make_config("prune", {"sparsity": 1.5})
    assert get_step("prune").needs == ()
