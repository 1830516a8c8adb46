"""report.html: written by every run, remade by `testbed report`, opened in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.experiment import api
from testbed.experiment.htmlreport import write_html
from tests.experiment.helpers import tiny

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                   "chromium, ~290 MB with its libraries): the page is opened in a browser only "
                                   "where it is")
CONSOLE = re.compile(r":CONSOLE[^\]]*\] (.*)")


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    exp = api.experiment(tiny(methods=["single", "sequence_parallel", {"name": "astra", "params": {"groups": 1,
                                                                                                 "codebook_size": 16}}],
                              backend="sim", repetitions=2, sweep={"bandwidth_mbps": [10, 100], "delay_ms": [0, 5]}))
    return api.run(exp, out=d / "run", settings={"calibration": str(d / "calibration")})


def _browse(page: Path, shot: Path) -> list[str]:
    """Open ``page`` in headless chromium, screenshot it; the console messages it logged."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--enable-logging=stderr", "--v=0", "--window-size=1280,4000", f"--screenshot={shot}",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    return [m.group(1) for m in CONSOLE.finditer(r.stderr)]


def _colour_share(png: Path) -> float:
    """Share of clearly coloured pixels (tables and text are black, grey and white; plots are not)."""
    import matplotlib.image as mpimg

    rgb = mpimg.imread(png)[..., :3]
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.25).mean())


def test_every_run_writes_a_self_contained_page(sim_run):
    page = sim_run.report.read_text()
    for heading in ("What ran", "Plots", "Comparison", "Link fidelity", "Failed rows (0)", "Files"):
        assert f"<h2>{heading}" in page
    assert "<th>link bandwidth (Mbit/s)</th><th>one-way link delay (ms)</th><th>method</th>" in page
    assert page.count("<img ") == 5 and page.count('src="data:image/svg+xml;base64,') == 5  # 3 + 2 heatmaps
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page  # nothing fetched or run
    for f in ("rows.csv", "rows.parquet", "manifest.json"):
        assert f'<a href="{f}">' in page
    assert "<dt>backend</dt><dd>sim</dd>" in page and "<dt>git commit</dt>" in page


def test_failed_rows_show_their_errors(tmp_path):
    run = api.run(tiny(backend="loopback", methods=["single"], repetitions=1, warmup=0,
                       faults=[{"kind": "node_kill", "host": "h2", "at_s": 0}]), out=tmp_path / "run", plots=False)
    page = run.report.read_text()
    assert "Failed rows (1)" in page and "node unreachable or died" in page and "No plots" in page


def test_report_command_remakes_it(sim_run, tmp_path, capsys):
    sim_run.report.unlink()
    assert main(["report", str(sim_run.dir)]) == 0
    assert capsys.readouterr().out.strip() == str(sim_run.report) and sim_run.report.is_file()
    assert main(["report", str(tmp_path)]) == 2


@needs_browser
def test_the_browser_reports_console_errors(tmp_path):
    """The check below can fail: a page that logs an error is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("boom")</script></body></html>')
    assert any("boom" in m for m in _browse(page, tmp_path / "bad.png"))


@needs_browser
def test_the_page_loads_without_console_errors_and_shows_the_plots(sim_run, tmp_path):
    assert _browse(sim_run.report, tmp_path / "report.png") == []
    bare = tmp_path / "bare"  # the same run without its plots
    shutil.copytree(sim_run.dir, bare, ignore=shutil.ignore_patterns("plots"))
    assert _browse(write_html(bare), tmp_path / "bare.png") == []
    with_plots, without = _colour_share(tmp_path / "report.png"), _colour_share(tmp_path / "bare.png")
    assert with_plots > 0.01 and without < with_plots / 10, (with_plots, without)
