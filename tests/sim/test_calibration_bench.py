"""The calibration benchmark runs end to end: three calibrations, the slow phase on the right slots, no load left."""

from __future__ import annotations

import os

import pytest

from testbed.bench.calibration import report, run


def test_calibration_bench_end_to_end():
    methods = (("single", {}), ("sequence_parallel", {}))
    out = run("vit-tiny", 17, nodes=2, repetitions=3, warmup=0, methods=methods, log=lambda m: None)
    assert set(out["compute_s"]) == {"quiet", "sequential", "interleaved"}
    assert all(len(v) == 2 and min(v) > 0 for v in out["compute_s"].values())
    # one probe per timed inference (3 x 2), the slow phase on the middle third of them (slots 2 and 3)
    assert [flag for flag, _ in out["probes"]["quiet"]] == [False] * 6
    for mode in ("sequential", "interleaved"):
        assert [flag for flag, _ in out["probes"][mode]] == [False, False, True, True, False, False]
        assert all(v > 0 for _, v in out["probes"][mode])
    assert len(out["hog_pids"]) == (os.cpu_count() or 1)
    for pid in out["hog_pids"]:
        with pytest.raises(ProcessLookupError):  # the load was killed and reaped
            os.kill(pid, 0)
    text = report(out)
    assert "sequence_parallel" in text and "interleaved: profiles" in text
