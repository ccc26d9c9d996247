"""Every model format pack takes: ONNX, a Python factory + weights, TorchScript, torch.export .pt2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BENCH_TIME, DIGITS, run_cli


def _pack(model: str, out: Path, *extra: str) -> dict:
    run_cli("pack", model, "--precision", "fp32", "--eval", str(DIGITS / "eval.npz"), "--out", str(out),
            "--bench-time", BENCH_TIME, *extra)
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("digits_model", DIGITS / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.build()
    m.load_state_dict(torch.load(DIGITS / "weights.pt", weights_only=True))
    m.eval()
    d = tmp_path_factory.mktemp("torch")
    x = torch.zeros(2, 1, 8, 8)
    torch.jit.save(torch.jit.trace(m, x), str(d / "digits.ts"))
    prog = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(prog, str(d / "digits.pt2"))
    return d


def _accuracy(bundle: Path) -> float:
    return json.loads((bundle / "report.json").read_text())["candidates"][0]["fidelity"]["accuracy"]


def test_factory_with_weights_keeps_dynamic_batch(tmp_path):
    m = _pack(f"{DIGITS / 'model.py'}:build", tmp_path / "f", "--weights", str(DIGITS / "weights.pt"))
    assert m["source"]["format"] == "torch"
    assert m["inputs"][0]["shape"][0] not in (1, None)  # a named dynamic batch dimension
    assert _accuracy(tmp_path / "f") >= 0.97


def test_torchscript(torch_files, tmp_path):
    _pack(str(torch_files / "digits.ts"), tmp_path / "ts", "--input-shape", "input=1,1,8,8")
    assert _accuracy(tmp_path / "ts") >= 0.97


def test_torch_export_program(torch_files, tmp_path):
    _pack(str(torch_files / "digits.pt2"), tmp_path / "pt2")
    assert _accuracy(tmp_path / "pt2") >= 0.97


def test_inspect_reports_ops_params_and_metadata():
    p = run_cli("inspect", str(DIGITS / "model.onnx"), "--json")
    info = json.loads(p.stdout)
    assert info["inputs"][0]["name"] == "input" and info["outputs"][0]["name"] == "logits"
    assert info["parameters"] > 50_000
    ops = info.get("ops") or info.get("op_histogram")
    names = set(ops) if isinstance(ops, dict) else {o["op"] for o in ops}
    assert "Conv" in names
    assert info["metadata"]["labels"].startswith("0,1")


def test_help_does_not_import_torch_or_openvino():
    import subprocess
    import sys

    code = "import sys, edgepack.cli; print(sorted(m for m in ('torch', 'openvino', 'onnxruntime', 'nncf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
