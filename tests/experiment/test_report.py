"""The paper comparison: speed-ups and the compute + bytes/bandwidth estimate from result rows."""

import math

import pandas as pd

from testbed.experiment.report import main, summarize, to_markdown


def _rows() -> pd.DataFrame:
    base = dict(status="ok", bytes_on_wire=0, bytes_sent=0, bytes_sent_max_rank=0, comm_s=0.0)
    rows = []
    for rep, jitter in enumerate((0.0, 0.2, -0.2)):  # medians must ignore the spread
        rows += [
            dict(base, method="single", label="single", bandwidth_mbps=10.0, latency_s=2.0 + jitter, compute_s=2.0),
            dict(base, method="sequence_parallel", label="sp", bandwidth_mbps=10.0, latency_s=4.0 + jitter,
                 compute_s=0.5, comm_s=3.5, bytes_sent=3_000_000, bytes_sent_max_rank=1_000_000,
                 bytes_on_wire=3_150_000),
            dict(base, method="astra", label="astra G=1", bandwidth_mbps=10.0, latency_s=1.0 + jitter,
                 compute_s=0.8, comm_s=0.2, bytes_sent=30_000, bytes_sent_max_rank=10_000, bytes_on_wire=60_000),
        ]
    rows.append(dict(base, method="astra", label="astra G=1", bandwidth_mbps=10.0, latency_s=99.0,
                     compute_s=0.0, status="error"))  # failed rows do not count
    return pd.DataFrame(rows)


def test_summary_speedups_estimate_and_wire_ratio():
    s = summarize(_rows()).set_index("label")
    assert s.loc["astra G=1", "latency_s"] == 1.0
    assert s.loc["astra G=1", "speedup_vs_single"] == 2.0
    assert s.loc["astra G=1", "speedup_vs_best_baseline"] == 4.0  # sp is the only baseline here
    assert s.loc["sp", "estimate_s"] == 0.5 + 8 * 1_000_000 / 10e6  # compute + busiest rank's bytes / bandwidth
    assert s.loc["sp", "wire_over_app"] == 1.05
    assert math.isnan(s.loc["single", "wire_over_app"])
    assert s.loc["sp", "comm_share"] == 3.5 / 4.0


def test_cli_prints_markdown_and_rejects_a_missing_dir(tmp_path, capsys):
    _rows().to_csv(tmp_path / "rows.csv", index=False)
    assert main([str(tmp_path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| bandwidth_mbps | label |") and "| astra G=1 |" in out
    assert main([str(tmp_path / "nope")]) == 2
    assert to_markdown(pd.DataFrame({"a": [1.23456, float("nan")]})).splitlines()[2:] == ["| 1.23 |", "|  |"]


def _two_delays() -> pd.DataFrame:
    """A 2 bandwidths x 2 delays sweep where delay costs sp 1 s and astra nothing."""
    base = dict(status="ok", bytes_on_wire=0, bytes_sent=0, bytes_sent_max_rank=0, comm_s=0.0, compute_s=0.5,
                jitter_ms=0.0, loss_pct=0.0, trace="", nodes=2, tokens=17, model="vit-tiny")
    rows = []
    for bw in (10.0, 100.0):
        for delay in (0.0, 5.0):
            for rep in range(3):
                rows += [dict(base, method="single", label="single", bandwidth_mbps=bw, delay_ms=delay, latency_s=2.0),
                         dict(base, method="sequence_parallel", label="sp", bandwidth_mbps=bw, delay_ms=delay,
                              latency_s=1.0 + delay / 5),
                         dict(base, method="astra", label="astra", bandwidth_mbps=bw, delay_ms=delay, latency_s=0.5)]
    return pd.DataFrame(rows)


def test_a_two_delay_sweep_gives_one_row_per_bandwidth_delay_and_method():
    s = summarize(_two_delays())
    assert len(s) == 2 * 2 * 3
    assert not s.duplicated(["bandwidth_mbps", "delay_ms", "method"]).any()
    sp = s[s["label"] == "sp"].set_index(["bandwidth_mbps", "delay_ms"])["latency_s"]
    assert sp.to_dict() == {(10.0, 0.0): 1.0, (10.0, 5.0): 2.0, (100.0, 0.0): 1.0, (100.0, 5.0): 2.0}
    astra = s[s["label"] == "astra"].set_index(["bandwidth_mbps", "delay_ms"])
    assert astra["speedup_vs_best_baseline"].to_dict() == {(10.0, 0.0): 2.0, (10.0, 5.0): 4.0,
                                                            (100.0, 0.0): 2.0, (100.0, 5.0): 4.0}
    assert (astra["speedup_vs_single"] == 4.0).all()


def test_cli_prints_every_swept_column(tmp_path, capsys):
    df = _two_delays()
    df.loc[df["delay_ms"] == 5.0, "loss_pct"] = 1.0  # delay and loss vary together: both are shown
    df.to_csv(tmp_path / "rows.csv", index=False)
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["bandwidth_mbps", "delay_ms", "loss_pct", "label"]
    assert len(lines) == 1 + 12


def test_trace_rows_are_grouped_by_their_trace_not_their_sampled_bandwidth():
    df = _two_delays()
    df = df[df["delay_ms"] == 0.0]
    traced = df[df["bandwidth_mbps"] == 10.0].assign(trace="lte")
    traced.loc[traced.index[::2], "bandwidth_mbps"] = 50.0  # repetitions started in different steps
    s = summarize(pd.concat([df, traced], ignore_index=True))
    assert "delay_ms" not in s  # it does not vary
    lte = s[s["trace"] == "lte"]
    assert len(lte) == 3 and lte["bandwidth_mbps"].isna().all() and (lte["speedup_vs_single"].notna()).all()
    assert len(s[s["trace"] == ""]) == 2 * 3


def test_repetitions_hit_by_a_fault_are_a_line_of_their_own():
    df = _two_delays()
    df["faults"] = ""
    hit = df.index[df.index % 9 < 3]  # the first repetition of every (bandwidth, delay): all three methods
    df.loc[hit, "faults"] = "link_down:h2-s1@1s"
    df.loc[hit, "latency_s"] += 2.0
    s = summarize(df)
    assert len(s) == 2 * 2 * 3 * 2
    clean = s[s["faults"] == ""].set_index(["bandwidth_mbps", "delay_ms", "label"])["latency_s"]
    assert clean[(10.0, 5.0, "sp")] == 2.0  # the medians of the repetitions no fault hit
    faulted = s[s["faults"] != ""].set_index(["bandwidth_mbps", "delay_ms", "label"])
    assert faulted.loc[(10.0, 5.0, "sp"), "latency_s"] == 4.0
    assert faulted.loc[(10.0, 5.0, "astra"), "speedup_vs_single"] == 4.0 / 2.5  # single hit by the same fault


def test_retransmissions_are_summarised_where_rows_count_them(tmp_path, capsys):
    rows = _rows()
    assert math.isnan(summarize(rows).set_index("label").loc["sp", "retransmits"])  # rows without the column
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert main([str(tmp_path)]) == 0 and "retransmits" not in capsys.readouterr().out
    rows["retransmitted_segments"] = [0, 400, 0, 0, 500, 0, 0, 450, 0, 0]  # the last row failed
    s = summarize(rows).set_index("label")
    assert s.loc["sp", "retransmits"] == 450 and s.loc["single", "retransmits"] == 0
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert main([str(tmp_path)]) == 0 and "retransmits" in capsys.readouterr().out

