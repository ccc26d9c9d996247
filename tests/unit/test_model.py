"""load_model / io_specs / export_onnx / inspect_model on tiny hand-built ONNX graphs and torch modules."""
import hashlib
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import ModelError
from edgepack.model.describe import count_parameters, file_sha256, inspect_model, io_specs
from edgepack.model.load import load_model
from edgepack.model.torch import export_onnx
from edgepack.types import Artifact, ModelFormat, TensorSpec

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3)).astype(np.float32)  # initializer
C = RNG.normal(size=(3,)).astype(np.float32)  # Constant node
EMB = RNG.normal(size=(10, 3)).astype(np.float32)  # initializer (Gather by int64 ids)


def _two_input_model(path: Path, external: bool = False) -> Path:
    """y = x @ W + C + EMB[ids].sum(1): a float input with a symbolic batch and an int64 input."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(C, "c")),
        helper.make_node("Add", ["xw", "c"], ["a"]),
        helper.make_node("Gather", ["emb", "ids"], ["g"]),
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64), "axes")),
        helper.make_node("ReduceSum", ["g", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["a", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(EMB, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="unit-test")
    model.ir_version = 8
    helper.set_model_props(model, {"labels": "a,b,c", "author": "test"})
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# ---------------------------------------------------------------- ONNX

def test_onnx_two_inputs_int64_symbolic_constant_weights_metadata(tmp_path):
    a = load_model(_two_input_model(tmp_path / "m.onnx"))
    assert a.format is ModelFormat.ONNX and a.files == (tmp_path / "m.onnx",)
    assert a.metadata == {"labels": "a,b,c", "author": "test"}
    ins, outs = io_specs(a)
    assert ins == [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("ids", "int64", ("batch", 5))]
    assert outs == [TensorSpec("y", "float32", ("batch", 3))]
    assert count_parameters(a) == W.size + C.size + EMB.size + 1  # initializers + Constant tensors


def test_onnx_external_data_kept_and_missing_named(tmp_path):
    path = _two_input_model(tmp_path / "m.onnx", external=True)
    a = load_model(path)
    assert a.files == (path, tmp_path / "m.onnx.data")
    info = inspect_model(path)
    assert info["size_bytes"] == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    # the model still runs from its files
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, ids = np.ones((2, 4), np.float32), np.zeros((2, 5), np.int64)
    np.testing.assert_allclose(sess.run(None, {"x": x, "ids": ids})[0], x @ W + C + 5 * EMB[0], rtol=1e-5)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"keeps its weights in 'm.onnx.data', which is missing"):
        load_model(path)


def test_inspect_model_reports_ops_params_opset_producer(tmp_path):
    info = inspect_model(_two_input_model(tmp_path / "m.onnx"))
    assert info["format"] == "onnx"
    assert list(info["ops"].items()) == [("Add", 2), ("Constant", 2), ("Gather", 1), ("MatMul", 1), ("ReduceSum", 1)]
    assert info["parameters"] == 46 and info["opset"] == {"ai.onnx": 17}
    assert info["producer"] == "unit-test" and info["metadata"]["labels"] == "a,b,c"
    assert info["inputs"][1] == {"name": "ids", "dtype": "int64", "shape": ["batch", 5]}


def test_missing_file_png_bytes_and_truncated_onnx(tmp_path):
    with pytest.raises(ModelError, match=r"model file .*nope.onnx not found"):
        load_model(tmp_path / "nope.onnx")
    png = tmp_path / "photo.onnx"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(ModelError, match=r"photo.onnx is not a valid ONNX model: .*corrupt"):
        load_model(png)
    good = _two_input_model(tmp_path / "m.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match=r"cut.onnx is not a valid ONNX model"):
        load_model(cut)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        load_model(tmp_path / "empty.onnx")


def test_checker_failure_gives_first_line(tmp_path):
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError) as e:
        load_model(tmp_path / "bad.onnx")
    assert "No Op registered for NoSuchOp" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- torch files

def test_torchscript_and_io_specs(tmp_path):
    torch.manual_seed(0)
    m = TinyCNN().eval()
    torch.jit.trace(m, torch.randn(1, 3, 8, 8)).save(str(tmp_path / "m.pt"))
    a = load_model(tmp_path / "m.pt", input_shapes={"input": (2, 3, 8, 8)})
    assert a.format is ModelFormat.TORCH and isinstance(a.module, torch.jit.ScriptModule)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(a.module(x), m(x))
    ins, outs = io_specs(a)
    assert ins == [TensorSpec("input", "float32", (2, 3, 8, 8))] and outs == [TensorSpec("output", "float32", (2, 5))]
    assert count_parameters(a) == sum(p.numel() for p in m.parameters()) == 3 * 4 * 9 + 4 + 4 * 5 + 5
    no_shape = load_model(tmp_path / "m.pt")
    with pytest.raises(ModelError, match="pass --input-shape"):
        io_specs(no_shape)


def test_torch_export_pt2_examples_from_program_and_export(tmp_path):
    torch.manual_seed(0)
    m = TinyCNN().eval()
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    a = load_model(tmp_path / "m.pt2")
    assert a.format is ModelFormat.TORCH and tuple(a.example_inputs[0].shape) == (2, 3, 8, 8)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(a.module(x), m(x))
    out = export_onnx(a, tmp_path / "onnx", opset=18)
    sess = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", 3, 8, 8]
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], m(x).detach().numpy(), atol=1e-5)


def _write_payload(path: Path, marker: Path, zip_format: bool) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if zip_format:
        torch.save({"model": Payload()}, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(), f, protocol=2)


@pytest.mark.parametrize("zip_format", [False, True])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned.txt"
    model = tmp_path / "evil.pt"
    _write_payload(model, marker, zip_format)
    assert not marker.exists()
    with pytest.raises(ModelError, match=r"evil.pt is a pickled Python object; edgepack does not unpickle "
                                         r"untrusted files\. Save a state_dict and pass a factory"):
        load_model(model)
    assert not marker.exists()
    # the same payload as --weights of a factory is refused too
    factory = tmp_path / "net.py"
    factory.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n"
                       "def example_inputs():\n    return torch.zeros(1, 2)\n")
    with pytest.raises(ModelError, match="is not a safe state dict"):
        load_model(f"{factory}:build", weights=model)
    assert not marker.exists()


def test_state_dict_file_and_pickled_module(tmp_path):
    m = TinyCNN()
    torch.save(m.state_dict(), str(tmp_path / "sd.pt"))
    with pytest.raises(ModelError, match=r"holds weights only .*model.py:build --weights"):
        load_model(tmp_path / "sd.pt")
    torch.save(m, str(tmp_path / "full.pt"))
    with pytest.raises(ModelError, match="pickled Python object"):
        load_model(tmp_path / "full.pt")
    a = load_model(tmp_path / "full.pt", allow_pickle=True, input_shapes={"x": (1, 3, 8, 8)})
    assert a.format is ModelFormat.TORCH and count_parameters(a) == 137


# ---------------------------------------------------------------- factory

FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.a = torch.nn.Linear(3, hidden)
        self.b = torch.nn.Linear(hidden, 2)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale, x.sum(1)

def build():
    return Net()

def build_wide():
    return Net(hidden=6)

def example_inputs():
    return torch.ones(1, 3), torch.full((1, 1), 2.0)
"""


def test_factory_with_weights_examples_and_errors(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    torch.manual_seed(1)
    ns: dict = {}  # the reference: the same code, built outside edgepack
    exec(FACTORY, ns)
    ref = ns["Net"]()
    torch.save(ref.state_dict(), str(tmp_path / "w.pt"))
    a = load_model(f"{src}:build", weights=tmp_path / "w.pt")
    assert a.files == (src, tmp_path / "w.pt") and len(a.example_inputs) == 2
    x, s = torch.randn(4, 3), torch.full((4, 1), 3.0)
    torch.testing.assert_close(a.module(x, s), ref(x, s))
    ins, outs = io_specs(a)
    assert [i.name for i in ins] == ["input_0", "input_1"] and [o.shape for o in outs] == [(1, 2), (1,)]
    assert load_model(str(src)).module.a.out_features == 4  # default function name `build`
    shaped = load_model(src, input_shapes={"x": (5, 3), "scale": (5, 1)})
    assert [tuple(t.shape) for t in shaped.example_inputs] == [(5, 3), (5, 1)]

    with pytest.raises(ModelError, match=r"has no function 'make'"):
        load_model(f"{src}:make")
    with pytest.raises(ModelError, match=r"do not fit .*shape mismatch: a.weight \(file \(4, 3\), model \(6, 3\)\)"):
        load_model(f"{src}:build_wide", weights=tmp_path / "w.pt")
    torch.save({"a.weight": torch.zeros(4, 3)}, str(tmp_path / "part.pt"))
    with pytest.raises(ModelError, match=r"missing keys: a.bias, b.weight, b.bias"):
        load_model(f"{src}:build", weights=tmp_path / "part.pt")
    bare = tmp_path / "bare.py"
    bare.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ModelError, match="pass --input-shape"):
        load_model(bare)


# ---------------------------------------------------------------- export

def test_export_cnn_keeps_dynamic_batch_and_metadata(tmp_path):
    torch.manual_seed(0)
    m = TinyCNN().eval()
    a = Artifact(path=tmp_path / "net.py", format=ModelFormat.TORCH, module=m,
                 example_inputs=(torch.randn(1, 3, 8, 8),), metadata={"labels": "cat,dog"})
    out = export_onnx(a, tmp_path / "export", opset=17)
    assert out.format is ModelFormat.ONNX and out.notes == ()
    assert out.files == (tmp_path / "export" / "model.onnx",)  # one file: no external data for small models
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.onnx"]
    model = onnx.load(str(out.path))
    assert {p.key: p.value for p in model.metadata_props}["labels"] == "cat,dog"
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    assert load_model(out.path).metadata["labels"] == "cat,dog"
    sess = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_outputs()[0].name == "output"
    for batch in (1, 4):
        x = torch.randn(batch, 3, 8, 8)
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 5)
        assert np.abs(got - m(x).detach().numpy()).max() < 1e-5


def test_export_falls_back_to_static_batch_with_note(tmp_path):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1).sum(1)  # batch 2 is baked in

    a = Artifact(path=tmp_path / "f.py", format=ModelFormat.TORCH, module=Fixed(),
                 example_inputs=(torch.randn(2, 3),))
    out = export_onnx(a, tmp_path / "e", opset=17)
    assert len(out.notes) == 1 and out.notes[0].startswith("fixed batch 2: dynamic batch export failed")
    ins, _ = io_specs(out)
    assert ins == [TensorSpec("input", "float32", (2, 3))]


def test_file_sha256_streams_and_is_order_stable(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"y")
    assert file_sha256(a) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert file_sha256([a, b]) == file_sha256([b, a]) != file_sha256([a])
    with pytest.raises(ModelError, match="cannot read"):
        file_sha256([tmp_path / "gone.bin"])


def test_custom_domain_ops_load_with_plain_check(tmp_path):
    """ONNX Runtime's com.microsoft ops are outside onnx shape inference: the model still loads."""
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "ms.onnx"))
    a = load_model(tmp_path / "ms.onnx")
    assert inspect_model(a.path)["ops"] == {"com.microsoft.Gelu": 1}
    x = np.array([[0.0, 1.0, -1.0, 2.0]], np.float32)
    got = ort.InferenceSession(str(a.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, [[0.0, 0.8413447, -0.1586553, 1.9544997]], atol=1e-5)
