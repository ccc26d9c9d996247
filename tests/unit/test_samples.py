"""The shipped sample models: ONNX accuracy, data files, torch/ONNX agreement, metadata, graph shape."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
# name -> (input shape without batch, minimum fp32 accuracy on eval.npz)
CASES = {"digits": ((1, 8, 8), 0.97), "tiny-transformer": ((8, 8), 0.95)}
LABELS = ",".join(str(i) for i in range(10))


def _session(name):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(SAMPLES / name / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _npz(name, kind):
    with np.load(SAMPLES / name / f"{kind}.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _module(name):
    spec = importlib.util.spec_from_file_location(f"sample_{name.replace('-', '_')}", SAMPLES / name / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", CASES)
def test_onnx_accuracy_on_eval(name):
    ev = _npz(name, "eval")
    logits = _session(name).run(["logits"], {"input": ev["x"]})[0]
    assert logits.shape == (len(ev["y"]), 10)
    acc = float((logits.argmax(1) == ev["y"]).mean())
    assert acc >= CASES[name][1], f"{name}: accuracy {acc:.4f} below {CASES[name][1]}"


@pytest.mark.parametrize("name", CASES)
def test_npz_keys_shapes_and_split(name):
    shape, _ = CASES[name]
    ev, tr, calib = _npz(name, "eval"), _npz(name, "train"), _npz(name, "calib")
    assert sorted(ev) == ["x", "y"] and sorted(tr) == ["x", "y"] and sorted(calib) == ["input"]
    assert 340 <= len(ev["y"]) <= 380
    assert len(ev["y"]) + len(tr["y"]) == 1797           # load_digits, split with nothing lost
    assert calib["input"].shape == (128, *shape)
    for d in (ev, tr):
        assert d["x"].dtype == np.float32 and d["y"].dtype == np.int64
        assert d["x"].shape == (len(d["y"]), *shape)
        assert 0.0 <= d["x"].min() and d["x"].max() <= 1.0
        assert sorted(np.unique(d["y"]).tolist()) == list(range(10))
    # stratified: each class has 20 % (+-2 %) of its samples in the eval split
    counts = np.bincount(ev["y"], minlength=10) / (np.bincount(ev["y"], minlength=10)
                                                   + np.bincount(tr["y"], minlength=10))
    assert np.all(np.abs(counts - 0.2) < 0.02)
    # calibration rows are taken from the training split
    train_rows = {row.tobytes() for row in tr["x"]}
    assert all(row.tobytes() in train_rows for row in calib["input"])


@pytest.mark.parametrize("name", CASES)
def test_torch_factory_matches_onnx(name):
    import torch
    mod = _module(name)
    (example,) = mod.example_inputs()
    assert example.shape == (1, *CASES[name][0]) and example.dtype == torch.float32
    model = mod.build()
    model.load_state_dict(torch.load(SAMPLES / name / "weights.pt", weights_only=True))
    model.eval()
    x = _npz(name, "eval")["x"][:64]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = _session(name).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_onnx_io_and_metadata(name):
    import onnx
    m = onnx.load(str(SAMPLES / name / "model.onnx"))
    props = {p.key: p.value for p in m.metadata_props}
    assert props["labels"] == LABELS and props["task"] == "image-classification"
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param          # symbolic batch
    assert {o.domain: o.version for o in m.opset_import}[""] == 17
    sess = _session(name)
    for batch in (1, 7):                                                        # dynamic batch really works
        x = np.zeros((batch, *CASES[name][0]), np.float32)
        assert sess.run(["logits"], {"input": x})[0].shape == (batch, 10)


def test_transformer_has_int4_quantizable_matmuls():
    import onnx
    m = onnx.load(str(SAMPLES / "tiny-transformer" / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    # MatMulNBits needs MatMul(activation, constant 2-D weight [K, N]) with K >= 32
    weighted = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] >= 32]
    assert len(weighted) == 12, [n.name for n in weighted]   # q, k, v, out, ff1, ff2 in each of 2 layers
    assert not any(n.op_type == "Attention" for n in m.graph.node)


def test_sizes():
    assert (SAMPLES / "digits" / "model.onnx").stat().st_size < 500_000
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 2_000_000, f"samples/ is {total} bytes"
