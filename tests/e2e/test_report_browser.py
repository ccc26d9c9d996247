"""report.html opened in headless Chromium: the DOM has the four plots with their shapes, and it renders."""
from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from edgepack.report.document import write_reports
from edgepack.types import CandidateResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def _make_report():
    # the hand-built report of the unit tests (one measured int8, fp32, an unmeasured GPU one, one failed)
    path = Path(__file__).parents[1] / "unit" / "test_report.py"
    spec = importlib.util.spec_from_file_location("report_cases", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_report()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def html_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_reports(_make_report(), out)
    return out / "report.html"


def _svg(dom: str, plot_id: str) -> str:
    m = re.search(rf'<svg[^>]*id="{plot_id}".*?</svg>', dom, re.S)
    assert m, f"{plot_id} missing from the rendered DOM"
    return m.group(0)


def test_dom_has_four_plots_with_shapes(html_file, tmp_path):
    res = _chromium(tmp_path, "--dump-dom", html_file.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert dom.count("<svg") == 4
    latency = _svg(dom, "plot-latency")
    assert latency.count('class="box"') == 2 and latency.count("<circle") == 80  # 40 samples x 2 measured
    assert "not measured: CUDAExecutionProvider not available on this host" in latency
    tradeoff = _svg(dom, "plot-tradeoff")
    assert tradeoff.count("<circle") == 3 and 'class="pareto"' in tradeoff and "(chosen)" in tradeoff
    assert _svg(dom, "plot-size").count('class="bar"') == 6
    ops = _svg(dom, "plot-ops")
    assert ops.count('class="bar"') == 4 and "QLinearConv" in ops
    assert "onnxruntime-int8 ★" in dom  # the tables made it through the parser


def test_screenshot_is_a_real_png(html_file, tmp_path):
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2600", "--hide-scrollbars",
                    html_file.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 2600)
    assert len(data) > 50_000  # a blank page compresses to a few KB; tables and plots do not


MEASURE = """<script>window.addEventListener('load', () => {
  const d = document.documentElement;
  const cut = [...document.querySelectorAll('.scroll')].map(e => e.scrollWidth - e.clientWidth);
  const boxes = [...document.querySelectorAll('#plot-tradeoff text.label')].map(t => t.getBoundingClientRect());
  let overlaps = 0;
  boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) overlaps++; }));
  document.title = 'M ' + JSON.stringify({page: d.scrollWidth, view: window.innerWidth, cut, labels: boxes.length,
                                          overlaps});
});</script>"""


def _tied_report():
    """Six candidates with one accuracy and nearly one latency: the labels that used to pile up."""
    from dataclasses import replace

    r = _make_report()
    int8 = r.candidates[0]
    ties = tuple(replace(int8, name=f"ort-cpu-int8-variant-{i}", latency=replace(int8.latency, p50=1.25 + 0.01 * i))
                 for i in range(5))
    skipped = CandidateResult(name="ov-cpu-bf16", runtime="", device="", precision="", status="skipped",
                              error="this CPU has no bf16 instructions (AVX512-BF16 or AMX) and no other fast path")
    return replace(r, candidates=r.candidates + ties + (skipped,))


@pytest.mark.parametrize("width", [1280, 1920])
@pytest.mark.parametrize("which", ["sample", "tied"])
def test_no_horizontal_cut_and_no_overlapping_labels(tmp_path, width, which):
    import json

    out = tmp_path / "r"
    write_reports(_make_report() if which == "sample" else _tied_report(), out)
    page = out / "measure.html"
    page.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"),
                    encoding="utf-8")
    res = _chromium(tmp_path, f"--window-size={width},2000", "--dump-dom", page.as_uri())
    m = re.search(r"<title>M (\{.*?\})</title>", res.stdout)
    assert m, res.stderr[-2000:]
    got = json.loads(m.group(1))
    assert got["page"] <= got["view"], got  # nothing sticks out of the window
    assert all(c <= 0 for c in got["cut"]), got  # and no table needs its own scroll bar at this width
    assert got["labels"] >= 3 and got["overlaps"] == 0, got
