"""Property tests and fuzzing of everything that reads user files: target profiles, manifests, archives, verify.

Each property: any input gives a result or a clean EdgepackError subclass, never another exception.
Bounded (max_examples 60-150, no deadline) so the whole file stays well under a minute on 2 cores.
"""
from __future__ import annotations

import io
import json
import shutil
import string
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle.archive import safe_extract
from edgepack.bundle.manifest import load_manifest
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle
from edgepack.errors import BundleError, EdgepackError, TargetError
from edgepack.target import load_target

FIXTURE = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- a real small bundle

@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> tuple[Path, bytes]:
    """A bundle of y = x @ W + b written by write_bundle (self-test on), and its .tar.gz bytes."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    w, b, x = (rng.normal(size=s).astype(np.float32) for s in ((4, 3), (3,), (4, 4)))
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(d / "gemm.onnx"))
    (d / "report.json").write_text('{"schema_version": 1}')
    manifest = {"name": "gemm", "target": {"name": "cpu-x86", "description": "fuzz"},
                "runtime": {"name": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
                            "provider_options": {}},
                "precision": "fp32", "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
                "reference": {"rtol": 1e-3, "atol": 1e-4, "top1_min": 1.0}}
    out = write_bundle(d / "gemm", model_files=[d / "gemm.onnx"], manifest=manifest, reference_inputs={"x": x},
                       reference_outputs=[x @ w + b], report_files=[d / "report.json"], archive=True,
                       selftest=True)
    return out, (d / "gemm.tar.gz").read_bytes()


def _tar_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _retar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m, data in members:
            if data is not None:
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# ---------------------------------------------------------------- target files

_keys = st.sampled_from(["name", "description", "extends", "runtimes", "precisions", "quantization", "bench",
                         "shapes", "opset", "fidelity", "budgets", "runtime", "provider", "device", "warmup",
                         "min", "max", "policy", "batch", "turbo"])
_scalars = st.one_of(st.integers(-3, 30), st.booleans(), st.floats(allow_nan=False, width=32),
                     st.sampled_from(["cpu-x86", "intel-npu", "int8", "fp32", "CPU", "onnxruntime", "openvino",
                                      "CPUExecutionProvider", "f32", "static", "a.toml", "b.toml", ""]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_keys, inner, max_size=3)), max_leaves=8)


@settings(max_examples=150, **FIXTURE)
@given(a=st.dictionaries(_keys, _values, max_size=6), b=st.dictionaries(_keys, _values, max_size=4))
def test_target_files_with_extends_chains_load_or_fail_cleanly(tmp_path, a, b):
    """Two random profiles that may extend each other (cycles included) or a shipped one."""
    import tomli_w

    for name, data in (("a.toml", a), ("b.toml", b)):
        (tmp_path / name).write_text(tomli_w.dumps(data))
    try:
        t = load_target(tmp_path / "a.toml")
    except TargetError as e:
        msg = str(e)
        assert "\n" not in msg and msg.strip()
        return
    assert t.runtimes and t.precisions and t.opset.min <= t.opset.max


@settings(max_examples=80, **FIXTURE)
@given(text=st.text(string.printable, max_size=200))
def test_any_target_text_loads_or_fails_cleanly(tmp_path, text):
    f = tmp_path / "t.toml"
    f.write_text(text)
    try:
        load_target(f)
    except TargetError as e:
        assert str(f) in str(e)


# ---------------------------------------------------------------- manifests

_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                               st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3)),
                     max_leaves=10)


@settings(max_examples=150, **FIXTURE)
@given(doc=st.one_of(_json, st.fixed_dictionaries({"schema_version": st.just(1)}, optional={
    "files": _json, "runtime": _json, "inputs": _json})))
def test_load_manifest_on_random_json(tmp_path, doc):
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    try:
        m = load_manifest(tmp_path)
    except BundleError as e:
        assert "manifest.json" in str(e) and "\n" not in str(e)
        return
    assert isinstance(m, dict) and isinstance(m["files"], dict) and isinstance(m["runtime"], dict)


@settings(max_examples=150, **FIXTURE)
@given(data=st.data())
def test_load_manifest_on_mutated_real_manifest(small_bundle, tmp_path, data):
    raw = bytearray((small_bundle[0] / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 64))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    (tmp_path / "manifest.json").write_bytes(bytes(raw))
    try:
        assert isinstance(load_manifest(tmp_path), dict)
    except BundleError:
        pass


# ---------------------------------------------------------------- archives

def _mutate(data: bytes, draw) -> bytes:
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "zero"]))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            raw = raw[:i]
        else:
            raw[i:i + 16] = bytes(len(raw[i:i + 16]))
        if not raw:
            break
    return bytes(raw)


@settings(max_examples=100, **FIXTURE)
@given(blob=st.binary(max_size=600))
def test_safe_extract_random_bytes(tmp_path, blob):
    arch = tmp_path / "x.tar.gz"
    arch.write_bytes(blob)
    shutil.rmtree(tmp_path / "d", ignore_errors=True)
    try:
        safe_extract(arch, tmp_path / "d")
    except BundleError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, **FIXTURE)
@given(data=st.data())
def test_safe_extract_mutated_archive(small_bundle, tmp_path, data):
    arch = tmp_path / "m.tar.gz"
    arch.write_bytes(_mutate(small_bundle[1], data.draw))
    dest = tmp_path / "d"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        safe_extract(arch, dest)
    except BundleError:
        pass
    outside = [p for p in tmp_path.iterdir() if p.name not in ("m.tar.gz", "d")]
    assert outside == []  # nothing ever lands next to the destination


@settings(max_examples=60, **FIXTURE)
@given(data=st.data())
def test_safe_extract_hostile_member_names(small_bundle, tmp_path, data):
    """A real archive plus one member whose name/type is hostile: refused before anything is written."""
    members = _tar_members(small_bundle[1])
    name = data.draw(st.sampled_from(["../x", "gemm/../../x", "/tmp/x", "gemm/./../../x", "C:/x", "gemm/sub/../../../x"]))
    kind = data.draw(st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]))
    m = tarfile.TarInfo(name if kind == tarfile.REGTYPE else data.draw(st.sampled_from([name, "gemm/link"])))
    m.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        m.linkname = data.draw(st.sampled_from(["/etc/passwd", "../../x", "gemm/manifest.json"]))
    pos = data.draw(st.integers(0, len(members)))
    members.insert(pos, (m, b"evil" if kind == tarfile.REGTYPE else None))
    arch = tmp_path / "h.tar.gz"
    arch.write_bytes(_retar(members))
    dest = tmp_path / "d"
    shutil.rmtree(dest, ignore_errors=True)
    with pytest.raises(BundleError, match="refused to extract"):
        safe_extract(arch, dest)
    assert not dest.exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- verify

@settings(max_examples=120, **FIXTURE)
@given(data=st.data())
def test_verify_fuzz_mutated_archives(small_bundle, tmp_path, data):
    """Byte-level damage to a real bundle archive: verify passes (damage in gzip padding) or says why."""
    arch = tmp_path / "v.tar.gz"
    arch.write_bytes(_mutate(small_bundle[1], data.draw))
    try:
        verify_bundle(arch, selftest=False)
    except EdgepackError as e:
        assert "\n" not in str(e) and str(e).strip()


@settings(max_examples=120, **FIXTURE)
@given(data=st.data())
def test_verify_fuzz_member_edits(small_bundle, tmp_path, data):
    """Content-level edits inside a valid archive (changed byte, dropped/extra/renamed member) never pass."""
    members = _tar_members(small_bundle[1])
    # manifest.json is not hashed by itself: an edit to a field verify does not read (e.g. "name") passes
    files = [i for i, (m, d) in enumerate(members) if d is not None and not m.name.endswith("/manifest.json")]
    i = data.draw(st.sampled_from(files))
    op = data.draw(st.sampled_from(["flip", "drop", "extra", "rename", "empty"]))
    m, d = members[i]
    if op == "flip":
        j = data.draw(st.integers(0, max(len(d) - 1, 0)))
        members[i] = (m, d[:j] + bytes([(d[j] if d else 0) ^ 0x20]) + d[j + 1:])
    elif op == "drop":
        del members[i]
    elif op == "extra":
        members.append((tarfile.TarInfo("gemm/extra.bin"), data.draw(st.binary(max_size=32))))
    elif op == "rename":
        m.name = m.name + ".bak"
    else:
        members[i] = (m, b"")
    arch = tmp_path / "e.tar.gz"
    arch.write_bytes(_retar(members))
    with pytest.raises(BundleError) as e:
        verify_bundle(arch, selftest=False)
    assert "\n" not in str(e.value)


def test_verify_with_selftest_on_damaged_bundles(small_bundle, tmp_path):
    """A few with the self-test on: intact passes; changed reference outputs fail the hash check first."""
    src, blob = small_bundle
    assert verify_bundle(src, selftest=True)["selftest"]["passed"] is True
    for k, mutate in enumerate([lambda p: (p / "reference" / "outputs.npz").write_bytes(b"PK\x05\x06" + bytes(18)),
                                lambda p: (p / "run.py").write_text("import sys; sys.exit(7)\n"),
                                lambda p: (p / "manifest.json").write_text("[]")]):
        b = tmp_path / f"b{k}"
        shutil.copytree(src, b)
        mutate(b)
        with pytest.raises(BundleError) as e:
            verify_bundle(b, selftest=True)
        assert "\n" not in str(e.value)
