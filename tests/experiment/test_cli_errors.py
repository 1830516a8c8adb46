"""Malformed experiment files: `testbed run` prints ONE clear error (YAML path, value, allowed), exits 2,
and creates no output directory. Includes errors only the methods/topology/model code can detect."""

from __future__ import annotations

import pytest

from testbed.experiment.cli import run_main

from .helpers import ALL_METHODS, tiny, write

ASTRA = {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}


def _methods(*extra):
    return ["single", *extra]


CASES = {
    "unknown method": (tiny(methods=_methods("pipeline_parallel")), "methods[1].name: got 'pipeline_parallel'",
                       "single | tensor_parallel"),
    "negative bandwidth": (tiny(backend="mininet", nodes={"count": 4}, sweep={"bandwidth_mbps": [10, -5]}),
                           "sweep.bandwidth_mbps[1]: got -5", "(0, 10000]"),
    "wrong type": (tiny(input={"tokens": "seventeen"}), "input.tokens: got 'seventeen'", "an integer >= 1"),
    "missing field": ({k: v for k, v in tiny().items() if k != "model"}, "model: got None",
                      "this field is required"),
    "unknown topology": (tiny(topology="ring"), "topology: got 'ring'", "star"),
    "bad inline topology": (tiny(topology={"name": "pair", "hosts": ["h1", "h2"], "linkz": []}),
                            "topology.linkz", "allowed"),
    "unknown model": (tiny(model="vit-huge"), "model.name: got 'vit-huge'", "vit-tiny"),
    "astra groups not dividing D": (tiny(methods=_methods({"name": "astra", "params": {"groups": 5}})),
                                    "methods[1].params.groups: got 5", "hidden size D=64"),
    # the first astra's codebooks are fit and written into the run directory before the second fails:
    # the refused run must remove them again
    "second astra after a fitted one": (tiny(methods=_methods(ASTRA, {"name": "astra", "params": {"groups": 5}})),
                                        "methods[2].params.groups: got 5", "hidden size D=64"),
    "unknown method param": (tiny(methods=_methods({"name": "block_parallel", "params": {"nb": 2}})),
                             "methods[1].params.nb: got 2", "n_b"),
    "heads not divisible by nodes": (tiny(nodes={"count": 3}, methods=_methods("tensor_parallel")),
                                     "nodes.count: got 3", "n_heads=4"),
    "more nodes than tokens": (tiny(input={"tokens": 3}, nodes={"count": 4}, methods=_methods("sequence_parallel")),
                               "nodes.count: got 4", "tokens=3"),
    "topology host count": (tiny(backend="mininet", nodes={"count": 2}), "nodes.count: got 2",
                            "the number of hosts of topology 'star'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_file_one_error_no_output(case, tmp_path, monkeypatch, capsys):
    data, where, allowed = CASES[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "explicit-out"
    path = write(tmp_path / "exp.yaml", {**data, "output_dir": str(out)})
    assert run_main([str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("testbed run: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress lines may precede it
    err = errors[0]
    assert where in err and allowed in err, err
    assert not out.exists() and not (tmp_path / "results").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_missing_file_and_existing_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["nope.yaml"]) == 2
    assert "experiment file: got 'nope.yaml'" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "rows.csv").write_text("x\n")
    path = write(tmp_path / "exp.yaml", tiny(methods=ALL_METHODS[:1]))
    assert run_main([str(path), "--out", str(used)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_main(["--resume", str(tmp_path / "nothing-here")]) == 2
    assert "manifest.json" in capsys.readouterr().err


RAW_CASES = {
    "methods twice": ("name: tiny\nmodel: {name: vit-tiny}\ninput: {tokens: 17}\nmethods: [single]\n"
                      "nodes: {count: 2}\ntopology: star\nbackend: inprocess\nmethods: [astra]\n",
                      "methods: got 'given twice (lines 4 and 8)'"),
    "tokens twice": ("name: tiny\nmodel: {name: vit-tiny}\ninput:\n  tokens: 17\n  tokens: 33\nmethods: [single]\n"
                     "nodes: {count: 2}\ntopology: star\nbackend: inprocess\n",
                     "input.tokens: got 'given twice (lines 4 and 5)'"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_duplicate_keys_and_binary_files_one_error_no_output(case, tmp_path, monkeypatch, capsys):
    content, expect = RAW_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("testbed run: error: ")]
    assert len(lines) == 1 and expect in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_exponent_bandwidths_are_numbers(tmp_path):
    from testbed.experiment.spec import load_spec

    path = tmp_path / "exp.yaml"
    path.write_text("name: tiny\nmodel: {name: vit-tiny}\ninput: {tokens: 17}\nmethods: [single]\n"
                    "nodes: {count: 4}\ntopology: star\nbackend: mininet\nsweep: {bandwidth_mbps: [1e3, 2.5e1]}\n")
    assert [c.profile.bandwidth_mbps for c in load_spec(path).cells()] == [1000.0, 25.0]
