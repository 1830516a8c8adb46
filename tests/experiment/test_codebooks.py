"""ASTRA codebooks of a run are fit once, written once into the run directory, and that very file
is what the ranks load."""

from __future__ import annotations

import json

from testbed.experiment.checks import check_spec
from testbed.experiment.runner import Runner
from testbed.experiment.spec import parse_spec

from .helpers import tiny

ASTRA = {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}


def test_the_file_the_check_writes_is_the_one_the_run_loads(tmp_path):
    no_tables = {"name": "astra", "params": {**ASTRA["params"], "lookup_tables": False}}  # same codebooks
    spec = parse_spec(tiny(methods=["single", ASTRA, no_tables], repetitions=1, warmup=0))
    out = tmp_path / "run"
    prepared = check_spec(spec, codebook_dir=out / "codebooks")
    files = sorted((out / "codebooks").iterdir())
    assert [f.name for f in files] == ["astra-G1-K16.pt"]  # one key: one file for both methods
    stamp = files[0].stat().st_mtime_ns
    outcome = Runner(spec, out, prepared=prepared, progress=False, plots=False).run()
    assert outcome.status == "complete" and outcome.failed_rows == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["codebooks"].values()) == {str(files[0].resolve())}
    assert files[0].stat().st_mtime_ns == stamp  # not written again
    assert sorted(f.name for f in (out / "codebooks").iterdir()) == ["astra-G1-K16.pt"]


def test_a_check_without_a_run_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny(methods=[ASTRA]))
    prepared = check_spec(spec)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "later"
    paths = prepared.codebooks.write(out / "codebooks")  # the fitted tensors are kept for a runner
    assert [p.rsplit("/", 1)[1] for p in paths.values()] == ["astra-G1-K16.pt"]
