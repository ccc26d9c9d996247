"""A walk through the README's commands, as a new user types them, asserting the CLI keeps its word (issue 14):
common flags, honest reports, names/shapes/paths, the original model first, recipes, next steps."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DIGITS, ROOT, run_cli

BENCH = ("--bench-time", "0.2")
DATA = ("--calib", str(DIGITS / "calib.npz"), "--eval", str(DIGITS / "eval.npz"))
LEAKS = ("Please consider to run pre-processing", "is out-of-range for weight", "torchvision is not installed",
         "Traceback")
SHIPPED = ("manifest.json", "README.md", "report.json", "report.md", "report.html")


def _no_host_paths(bundle: Path, *roots: Path) -> None:
    """No absolute path of the packing host in any file that ships."""
    for name in SHIPPED:
        text = (bundle / name).read_text(encoding="utf-8")
        for root in {*roots, ROOT, Path.home()}:
            assert str(root) not in text, f"{name} names {root}"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The README's quickstart pack (the digits sample for cpu-x86), with its terminal output."""
    out = tmp_path_factory.mktemp("walk") / "dist" / "digits"
    p = run_cli("pack", str(DIGITS / "model.onnx"), "--target", "cpu-x86", *DATA, "--out", str(out), *BENCH)
    return out, p


def test_version_and_common_flags():
    assert run_cli("--version").stdout.startswith("edgepack ")
    for args in (("targets", "--json"), ("doctor", "--json"), ("inspect", str(DIGITS / "model.onnx"), "--json")):
        json.loads(run_cli(*args, "-q").stdout)
    p = run_cli("inspect", str(DIGITS / "model.onnx"), "-v")
    assert "input" in p.stdout


def test_pack_prints_table_choice_next_steps_and_warnings_once(sample):
    out, p = sample
    rows = [line for line in p.stdout.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip().removesuffix(" ★") == "original", "the original model is the first row"
    assert "vs original" in p.stdout
    chosen = next(line for line in p.stdout.splitlines() if line.startswith("chosen:"))
    assert "1 point" in chosen and "budget 0.0100" not in chosen
    steps = p.stdout.split("next steps:")[1].strip().splitlines()
    assert [s.strip()[:2] for s in steps] == ["1.", "2.", "3."]
    assert str(out / "report.html") in steps[0] and f"{out / 'run.py'} --selftest" in steps[1] and "scp -r" in steps[2]
    for leak in LEAKS:
        assert leak not in p.stderr
    warn_lines = [line for line in p.stderr.splitlines() if line.startswith("  - ") or line.startswith("warning:")]
    assert len(warn_lines) == len(set(warn_lines)), "each warning once"
    if warn_lines:  # at the end, together: no log line after the first warning
        tail = p.stderr.split(warn_lines[0])[1]
        assert "INFO" not in tail


def test_shipped_files_name_shape_and_paths(sample):
    out, _ = sample
    m = json.loads((out / "manifest.json").read_text())
    assert m["name"] == "digits" and m["source"]["path"] == "model.onnx"
    assert m["outputs"][0]["shape"] == ["batch", 10]
    readme = (out / "README.md").read_text()
    assert readme.startswith("# digits for cpu-x86") and "floor(" not in readme and "[batch, 10]" in readme
    _no_host_paths(out, out.parent.parent)
    md = (out / "report.md").read_text()
    assert "- **Target file:** cpu-x86.toml (shipped with edgepack)" in md and "- **Model:** model.onnx" in md
    assert "Accuracy and fidelity (vs the original)" in md and "→ —" not in md
    first = next(line for line in md.splitlines() if line.startswith("| ") and "candidate" not in line
                 and not line.startswith("|---"))
    assert first.startswith("| original ")


def test_bundle_runs_verifies_and_profiles(sample, tmp_path):
    out, _ = sample
    r = subprocess.run([sys.executable, str(out / "run.py"), "--selftest"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(DIGITS / "eval.npz") as z:
        np.savez(tmp_path / "x.npz", input=z["x"][:4])
    r = subprocess.run([sys.executable, str(out / "run.py"), "--input", str(tmp_path / "x.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.match(r"logits: float32 \[4, 10\], min .* top-1 of the first 4: \[", r.stdout), r.stdout
    assert json.loads(run_cli("verify", str(out), "--json").stdout)["files"] > 0
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes(b"x" + (broken / "model.onnx").read_bytes()[1:])
    p = run_cli("verify", str(broken), "--json", check=False)
    assert p.returncode == 1 and json.loads(p.stdout)["exit_code"] == 1 and "model.onnx" in json.loads(p.stdout)["error"]
    prof = json.loads(run_cli("profile", str(out), "--time", "0.2", "--json").stdout)
    assert prof["latency"]["p50"] > 0


def test_targets_and_compare(sample, tmp_path):
    out, _ = sample
    p = run_cli("targets")
    assert all("…" not in line.split("  ")[0] for line in p.stdout.splitlines())
    c = run_cli("report", "compare", str(out / "report.json"), "--out", str(tmp_path / "cmp"))
    assert "wrote:" in c.stdout and str(tmp_path / "cmp" / "compare.html") in c.stdout
    j = json.loads(run_cli("report", "compare", str(out / "report.json"), "--out", str(tmp_path / "c2"), "--json").stdout)
    assert j["written"][1].endswith("compare.html")
    d = run_cli("report", "compare", str(out / "report.json"), cwd=tmp_path)  # the default --out: ./compare
    assert "compare/compare.md" in d.stdout and (tmp_path / "compare" / "compare.html").exists()


def test_recipe_names_what_it_plans_for(tmp_path):
    (tmp_path / "a").mkdir()
    run_cli("pack", str(DIGITS / "model.onnx"), *DATA, "--precision", "fp32", "--max-drop", "0.5", "--dry-run",
            "--save-recipe", str(tmp_path / "a" / "r.toml"))
    p = run_cli("pack", "--recipe", "a/r.toml", "--dry-run", cwd=tmp_path)  # no model given: the recipe's
    model = re.search(r"^model: (.*)$", p.stdout, re.M).group(1)
    assert (tmp_path / model).resolve() == (DIGITS / "model.onnx").resolve(), p.stdout  # relative to the recipe
    assert "budget: 0.5 points" in p.stdout and "digits sample" not in p.stdout
    bad = run_cli("pack", "--precision", "int9", "--dry-run", check=False)
    assert bad.returncode == 1 and "choose from fp32" in bad.stderr and "precisions.0" not in bad.stderr


def test_factory_with_out_has_a_name(tmp_path):
    work = tmp_path / "mnist8"
    work.mkdir()
    for f in ("model.py", "weights.pt"):
        shutil.copy(DIGITS / f, work / f)
    p = run_cli("pack", "model.py:build", "--weights", "weights.pt", *DATA, "--precision", "fp32", "--out", "out",
                *BENCH, cwd=work)
    for leak in LEAKS:
        assert leak not in p.stderr
    m = json.loads((work / "out" / "manifest.json").read_text())
    assert m["name"] == "mnist8" and (work / "out" / "README.md").read_text().startswith("# mnist8 for cpu-x86")
    assert m["source"]["path"] == "model.py"
    for name in SHIPPED:  # symbolic dims as written, in every shipped file
        assert "floor(" not in (work / "out" / name).read_text(encoding="utf-8"), name
    _no_host_paths(work / "out", work)


def test_structured_pruning_report_measures_the_original(tmp_path):
    out = tmp_path / "pruned"
    run_cli("pack", str(DIGITS / "model.py") + ":build", "--weights", str(DIGITS / "weights.pt"), "--structured-prune",
            "0.5", "--train", str(DIGITS / "train.npz"), "--epochs", "1", *DATA, "--precision", "fp32", "--out",
            str(out), *BENCH)
    md = (out / "report.md").read_text()
    assert "Accuracy and fidelity (vs the original)" in md and "params_after" not in md
    assert "- **Parameters before → after:**" in md and "before structured pruning" in md
    r = json.loads((out / "report.json").read_text())
    original = next(c for c in r["candidates"] if c["name"] == "original")
    assert original["latency"] and original["latency"]["p50"] > 0, "the unpruned model is measured"


def test_absent_hardware_report_says_so(tmp_path):
    out = tmp_path / "cuda"
    run_cli("pack", str(DIGITS / "model.onnx"), "--target", "nvidia-cuda", *DATA, "--out", str(out), *BENCH)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "→ —" not in md and "CUDAExecutionProvider not available on this host" in md
    assert "latency not measured on this host" in html or 'class="box"' in html
    latency_svg = html.split('id="plot-latency"')[1].split("</svg>")[0]
    assert "not measured" in latency_svg
    p = run_cli("profile", str(out), "--time", "0.2", check=False)
    if p.returncode:  # the hint names a flag profile has
        flags = set(re.findall(r"--[a-z-]+", p.stderr))
        assert flags <= {"--provider", "--batch", "--time", "--warmup", "--threads", "--out", "--json"}, p.stderr


def test_pt2_pack_keeps_torch_logs_quiet(tmp_path):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("digits_model", DIGITS / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.build()
    net.load_state_dict(torch.load(DIGITS / "weights.pt", weights_only=True))
    torch.export.save(torch.export.export(net.eval(), (torch.zeros(1, 1, 8, 8),)), tmp_path / "digits.pt2")
    p = run_cli("pack", str(tmp_path / "digits.pt2"), *DATA, "--precision", "fp32", "--out", str(tmp_path / "b"),
                *BENCH, isolated=True)
    for leak in LEAKS:
        assert leak not in p.stderr
    assert not re.search(r"^[WE]\d{4} ", p.stderr, re.M), p.stderr  # torch's own log format
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["name"] == "digits"


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="chromium not installed")
@pytest.mark.parametrize("width", [1280, 1920])
def test_sample_report_fits_the_window(sample, tmp_path, width):
    from tests.e2e.test_report_browser import MEASURE, _chromium

    out, _ = sample
    page = tmp_path / "measure.html"
    page.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"),
                    encoding="utf-8")
    res = _chromium(tmp_path, f"--window-size={width},2000", "--dump-dom", page.as_uri())
    got = json.loads(re.search(r"<title>M (\{.*?\})</title>", res.stdout).group(1))
    assert got["page"] <= got["view"] and all(c <= 0 for c in got["cut"]) and got["overlaps"] == 0, got
