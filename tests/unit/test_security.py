"""Hostile files and faults (issue 13): no code runs from data, nothing leaks out of --out and the temp folder,
nothing the user owns is deleted, every read is bounded, every failure is one line.

Each test is one attack; `marker` files stand for a payload's side effect and must never appear.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack import safeio
from edgepack.bundle.manifest import is_bundle, load_manifest, replace_refusal
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle
from edgepack.errors import BundleError, DataError, EdgepackError, ModelError, StepError, TargetError
from edgepack.runner import run as runner
from tests.conftest import run_cli

RNG = np.random.default_rng(3)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = RNG.normal(size=3).astype(np.float32)
X = RNG.normal(size=(6, 4)).astype(np.float32)
DEAD_PID = 2 ** 22 + 12345  # above the usual pid_max: never a live process


def gemm(path: Path) -> Path:
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def manifest(**runtime) -> dict:
    return {"name": "gemm", "target": {"name": "cpu-x86", "description": "test"},
            "runtime": {"name": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
                        "provider_options": {}, **runtime},
            "precision": "fp32", "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
            "reference": {"rtol": 1e-4, "atol": 1e-5, "top1_min": 1.0}}


def make_bundle(tmp_path: Path, name: str = "b", **kw) -> Path:
    src = tmp_path / f"src-{name.replace('/', '-')}"
    src.mkdir(exist_ok=True)
    return write_bundle(tmp_path / name, model_files=[gemm(src / "gemm.onnx")], manifest=kw.pop("manifest", manifest()),
                        reference_inputs={"x": X}, reference_outputs=[X @ W + B], report_files=[],
                        selftest=kw.pop("selftest", False), **kw)


def rehash(bundle: Path, **edits) -> None:
    """What an attacker does after changing files: recompute every hash and the manifest's own digest."""
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(edits)
    for rel in m["files"]:
        p = bundle / rel
        m["files"][rel] = {"sha256": runner.sha256_file(p), "size": p.stat().st_size}
    m["manifest_sha256"] = runner.manifest_digest(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text and text.strip()
    return text


# ---------------------------------------------------------------- 1. nothing executes from data files

class Payload:
    """Unpickling it calls open(marker, "w"): the marker file is the payload's side effect."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pt2(path: Path, marker: Path, where: str) -> Path:
    import torch

    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    evil = io.BytesIO()
    torch.save(Payload(str(marker)) if where != "sample" else ((Payload(str(marker)),), {}), evil)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data, rel = src.read(info), info.filename.split("/", 1)[1]
            if where == "weights" and rel == "data/weights/model_weights_config.json":
                cfg = json.loads(data)
                cfg["config"]["weight"]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif where == "weights" and rel == "data/weights/weight_0":
                data = evil.getvalue()
            elif where == "sample" and rel == "data/sample_inputs/model.pt":
                data = evil.getvalue()
            z.writestr(info.filename, data)
        if where == "aoti":
            z.writestr(info.filename.split("/")[0] + "/data/aotinductor/model/model.so", b"\x7fELF")
    return path


@pytest.mark.parametrize("where", ["weights", "sample", "aoti"])
def test_pt2_payload_never_runs(tmp_path, where):
    """A .pt2 whose weights config asks for pickle, whose sample inputs are a payload, or that carries an
    AOTInductor .so: refused in one line, the payload never runs (torch would fall back to unsafe loading)."""
    from edgepack.model.load import load_model

    marker = tmp_path / "pwned"
    evil = _evil_pt2(tmp_path / "evil.pt2", marker, where)
    with pytest.raises(ModelError, match=r"evil\.pt2 is refused: .*(pickle|compiled code)") as e:
        load_model(evil)
    one_line(e)
    r = run_cli("inspect", str(evil), check=False)
    assert r.returncode == 1 and "is refused" in r.stderr and not marker.exists()


def test_clean_pt2_still_loads_and_torch_is_restored(tmp_path):
    import torch

    from edgepack.model.load import load_model

    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(ep, str(tmp_path / "ok.pt2"))
    real = torch.load
    a = load_model(tmp_path / "ok.pt2")
    assert tuple(a.example_inputs[0].shape) == (1, 2) and torch.load is real


FACTORY = ("open({marker!r}, 'w').write('imported')\nimport torch\n"
           "def build():\n    open({marker!r}, 'w').write('called')\n    return torch.nn.Linear(4, 3)\n"
           "class Net: pass\n")


@pytest.mark.parametrize("spec", ["net.py", "net.py:build"])
def test_inspect_python_never_imports_it(tmp_path, spec):
    marker = tmp_path / "pwned"
    (tmp_path / "net.py").write_text(FACTORY.format(marker=str(marker)))
    r = run_cli("inspect", str(tmp_path / spec), "--json")
    info = json.loads(r.stdout)
    assert info["format"] == "python" and info["defined"] and info["functions"] == ["build"]
    assert info["classes"] == ["Net"] and info["imports"] == ["torch"] and not marker.exists()
    r = run_cli("inspect", str(tmp_path / spec))
    assert "not imported" in r.stdout and not marker.exists()


def test_pack_dry_run_never_imports_a_factory(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "net.py").write_text(FACTORY.format(marker=str(marker)))
    r = run_cli("pack", f"{tmp_path / 'net.py'}:build", "--dry-run", "--json", "--out", str(tmp_path / "o"))
    plan = json.loads(r.stdout)
    assert plan["candidates"] and any("was not imported" in w for w in plan["warnings"])
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_verify_runs_edgepacks_runner_not_the_bundles(tmp_path):
    """run.py changed and every hash recomputed (anyone can): verify names run.py; with --allow-custom-runner
    it passes, and the self-test still runs edgepack's own runner, never the bundle's code."""
    b = make_bundle(tmp_path)
    marker = tmp_path / "pwned"
    (b / "run.py").write_text(f"open({str(marker)!r}, 'w')\n" + (b / "run.py").read_text())
    rehash(b)
    with pytest.raises(BundleError, match=r"1 problem: run\.py: differs from edgepack .*runner \(changed after "
                                          r"packing.*--allow-custom-runner") as e:
        verify_bundle(b)
    one_line(e)
    r = verify_bundle(b, allow_custom_runner=True)
    assert r["selftest"]["passed"] and r["runner"].startswith("run.py: differs") and not marker.exists()
    r = run_cli("verify", str(b), check=False)
    assert r.returncode == 1 and "run.py: differs" in r.stderr and not marker.exists()


# ---------------------------------------------------------------- 2. signed bundles

def _keys(tmp_path: Path, name: str = "key") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH))
    return priv, pub


def test_signed_bundle_verifies_with_its_key_only(tmp_path):
    priv, pub = _keys(tmp_path)
    _, other = _keys(tmp_path, "other")
    b = make_bundle(tmp_path, sign_key=priv, archive=True)
    assert (b / "signature.json").is_file() and "signature.json" not in load_manifest(b)["files"]
    r = verify_bundle(b, selftest=False, trusted_key=pub)
    assert r["signature"]["trusted"] and r["signature"]["key_id"].startswith("sha256:")
    assert verify_bundle(tmp_path / "b.tar.gz", selftest=False, trusted_key=pub)["signature"]["trusted"]
    assert verify_bundle(b, selftest=False)["signature"]["trusted"] is False  # present, not checked
    r = run_cli("verify", str(b), "--no-selftest", "--trusted-key", str(pub))
    assert "signed by trusted key sha256:" in r.stdout
    with pytest.raises(BundleError, match=r"signature\.json was not made with the trusted key") as e:
        verify_bundle(b, selftest=False, trusted_key=other)
    one_line(e)


def test_signature_fails_when_files_and_hashes_are_changed(tmp_path):
    priv, pub = _keys(tmp_path)
    b = make_bundle(tmp_path, sign_key=priv)
    (b / "README.md").write_text("deploy me, I am fine")
    rehash(b)  # integrity hashes agree again: only the signature notices
    verify_bundle(b, selftest=False)
    with pytest.raises(BundleError, match=r"failed the signature check: manifest\.json changed after it was signed"):
        verify_bundle(b, selftest=False, trusted_key=pub)


def test_unsigned_bundle_and_bad_keys_are_one_line(tmp_path):
    priv, pub = _keys(tmp_path)
    b = make_bundle(tmp_path)
    with pytest.raises(BundleError, match=r"is not signed: signature\.json is missing"):
        verify_bundle(b, selftest=False, trusted_key=pub)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BundleError, match=r"signing key .*junk\.pem is not a PEM or OpenSSH private key") as e:
        make_bundle(tmp_path, name="c", sign_key=junk)
    one_line(e)
    assert not (tmp_path / "c").exists()
    with pytest.raises(BundleError, match=r"trusted key .*key\.pem is not a PEM or OpenSSH public key"):
        verify_bundle(b, selftest=False, trusted_key=priv)
    r = run_cli("verify", str(b), "--trusted-key", str(tmp_path / "nope.pub"), check=False)
    assert r.returncode == 1 and "trusted key" in r.stderr and "not found" in r.stderr
    (b / "signature.json").symlink_to(tmp_path / "junk.pem")
    with pytest.raises(BundleError, match=r"signature\.json is a symlink"):
        verify_bundle(b, selftest=False, trusted_key=pub)


def test_pack_api_checks_the_signing_key_before_any_work(tmp_path):
    from edgepack.api import pack

    with pytest.raises(BundleError, match="signing key .* not found"):
        pack(None, out=tmp_path / "o", sign_key=tmp_path / "missing.pem")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 3. paths from files stay confined

@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".hidden", "x" * 80])
def test_target_name_must_be_plain(tmp_path, name):
    f = tmp_path / "t.toml"
    f.write_text(f'extends = "cpu-x86"\nname = {json.dumps(name)}\n')
    with pytest.raises(TargetError, match=r"t\.toml: name: .*not a plain name") as e:
        from edgepack.target import load_target

        load_target(f)
    one_line(e)


@pytest.mark.parametrize("parent, why", [("/etc/hosts.toml", "only .toml files in"),
                                         ("../outside.toml", "only .toml files in"),
                                         ("sub/../../outside.toml", "only .toml files in"),
                                         ("../../etc/passwd", "not a target name"),
                                         ("data.json", "unknown target 'data.json'")])
def test_extends_only_reaches_the_search_path(tmp_path, monkeypatch, parent, why):
    from edgepack.target import load_target

    monkeypatch.chdir(tmp_path)  # data.json exists here: a bare name must still not read it

    (tmp_path / "outside.toml").write_text('description = "x"\nruntimes = [{runtime = "onnxruntime"}]\n'
                                           'precisions = ["fp32"]\n')
    (tmp_path / "data.json").write_text("{}")
    d = tmp_path / "user"
    d.mkdir()
    f = d / "t.toml"
    f.write_text(f"extends = {json.dumps(parent)}\n")
    with pytest.raises(TargetError, match=rf"t\.toml: extends = .*{why}") as e:
        load_target(f)
    one_line(e)


def test_extends_sibling_and_shipped_still_work(tmp_path):
    from edgepack.target import load_target

    (tmp_path / "base.toml").write_text('extends = "cpu-x86"\ndescription = "base"\n')
    (tmp_path / "t.toml").write_text('extends = "base.toml"\n')
    assert load_target(tmp_path / "t.toml").description == "base"


@pytest.mark.parametrize("key, value", [("trt_engine_cache_path", "../../outside"), ("cache_dir", "{tmp}/abs"),
                                        ("backend_path", "{tmp}/evil.so")])
def test_provider_option_paths_stay_in_the_bundle(tmp_path, key, value):
    from edgepack.target import load_target

    value = value.format(tmp=tmp_path)

    f = tmp_path / "t.toml"
    f.write_text(f'extends = "cpu-x86"\n[[runtimes]]\nruntime = "onnxruntime"\nprovider = "CPUExecutionProvider"\n'
                 f'[runtimes.provider_options]\n{key} = {json.dumps(value)}\n')
    with pytest.raises(TargetError, match=rf"provider_options\.{key} = "):
        load_target(f)
    # a hand-edited manifest (hashes recomputed) cannot make the runner create folders outside the bundle
    b = make_bundle(tmp_path)
    m = load_manifest(b)
    rehash(b, runtime={**m["runtime"], "provider_options": {key: value}})
    with pytest.raises(runner.RunError, match=rf"provider option {key}="):
        runner.open_model(b)
    assert not (tmp_path / "outside").exists() and not (tmp_path / "abs").exists()


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path):
    from edgepack.model.load import load_model

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(12, np.float32).tobytes())
    d = tmp_path / "m"
    d.mkdir()
    model = onnx.load(str(gemm(d / "gemm.onnx")))
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("length", "48")):
        w.external_data.add(key=k, value=v)
    onnx.save(model, str(d / "gemm.onnx"))
    with pytest.raises(ModelError, match=r"keeps its weights in '\.\./secret\.bin', outside the model's folder"):
        load_model(d / "gemm.onnx")


def test_reference_paths_in_the_manifest_stay_listed(tmp_path):
    b = make_bundle(tmp_path)
    np.savez(tmp_path / "elsewhere.npz", x=X)
    rehash(b, reference={**load_manifest(b)["reference"], "inputs": "../elsewhere.npz"})
    with pytest.raises(runner.RunError, match=r"reference inputs '\.\./elsewhere\.npz' is not listed"):
        runner.selftest(b)


def test_quant_pre_process_writes_nothing_in_the_working_directory(tmp_path, monkeypatch):
    from edgepack.steps.quantize import preprocess
    from edgepack.types import Artifact, ModelFormat

    cwd, out = tmp_path / "cwd", tmp_path / "step"
    cwd.mkdir()
    out.mkdir()
    model = gemm(tmp_path / "gemm.onnx")
    monkeypatch.chdir(cwd)
    seen = []
    from onnxruntime.quantization import quant_pre_process as real

    def spy(*a, **k):
        seen.append(Path.cwd())
        Path("sym_shape_infer_temp.onnx").write_bytes(b"what ORT leaves behind")  # as ORT does on big graphs
        return real(*a, **k)

    monkeypatch.setattr("onnxruntime.quantization.quant_pre_process", spy)
    pre, _ = preprocess(Artifact(path=Path(os.path.relpath(model)), format=ModelFormat.ONNX), out)
    assert pre.is_file() and list(cwd.iterdir()) == [] and seen == [out.absolute()] and Path.cwd() == cwd


def test_runtimes_leave_no_telemetry_in_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = ("import edgepack, onnxruntime as ort, sys; "
            "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run([sys.executable, "-c", code, str(gemm(tmp_path / "g.onnx"))], env={**env, "HOME": str(home)},
                   check=True, timeout=120)
    assert [p for p in home.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- 4. --force deletes nothing it does not own

def test_force_refuses_a_lookalike_and_a_bundle_with_extra_files(tmp_path):
    fake = tmp_path / "b"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"schema_version": 2, "files": {}, "runtime": {}}))
    (fake / "thesis.tex").write_text("years of work")
    why = replace_refusal(fake)
    assert why and "thesis.tex" in why and "--force never deletes them" in why
    with pytest.raises(BundleError, match=r"holds files its manifest does not list \(thesis\.tex\)"):
        make_bundle(tmp_path, force=True)
    assert (fake / "thesis.tex").read_text() == "years of work"
    r = run_cli("pack", "--out", str(fake), "--force", check=False)
    assert r.returncode == 1 and "thesis.tex" in r.stderr and (fake / "thesis.tex").exists()


def test_force_refuses_a_bundle_that_does_not_verify(tmp_path):
    b = make_bundle(tmp_path)
    (b / "README.md").write_text("edited by hand")
    with pytest.raises(BundleError, match=r"does not verify as an edgepack bundle \(README\.md: size"):
        make_bundle(tmp_path, force=True)
    assert (b / "README.md").read_text() == "edited by hand" and not is_bundle(b)


# ---------------------------------------------------------------- 5. bounded reads

@pytest.fixture
def fifo(tmp_path) -> Path:
    p = tmp_path / "pipe.onnx"
    os.mkfifo(p)
    return p


def test_fifo_and_devices_are_refused_without_blocking(tmp_path, fifo):
    from edgepack.model.load import load_model
    from edgepack.target import load_target

    with pytest.raises(ModelError, match=r"pipe\.onnx is a FIFO, not a regular file"):
        load_model(fifo)
    with pytest.raises(ModelError, match=r"/dev/zero is a device, not a regular file"):
        load_model("/dev/zero")
    t = tmp_path / "t.toml"
    os.mkfifo(t)
    with pytest.raises(TargetError, match="is a FIFO"):
        load_target(t)
    with pytest.raises(DataError, match="is a FIFO"):
        safeio.load_arrays(fifo, "calibration data", DataError)
    with pytest.raises(runner.InputError, match="not a regular file"):
        runner.load_inputs(fifo, [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}])
    r = run_cli("pack", str(fifo), "--dry-run", check=False, timeout=60)
    assert r.returncode == 1 and "FIFO" in r.stderr


def test_model_over_the_cap_names_the_variable(tmp_path, monkeypatch):
    from edgepack.model.load import load_model

    model = gemm(tmp_path / "g.onnx")
    monkeypatch.setenv("EDGEPACK_MAX_MODEL_MB", "0.0001")
    with pytest.raises(ModelError, match=r"is 0\.2 kB, over edgepack's 0\.1 kB limit for model files \(set EDGEPACK_MAX_MODEL_MB"):
        load_model(model)
    monkeypatch.setenv("EDGEPACK_MAX_MODEL_MB", "lots")
    with pytest.raises(EdgepackError, match="EDGEPACK_MAX_MODEL_MB='lots': expected a number"):
        load_model(model)


def _bomb(path: Path, mb: int) -> Path:
    """An .npz of `mb` MB of zeros, deflated to a few kB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("x.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (mb << 18,)})
        for _ in range(mb):
            f.write(bytes(1 << 20))
    return path


def test_npz_bomb_is_refused_before_unpacking(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path / "bomb.npz", 64)
    assert bomb.stat().st_size < 200_000
    monkeypatch.setenv("EDGEPACK_MAX_DATA_MB", "16")
    with pytest.raises(DataError, match=r"would unpack to 64\.0 MB .* decompression bomb") as e:
        safeio.load_arrays(bomb, "calibration data", DataError)
    one_line(e)
    with pytest.raises(runner.InputError, match="would unpack to 64 MB, over the 16 MB limit"):
        runner.load_inputs(bomb, [{"name": "x", "dtype": "float32", "shape": ["batch"]}])
    monkeypatch.setenv("EDGEPACK_MAX_DATA_MB", "128")  # raised: the same file loads
    assert safeio.load_arrays(bomb, "calibration data", DataError)["x"].shape == (64 << 18,)


def test_forged_npy_header_is_refused_before_allocating(tmp_path):
    forged = tmp_path / "forged.npy"
    with open(forged, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (1 << 20, 1 << 20, 1 << 10)})
        f.write(bytes(64))
    with pytest.raises(DataError, match=r"declares an array of shape \[1048576, 1048576, 1024\] .* truncated or forged"):
        safeio.load_arrays(forged, "calibration data", DataError)
    with pytest.raises(runner.InputError, match="declares more data than it holds"):
        runner.load_inputs(forged, [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}])
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"holds Python objects \(an object array\)"):
        safeio.load_arrays(obj, "calibration data", DataError)
    good = tmp_path / "good.npy"
    np.save(good, X)
    arr = safeio.load_arrays(good, "calibration data", DataError)
    assert isinstance(arr, np.memmap) and np.array_equal(arr, X)  # streamed from disk, not read whole


@pytest.mark.parametrize("content, match", [(b"\x89PNG\r\n\x1a\n\x00\x00binary", "is not UTF-8 text"),
                                            (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML: nested too deeply")])
def test_binary_and_deep_toml_are_one_line(tmp_path, content, match):
    from edgepack.recipe import load_recipe
    from edgepack.target import load_target

    f = tmp_path / "t.toml"
    f.write_bytes(content)
    with pytest.raises(TargetError, match=match) as e:
        load_target(f)
    one_line(e)
    with pytest.raises(StepError, match=match):
        load_recipe(f)


def test_json_readers_refuse_deep_nesting_duplicates_and_size(tmp_path, monkeypatch):
    from edgepack.report.json import read_json

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EdgepackError, match="not valid JSON: nested too deeply"):
        read_json(deep)
    dup = tmp_path / "dup.json"
    dup.write_text('{"a": 1, "a": 2}')
    with pytest.raises(EdgepackError, match="duplicate key 'a'"):
        read_json(dup)
    monkeypatch.setenv("EDGEPACK_MAX_FILE_MB", "0.00001")
    with pytest.raises(EdgepackError, match=r"over edgepack's 0\.0 kB limit for text files \(JSON, TOML\)"):
        read_json(dup)


def test_tar_bomb_is_refused_before_extracting(tmp_path, monkeypatch):
    from edgepack.bundle.archive import safe_extract

    arch = tmp_path / "bomb.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        info = tarfile.TarInfo("b/manifest.json")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(bytes(8 << 20)))
    monkeypatch.setenv("EDGEPACK_MAX_ARCHIVE_MB", "1")
    with pytest.raises(BundleError, match=r"refused to extract .* more than 1 MB of files \(a decompression bomb"):
        safe_extract(arch, tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- 6. text is text, OS errors are user errors

@pytest.mark.parametrize("name", ["x[/]y.onnx", "[bold]loud[/bold].onnx", "esc\x1b[31mred.onnx"])
def test_error_text_is_never_markup_or_escapes(tmp_path, name):
    r = run_cli("inspect", str(tmp_path / name), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "\x1b" not in r.stderr
    shown = name.replace("\x1b", "\\x1b")
    assert f"{tmp_path / shown} not found" in r.stderr


def test_inspect_renders_hostile_tensor_names_literally(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["[/]in"], ["\x1b]0;owned\x07[bold]out"])], "g",
                          [helper.make_tensor_value_info("[/]in", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("\x1b]0;owned\x07[bold]out", TensorProto.FLOAT, [1, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "m.onnx"))
    r = run_cli("inspect", str(tmp_path / "m.onnx"))
    assert "input [/]in" in r.stdout and "[bold]out" in r.stdout and "\x1b" not in r.stdout and "\x07" not in r.stdout


@pytest.mark.parametrize("err, match", [(OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), "disk full"),
                                        (PermissionError(errno.EACCES, "Permission denied", "/x"), "permission denied"),
                                        (OSError(errno.EROFS, "Read-only file system", "/ro"), "read-only file system")])
def test_os_errors_are_exit_1_one_line(tmp_path, monkeypatch, err, match):
    def boom(*a, **k):
        raise err

    monkeypatch.setattr("edgepack.api.verify", boom)
    r = run_cli("verify", str(tmp_path), check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {match}") and r.stderr.count("\n") == 1


def test_say_error_keeps_one_line():
    from edgepack.cli.common import plain

    assert plain("a\nb\r\nc\x1b[2Jd\x07") == "a b c\\x1b[2Jd\\x07"


# ---------------------------------------------------------------- run.py

def _run_py(bundle: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(bundle / "run.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd or bundle)


@pytest.mark.parametrize("args", [["--selftest", "--batch", "-5"], ["--benchmark", "--batch", "-5"],
                                  ["--benchmark", "--time", "0"], ["--benchmark", "--iterations", "0"],
                                  ["--benchmark", "--warmup", "-1"], ["--selftest", "--threads", "-2"],
                                  ["--benchmark", "--time", "nan"]])
def test_run_py_rejects_bad_numbers(tmp_path, args):
    """Every numeric flag is checked whatever the mode (--selftest --batch -5 used to pass with exit 0)."""
    b = make_bundle(tmp_path)
    r = _run_py(b, *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert args[1] in r.stderr and "Traceback" not in r.stderr


def test_run_py_output_unwritable_is_one_line_and_atomic(tmp_path, monkeypatch):
    b = make_bundle(tmp_path)
    np.savez(tmp_path / "in.npz", x=X)
    r = _run_py(b, "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "no" / "out.npz"))
    assert r.returncode == 1 and r.stderr.startswith("error: could not write") and "Traceback" not in r.stderr
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "out.npz").mkdir()  # a folder where the file should go
    r = _run_py(b, "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "ro" / "out.npz"))
    assert r.returncode == 1 and "could not write" in r.stderr and "Traceback" not in r.stderr
    # a failure half-way through writing leaves the old output as it was and no temp file
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous result")

    def half(f, arrays):
        f.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "save_npz", half)
    assert runner.main(["--bundle", str(b), "--input", str(tmp_path / "in.npz"), "--output", str(out)]) == 1
    assert out.read_bytes() == b"previous result" and sorted(p.name for p in tmp_path.iterdir()
                                                             if p.name.startswith(".")) == []


# ---------------------------------------------------------------- 7. interruptions and leftovers

def test_interrupt_during_the_rename_still_writes_the_whole_bundle(tmp_path, monkeypatch):
    from edgepack.bundle import write
    from edgepack.tempdirs import WRITTEN

    real = os.replace

    def replace_then_sigterm(a, b):
        real(a, b)
        if Path(b) == tmp_path / "b":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives right after the rename

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(write.os, "replace", replace_then_sigterm)
    old = signal.signal(signal.SIGTERM, interrupt)
    WRITTEN.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            make_bundle(tmp_path, archive=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert WRITTEN == [tmp_path / "b"] and (tmp_path / "b.tar.gz").is_file()
    verify_bundle(tmp_path / "b", selftest=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_message_matches_the_disk(capsys):
    import typer

    from edgepack.cli.common import boundary
    from edgepack.tempdirs import WRITTEN

    def written():
        WRITTEN.append(Path("/x/bundle"))
        raise KeyboardInterrupt

    def nothing():
        raise KeyboardInterrupt

    for fn, text in ((written, "interrupted after the bundle was written: /x/bundle is complete and verified"),
                     (nothing, "interrupted; nothing was written")):
        with pytest.raises(typer.Exit) as e:
            boundary(fn)()
        assert e.value.exit_code == 130 and text in capsys.readouterr().err


def test_leftovers_of_killed_runs_are_swept(tmp_path, monkeypatch):
    """What kill -9 leaves (temp folders, .NAME.tmp-*, the old bundle moved aside) is cleaned by the next run;
    folders of live runs are left alone."""
    import tempfile

    from edgepack.tempdirs import make_temp

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead = [tmp_path / "tmp" / f"edgepack-{k}-{DEAD_PID}-abc" for k in ("work", "verify", "selftest", "mp")]
    live = tmp_path / "tmp" / f"edgepack-work-{os.getppid()}-abc"
    for d in [*dead, live]:
        (d / "sub").mkdir(parents=True)
    new = make_temp("work")
    assert new.name.startswith(f"edgepack-work-{os.getpid()}-") and live.exists()
    assert not any(d.exists() for d in dead)
    out = tmp_path / "dist"
    out.mkdir()
    (out / f".b.tmp-{DEAD_PID}-0123abcd").mkdir()
    (out / f".b.tar.gz.tmp-{DEAD_PID}-0123abcd").write_bytes(b"half")
    (out / f".old.old-{DEAD_PID}-0123abcd").mkdir()  # killed between moving `old` aside and the rename
    (out / f".old.old-{DEAD_PID}-0123abcd" / "manifest.json").write_text("{}")
    (out / f".mine.tmp-{os.getppid()}-0123abcd").mkdir()
    make_bundle(tmp_path, name="dist/b")
    assert sorted(p.name for p in out.iterdir()) == [f".mine.tmp-{os.getppid()}-0123abcd", "b", "old"]
    assert (out / "old" / "manifest.json").read_text() == "{}"


# ---------------------------------------------------------------- 8. verify: strict manifests, nothing unlisted

def test_verify_rejects_duplicate_keys_symlinked_manifest_and_unlisted_files(tmp_path):
    b = make_bundle(tmp_path)
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text.rstrip().rstrip("}") + ',\n  "precision": "fp16"\n}\n')
    with pytest.raises(BundleError, match=r"manifest\.json is not readable JSON \(duplicate key 'precision'\)"):
        verify_bundle(b, selftest=False)
    (b / "manifest.json").write_text(text)
    outside = tmp_path / "m.json"
    outside.write_text(text)
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"manifest\.json is a symlink"):
        verify_bundle(b, selftest=False)
    assert not is_bundle(b)
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(text)
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"\x00")
    with pytest.raises(BundleError, match=r"__pycache__/run\.cpython-311\.pyc: not listed in manifest\.json"):
        verify_bundle(b, selftest=False)


def test_listed_file_behind_a_symlinked_folder_is_caught(tmp_path):
    b = make_bundle(tmp_path)
    real = tmp_path / "elsewhere"
    (b / "reference").rename(real)
    (b / "reference").symlink_to(real)
    with pytest.raises(BundleError, match=r"reference/inputs\.npz: is a symlink"):
        verify_bundle(b, selftest=False)
