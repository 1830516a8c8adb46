"""The Python API: the README's notebook example runs as written (in-process, vit-tiny)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.experiment import api
from tests.experiment.helpers import tiny

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text().split("## From a notebook: the Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_example(), "README.md", "exec"), ns)
    run, df = ns["run"], ns["df"]
    assert run.status == "complete" and run.dir == Path("results/notebook")
    assert len(df) == 3 * 2 and set(df["status"]) == {"ok"}
    assert sorted(df["method"].unique()) == ["astra", "sequence_parallel", "single"]
    s = run.summary().set_index("label")
    assert s.loc["single", "speedup_vs_single"] == 1.0
    assert (tmp_path / "results/notebook/rows.parquet").is_file() and run.plots
    again = api.open_run(tmp_path / "results/notebook")
    assert again.status == "complete" and len(again.rows) == 6 and again.spec.name == "notebook"
    assert "single" in capsys.readouterr().out


def test_fields_replace_and_bad_input_writes_nothing(tmp_path):
    exp = api.experiment(tiny(), repetitions=1, backend="sim")
    assert exp.repetitions == 1 and exp.backend == "sim"
    with pytest.raises(ConfigError, match="repetitions"):
        api.experiment(tiny(), repetitions=0)
    with pytest.raises(ConfigError, match="nodes.count"):
        api.run(tiny(nodes={"count": 0}), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="run directory"):
        api.open_run(tmp_path)
