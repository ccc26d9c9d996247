"""bundle.py: write (atomic, locked, force rules), verify (hashes, extras, self-test), archives, safe extraction."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import write as bundle_mod
from edgepack.bundle.archive import make_archive, safe_extract
from edgepack.bundle.manifest import is_bundle, load_manifest, requirements_txt
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle
from edgepack.errors import BundleError

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = RNG.normal(size=3).astype(np.float32)
X = RNG.normal(size=(8, 4)).astype(np.float32)


def make_onnx(path: Path, *, external: bool = False) -> list[Path]:
    """y = x @ W + b, x: float32 [batch, 4]; optionally with W/b as external data in weights.bin."""
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    helper.set_model_props(m, {"author": "tests", "labels": "a,b,c"})
    if external:
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                  size_threshold=0)
        return [path, path.with_name("weights.bin")]
    onnx.save(m, str(path))
    return [path]


def manifest(provider: str = "CPUExecutionProvider", **rt) -> dict:
    return {
        "name": "gemm",
        "target": {"name": "cpu-x86", "description": "test target"},
        "runtime": {"name": "onnxruntime", "version": ort.__version__, "provider": provider,
                    "provider_options": {}, **rt},
        "precision": "fp32",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        "source": {"path": "gemm.onnx", "sha256": "0" * 64, "format": "onnx"},
        "steps": [{"kind": "optimize-graph", "params": {}, "changed": False, "summary": "nothing to change"}],
        "metrics": {"accuracy": None, "fidelity": None, "latency_ms": {"p50": np.float64(0.01)}},
        "metadata": {"author": "tests"},
        "reference": {"rtol": 1e-3, "atol": 1e-4, "top1_min": 1.0},
    }


def make_bundle(tmp_path: Path, name: str = "out", *, selftest: bool = False, **kw) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files = make_onnx(src / "gemm.onnx", external=kw.pop("external", False))
    (src / "report.json").write_text('{"schema_version": 1}')
    (src / "report.md").write_text("# report\n")
    y = X @ W + B
    return write_bundle(tmp_path / name, model_files=files, manifest=kw.pop("manifest", manifest()),
                        reference_inputs={"x": X}, reference_outputs=[y],
                        report_files=[src / "report.json", src / "report.md"], selftest=selftest, **kw)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_and_verify_with_selftest(tmp_path):
    out = make_bundle(tmp_path, selftest=True)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "manifest.json", "model.onnx", "reference/inputs.npz", "reference/outputs.npz",
                     "report.json", "report.md", "requirements.txt", "run.py"]
    m = load_manifest(out)
    assert sorted(m["files"]) == [n for n in names if n != "manifest.json"]
    assert m["files"]["model.onnx"]["size"] == (out / "model.onnx").stat().st_size
    assert m["schema_version"] == 2 and m["edgepack_version"] and m["created"].endswith("+00:00")
    assert m["metrics"]["latency_ms"]["p50"] == 0.01 and m["metadata"] == {"author": "tests"}
    assert m["reference"]["inputs"] == "reference/inputs.npz" and m["reference"]["atol"] == 1e-4
    assert f"onnxruntime=={ort.__version__}" in (out / "requirements.txt").read_text()
    assert os.access(out / "run.py", os.X_OK)
    with np.load(out / "reference" / "outputs.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["y"], X @ W + B, rtol=1e-6)
    r = verify_bundle(out)
    assert r["files"] == 8 and r["selftest"]["passed"] is True
    assert r["selftest"]["max_abs_diff"] < 1e-5 and r["selftest"]["line"].startswith("PASS")
    assert is_bundle(out) and leftovers(tmp_path) == []


def test_external_data_is_resaved_under_new_name(tmp_path):
    out = make_bundle(tmp_path, external=True)
    assert (out / "model.onnx.data").is_file() and not (out / "weights.bin").exists()
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"model.onnx.data"}
    r = verify_bundle(out)  # self-test loads the external data through ORT
    assert r["selftest"]["passed"] and "model.onnx.data" in load_manifest(out)["files"]


def test_flipped_byte_names_the_file(tmp_path):
    out = make_bundle(tmp_path)
    data = bytearray((out / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"1 problem: model\.onnx: sha256 mismatch"):
        verify_bundle(out, selftest=False)


def test_missing_extra_and_changed_files_all_reported(tmp_path):
    out = make_bundle(tmp_path)
    (out / "reference" / "outputs.npz").unlink()
    (out / "notes.txt").write_text("added later")
    (out / "README.md").write_text("changed")
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"ignored")
    with pytest.raises(BundleError) as e:
        verify_bundle(out, selftest=False)
    msg = str(e.value)
    assert "4 problems: README.md: size 7 != " in msg
    assert "reference/outputs.npz: missing" in msg and "notes.txt: not listed in manifest.json" in msg
    assert "__pycache__/run.cpython-311.pyc: not listed in manifest.json" in msg  # issue 13: no file goes unlisted


@pytest.mark.parametrize("text, match", [("{not json", r"manifest\.json is not readable JSON"),
                                         ('{"schema_version": 7, "files": {}}', r"schema_version 7"),
                                         ('{"schema_version": 2}', r"lacks 'files' or 'runtime'")])
def test_broken_manifest(tmp_path, text, match):
    out = make_bundle(tmp_path)
    (out / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=match) as e:
        verify_bundle(out)
    assert str(out / "manifest.json") in str(e.value)
    assert not is_bundle(out)


def test_missing_manifest_and_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json not found"):
        load_manifest(tmp_path)
    with pytest.raises(BundleError, match="neither a bundle folder nor"):
        verify_bundle(tmp_path / "nowhere")


def test_existing_out_without_force_is_refused(tmp_path):
    out = make_bundle(tmp_path)
    before = (out / "manifest.json").read_text()
    with pytest.raises(BundleError, match=r"exists; pass --force to replace a bundle"):
        make_bundle(tmp_path)
    assert (out / "manifest.json").read_text() == before and leftovers(tmp_path) == []


def test_force_never_replaces_a_non_bundle(tmp_path):
    victim = tmp_path / "out"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match=r"exists; pass --force to replace a bundle \(refused: not an edgepack"):
        make_bundle(tmp_path, force=True)
    assert (victim / "precious.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    plain = tmp_path / "file"
    plain.write_text("a file")
    with pytest.raises(BundleError, match="not an edgepack bundle"):
        make_bundle(tmp_path, name="file", force=True)
    assert plain.read_text() == "a file"


def test_force_replaces_a_bundle(tmp_path):
    out = make_bundle(tmp_path)
    (out / "stale.txt").write_text("from the old bundle")  # issue 13: --force never deletes an unlisted file
    with pytest.raises(BundleError, match=r"holds files its manifest does not list \(stale\.txt\)"):
        make_bundle(tmp_path, force=True)
    assert (out / "stale.txt").read_text() == "from the old bundle" and leftovers(tmp_path) == []
    (out / "stale.txt").unlink()
    make_bundle(tmp_path, force=True, manifest={**manifest(), "precision": "fp16"})
    assert load_manifest(out)["precision"] == "fp16"
    assert leftovers(tmp_path) == []
    verify_bundle(out, selftest=False)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(bundle_mod, "verify_bundle", fail)  # after every file is written and hashed
    with pytest.raises(type(exc)):
        make_bundle(tmp_path)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_while_forcing_keeps_the_old_bundle(tmp_path, monkeypatch):
    out = make_bundle(tmp_path)
    before = (out / "manifest.json").read_text()

    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(bundle_mod.runner, "save_npz", fail)
    with pytest.raises(RuntimeError):
        make_bundle(tmp_path, force=True)
    assert (out / "manifest.json").read_text() == before and leftovers(tmp_path) == []


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full)
    with pytest.raises(BundleError) as e:
        make_bundle(tmp_path)
    assert str(e.value).startswith(f"disk full while writing the bundle to {tmp_path / 'out'}")
    assert "\n" not in str(e.value) and leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_lock_contention(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_verify = bundle_mod.verify_bundle

    def slow_verify(*a, **k):
        started.set()
        release.wait(10)
        return real_verify(*a, **k)

    monkeypatch.setattr(bundle_mod, "verify_bundle", slow_verify)
    first: list = []
    t = threading.Thread(target=lambda: first.append(make_bundle(tmp_path)))
    t.start()
    assert started.wait(10)
    try:
        assert (tmp_path / ".out.lock").read_text() == str(os.getpid())
        with pytest.raises(BundleError, match=r"another edgepack run is writing .*out"):
            make_bundle(tmp_path)
    finally:
        release.set()
        t.join(20)
    assert first == [tmp_path / "out"] and leftovers(tmp_path) == []


def test_stale_lock_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # its pid is now dead
    (tmp_path / ".out.lock").write_text(str(p.pid))
    assert make_bundle(tmp_path).is_dir() and leftovers(tmp_path) == []


def test_archive_round_trip_and_determinism(tmp_path):
    out = make_bundle(tmp_path, archive=True)
    arch = tmp_path / "out.tar.gz"
    with tarfile.open(arch) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "out" and names == sorted(names) and "out/model.onnx" in names
    assert {m.mtime for m in members} == {members[0].mtime} and {m.uid for m in members} == {0}
    r = verify_bundle(arch)
    assert r["files"] == 8 and r["selftest"]["passed"]
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    make_archive(out, a, arcname="out", mtime=1_700_000_000)
    os.utime(out / "README.md", (1, 1))
    make_archive(out, b, arcname="out", mtime=1_700_000_000)
    assert a.read_bytes() == b.read_bytes()
    shutil.rmtree(out)  # the archive alone still blocks a write without --force
    with pytest.raises(BundleError, match=r"out\.tar\.gz exists; pass --force"):
        make_bundle(tmp_path, archive=True)
    old = arch.read_bytes()
    make_bundle(tmp_path, archive=True, force=True, manifest={**manifest(), "precision": "fp16"})
    assert arch.read_bytes() != old and verify_bundle(arch, selftest=False)["files"] == 8


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, type_=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = type_, linkname
    return ti


@pytest.mark.parametrize("bad, why", [
    (_member("b/../../evil.txt"), r"'b/\.\./\.\./evil\.txt' has a '\.\.' component"),
    (_member("/tmp/evil.txt"), r"'/tmp/evil\.txt' has an absolute path"),
    (_member("b/link", tarfile.SYMTYPE, "/etc/passwd"), r"'b/link' is a link \(to /etc/passwd\)"),
    (_member("b/hard", tarfile.LNKTYPE, "b/manifest.json"), r"'b/hard' is a link"),
    (_member("b/dev", tarfile.CHRTYPE), r"'b/dev' is a device"),
])
def test_safe_extract_refuses_before_extracting(tmp_path, bad, why):
    data = None if bad.type in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE) else b"evil"
    arch = _tar(tmp_path / "bad.tar.gz", (_member("b/manifest.json"), b"{}"), (bad, data))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="refused to extract .*" + why):
        safe_extract(arch, dest)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    with pytest.raises(BundleError, match="refused to extract"):
        verify_bundle(arch)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(BundleError, match="not a readable .tar.gz archive"):
        verify_bundle(junk)


def test_requirements_name_the_runtime_package():
    cuda = requirements_txt({"name": "onnxruntime", "version": "1.20.1", "provider": "CUDAExecutionProvider"})
    assert "onnxruntime-gpu==1.20.1" in cuda and "# the CUDA provider ships in onnxruntime-gpu" in cuda
    assert "onnxruntime-gpu==1.20.1" in requirements_txt({"name": "onnxruntime", "version": "1.20.1",
                                                           "provider": "TensorrtExecutionProvider"})
    assert "onnxruntime-qnn==1.20.1" in requirements_txt({"name": "onnxruntime", "version": "1.20.1",
                                                          "provider": "QNNExecutionProvider"})
    assert "\nopenvino==2026.4.1\n" in requirements_txt({"name": "openvino", "version": "2026.4.1-22982-e2",
                                                         "device": "NPU"})
    assert requirements_txt({"name": "onnxruntime", "version": "1.32.0",
                             "provider": "CPUExecutionProvider"}).splitlines()[1:] == ["numpy>=1.24",
                                                                                       "onnxruntime==1.32.0"]


def test_selftest_falls_back_when_provider_absent(tmp_path):
    # A CUDA bundle packed on this CPU host: verified on its fallback, and the manifest keeps CUDA.
    out = make_bundle(tmp_path, selftest=True, manifest=manifest("CUDAExecutionProvider",
                                                                  fallback="CPUExecutionProvider"))
    assert load_manifest(out)["runtime"]["provider"] == "CUDAExecutionProvider"
    with pytest.raises(BundleError, match="provider CUDAExecutionProvider not available here"):
        verify_bundle(out)
    assert verify_bundle(out, provider="CPUExecutionProvider")["selftest"]["device_used"] == "CPUExecutionProvider"


def test_bad_reference_fails_the_write(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = make_onnx(src / "gemm.onnx")
    with pytest.raises(BundleError, match=r"self-test of .* failed: FAIL selftest: output 'y': \d+ of 24 values"):
        write_bundle(tmp_path / "out", model_files=files, manifest=manifest(), reference_inputs={"x": X},
                     reference_outputs=[X @ W + B + 0.5], report_files=[])
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert json.loads(json.dumps(manifest(), default=bundle_mod._json_default))["metrics"]["latency_ms"]["p50"] == 0.01


def test_edited_manifest_field_fails_verify(tmp_path):
    """A manifest edit that leaves every file hash intact (a looser tolerance) is still caught."""
    import json as _json

    from edgepack.bundle.verify import verify_bundle as _verify

    b = make_bundle(tmp_path)
    m = _json.loads((b / "manifest.json").read_text())
    m["reference"]["atol"] = 1e9
    (b / "manifest.json").write_text(_json.dumps(m, indent=2))
    with pytest.raises(BundleError, match="manifest_sha256"):
        _verify(b, selftest=False)


def test_selftest_tolerance_is_per_output(tmp_path):
    """Token ids passed through (int64, range 600) no longer widen the scores' tolerance: each output gets
    its own atol from its own range, and integer outputs must match exactly."""
    from types import SimpleNamespace

    from edgepack.bundle.manifest import reference_io
    from edgepack.data import Dataset
    from edgepack.types import Precision

    scores = RNG.uniform(0, 1, size=(8, 3)).astype(np.float32)
    ids = RNG.integers(0, 600, size=(8, 5)).astype(np.int64)
    chosen = SimpleNamespace(batch=32, session=None, outputs=[scores, ids],
                             plan=SimpleNamespace(precision=Precision.INT8))
    scoring = SimpleNamespace(data=Dataset({"x": X}, None, "test"), axes=[0, 0])
    _, _, tol = reference_io(chosen, scoring)
    assert tol["atols"][1] == 0.0 and tol["atols"][0] == pytest.approx(0.05 * float(np.ptp(scores)))

    # the runner reads each output's atol from the manifest: a score off by 0.1 fails although the
    # reference-wide atol (the old rule: 5% of the widest output's range) would have let it pass
    y = X @ W + B
    m = manifest()
    m["precision"] = "int8"
    m["reference"] = {"rtol": 0.0, "atol": 30.0, "top1_min": None}
    m["outputs"] = [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "atol": 0.05}]
    src = tmp_path / "src"
    src.mkdir()
    files = make_onnx(src / "gemm.onnx")
    out = write_bundle(tmp_path / "b", model_files=files, manifest=m, reference_inputs={"x": X},
                       reference_outputs=[y + 0.1], report_files=[], selftest=False)
    with pytest.raises(BundleError, match="output 'y': 24 of 24 values outside rtol=0 atol=0.05 "):
        verify_bundle(out, selftest=True)
