"""load_dataset checks (each error names file, input, expected and got), synthetic inputs, Dataset helpers."""
import numpy as np
import pytest

from edgepack.data import Dataset, dataset_from_arrays, load_dataset, synthetic_inputs
from edgepack.errors import DataError
from edgepack.types import TensorSpec

IMG = [TensorSpec("input", "float32", ("batch", 3, 4, 4))]
TWO = [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("ids", "int64", ("batch", None))]
RNG = np.random.default_rng(0)


def _img(n=5, dtype=np.float32):
    return RNG.normal(size=(n, 3, 4, 4)).astype(dtype)


def test_npz_by_input_names_with_labels(tmp_path):
    x, ids, y = _img(6)[:, 0, 0], RNG.integers(0, 50, (6, 7)), np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "d.npz", x=x, ids=ids.astype(np.int32), y=y.astype(np.int32))
    ds = load_dataset(tmp_path / "d.npz", TWO, kind="eval", num_classes=3)
    assert len(ds) == 6 and ds.source == str(tmp_path / "d.npz")
    assert ds.inputs["ids"].dtype == np.int64 and np.array_equal(ds.inputs["ids"], ids)  # int32 -> int64
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == y.tolist()
    assert [len(b["x"]) for b in ds.batches(4)] == [4, 2]
    small = ds.take(2)
    assert len(small) == 2 and small.labels.tolist() == [0, 1]


def test_single_input_x_key_npy_and_float64_cast(tmp_path):
    a = _img(4, np.float64)
    np.savez(tmp_path / "x.npz", x=a)
    ds = load_dataset(tmp_path / "x.npz", IMG, kind="calib")
    assert ds.inputs["input"].dtype == np.float32 and ds.labels is None
    np.testing.assert_allclose(ds.inputs["input"], a.astype(np.float32))
    np.save(tmp_path / "x.npy", a)
    assert load_dataset(tmp_path / "x.npy", IMG, kind="calib").inputs["input"].shape == (4, 3, 4, 4)
    np.savez(tmp_path / "u8.npz", input=(RNG.integers(0, 255, (2, 3, 4, 4))).astype(np.uint8))
    assert load_dataset(tmp_path / "u8.npz", IMG, kind="calib").inputs["input"].dtype == np.float32


def test_folder_is_concatenated_in_name_order(tmp_path):
    a, b = _img(3), _img(2)
    np.savez(tmp_path / "b.npz", input=b, y=np.array([1, 1]))
    np.savez(tmp_path / "a.npz", input=a, y=np.array([0, 0, 0]))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset(tmp_path, IMG, kind="eval", require_labels=True)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(ds.inputs["input"], np.concatenate([a, b]))
    np.savez(tmp_path / "c.npz", input=b)
    with pytest.raises(DataError, match=r"c.npz has no labels 'y' but other files do"):
        load_dataset(tmp_path, IMG, kind="eval")


def test_missing_empty_and_folder_without_files(tmp_path):
    with pytest.raises(DataError, match=r"calibration data not found: .*nope.npz"):
        load_dataset(tmp_path / "nope.npz", IMG, kind="calib")
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"e.npz is empty"):
        load_dataset(tmp_path / "e.npz", IMG, kind="calib")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(DataError, match=r"none.npz is empty \(no arrays"):
        load_dataset(tmp_path / "none.npz", IMG, kind="calib")
    np.savez(tmp_path / "zero.npz", input=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"input 'input' is empty \(0 samples\)"):
        load_dataset(tmp_path / "zero.npz", IMG, kind="calib")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"evaluation data folder .*dir has no .npz or .npy files"):
        load_dataset(tmp_path / "dir", IMG, kind="eval")


def test_unknown_and_missing_inputs(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 4), np.float32), idz=np.zeros((2, 3), np.int64))
    with pytest.raises(DataError, match=r"k.npz: unknown key\(s\) idz; the model's inputs are x, ids"):
        load_dataset(tmp_path / "k.npz", TWO, kind="calib")
    np.savez(tmp_path / "m.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match=r"m.npz: input 'ids' is missing"):
        load_dataset(tmp_path / "m.npz", TWO, kind="calib")
    np.save(tmp_path / "one.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match=r"a .npy file holds one array but the model has 2 inputs \(x, ids\)"):
        load_dataset(tmp_path / "one.npy", TWO, kind="calib")


def test_rank_and_fixed_dims(tmp_path):
    np.savez(tmp_path / "r.npz", input=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"r.npz: input 'input' has shape \[2, 3, 4\], expected rank 4 \[N, 3, 4, 4\]"):
        load_dataset(tmp_path / "r.npz", IMG, kind="calib")
    np.savez(tmp_path / "d.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"expected \[N, 3, 4, 4\]: axis 1 is 1, not 3"):
        load_dataset(tmp_path / "d.npz", IMG, kind="calib")
    # symbolic dims accept any size; axis 0 (samples) is never checked
    np.savez(tmp_path / "ok.npz", x=np.zeros((9, 4), np.float32), ids=np.zeros((9, 11), np.int64))
    assert len(load_dataset(tmp_path / "ok.npz", TWO, kind="calib")) == 9


def test_unsafe_casts_nan_and_object_arrays(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4), np.float32), ids=np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"input 'ids' is float32, the model takes int64; that cast would lose values"):
        load_dataset(tmp_path / "f.npz", TWO, kind="calib")
    bad = _img(3)
    bad[1, 0, 0, 0], bad[2, 1, 1, 1] = np.nan, np.inf
    np.savez(tmp_path / "n.npz", input=bad)
    with pytest.raises(DataError, match=r"input 'input' has 2 NaN/Inf values \(first in sample 1\)"):
        load_dataset(tmp_path / "n.npz", IMG, kind="calib")
    np.savez(tmp_path / "o.npz", input=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match=r"o.npz holds Python objects \(an object array\)"):
        load_dataset(tmp_path / "o.npz", IMG, kind="calib")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"o.npy holds Python objects"):
        load_dataset(tmp_path / "o.npy", IMG, kind="calib")
    np.savez(tmp_path / "big.npz", x=np.zeros((2, 4)), ids=np.full((2, 3), 2**40, np.int64))
    assert load_dataset(tmp_path / "big.npz", TWO, kind="calib").inputs["ids"].max() == 2**40
    spec32 = [TensorSpec("x", "float32", ("b", 4)), TensorSpec("ids", "int32", ("b", 3))]
    with pytest.raises(DataError, match=r"values outside the range of int32"):
        load_dataset(tmp_path / "big.npz", spec32, kind="calib")


def test_labels_checks(tmp_path):
    x = _img(3)
    cases = {
        "range": (np.array([0, 1, 3]), r"label 3 is out of range: the model has 3 classes \(labels 0..2\)"),
        "neg": (np.array([0, -1, 2]), r"labels must be >= 0, found -1"),
        "float": (np.array([0.0, 1.0, 2.0]), r"labels 'y' must be integer class ids, got float64"),
        "count": (np.array([0, 1]), r"2 labels for 3 samples"),
        "shape": (np.array([[0], [1], [2]]), r"labels 'y' must have shape \(N,\), got \[3, 1\]"),
    }
    for name, (y, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", input=x, y=y)
        with pytest.raises(DataError, match=rf"evaluation data .*{name}.npz: {message}"):
            load_dataset(tmp_path / f"{name}.npz", IMG, kind="eval", num_classes=3)
    np.savez(tmp_path / "nolabels.npz", input=x)
    with pytest.raises(DataError, match=r"training data .*nolabels.npz has no labels: store class ids as key 'y'"):
        load_dataset(tmp_path / "nolabels.npz", IMG, kind="train", require_labels=True)


def test_synthetic_inputs():
    specs = [TensorSpec("x", "float32", ("batch", 3, 4)), TensorSpec("ids", "int64", (1, 6)),
             TensorSpec("mask", "bool", (None, 6))]
    a, b = synthetic_inputs(specs, 8, seed=1), synthetic_inputs(specs, 8, seed=1)
    assert a["x"].shape == (8, 3, 4) and a["x"].dtype == np.float32 and abs(a["x"].std() - 1) < 0.25
    assert a["ids"].shape == (8, 6) and a["ids"].dtype == np.int64 and 0 <= a["ids"].min() and a["ids"].max() < 10
    assert a["mask"].dtype == bool
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x"], synthetic_inputs(specs, 8, seed=2)["x"])
    with pytest.raises(DataError, match=r"input 'tokens' has shape \['batch', 'seq'\] .* pass --input-shape"):
        synthetic_inputs([TensorSpec("tokens", "int64", ("batch", "seq"))], 4, seed=0)


def test_dataset_from_arrays_and_batches():
    ds = dataset_from_arrays({"a": np.arange(10).reshape(5, 2)}, [0, 1, 0, 1, 1], source="mem")
    assert isinstance(ds, Dataset) and len(ds) == 5 and ds.labels.dtype == np.int64
    assert [b["a"][:, 0].tolist() for b in ds.batches(2)] == [[0, 2], [4, 6], [8]]
    with pytest.raises(DataError, match="batch size must be at least 1"):
        next(ds.batches(0))
    with pytest.raises(DataError, match=r"mem: inputs have different numbers of samples"):
        dataset_from_arrays({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, source="mem")
    with pytest.raises(DataError, match=r"mem: 2 labels for 5 samples"):
        dataset_from_arrays({"a": np.zeros((5, 1))}, [0, 1], source="mem")
