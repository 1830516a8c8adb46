"""`testbed doctor`, `testbed clean` and `testbed fidelity` as a user runs them."""

from __future__ import annotations

import csv

import pytest

from testbed.cli import main as run_cli
from testbed.net.fidelity import goodput_ok, rtt_ok
from testbed.net.probe import probe

pytestmark = pytest.mark.root


def test_doctor_names_the_mechanism_and_why(capsys):
    assert run_cli(["doctor"]) == 0
    out = capsys.readouterr().out
    caps = probe(full=False)
    for name in ("netem", "nfqueue"):  # each feature as this kernel has it
        assert f"[{'ok' if caps.ok(name) else '--'}] {name}" in out
    assert f"mechanism: {caps.mechanism}" in out  # htb+netem where netem exists, else htb+nfqueue
    assert ("RECEIVING host" if caps.mechanism == "htb+nfqueue" else "netem beneath it") in out


def test_clean_dry_run_lists_without_removing(capsys):
    assert run_cli(["clean", "--dry-run"]) == 0
    assert "testbed clean:" in capsys.readouterr().out


def test_fidelity_prints_and_saves_a_table(tmp_path, capsys):
    topo = tmp_path / "pair.yaml"
    topo.write_text("name: pair\nhosts: [h1, h2]\n"
                    "links: [{a: h1, b: h2, a_to_b: {bandwidth_mbps: 20, delay_ms: 5}, b_to_a: {delay_ms: 5}}]\n")
    assert run_cli(["fidelity", str(topo), "--out", str(tmp_path / "out"), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    mechanism = probe(full=False).mechanism
    assert "h1->h2" in out and mechanism in out
    rows = list(csv.DictReader(open(tmp_path / "out" / "fidelity.csv")))
    assert len(rows) == 1 and rows[0]["mechanism"] == mechanism and rows[0]["topology"] == "pair"
    row = rows[0]
    assert goodput_ok(float(row["goodput_ratio"])) and rtt_ok(float(row["rtt_error_ms"])), row
    (line,) = [ln for ln in out.splitlines() if ln.startswith("h1->h2")]
    assert line.endswith("ok")  # the table marks the row as within the tolerances


def test_fidelity_rejects_a_bad_topology_by_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [h1, h2]\nlinks: [{a: h1, b: h2, profile: {bandwidth: 10}}]\n")
    assert run_cli(["fidelity", str(bad)]) == 2
    assert "bad.yaml.links[0].profile.bandwidth" in capsys.readouterr().err
