"""LLM experiments: a Llama-shaped model runs every method through the runner; decode rows carry
time to first token, per-token latency and tokens per second on every computing backend; bad
`generate` input is one clear error with nothing written; co-located nodes share one checkpoint's
pages, and rows record each run's resident memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from testbed.experiment.cli import run_main

from .helpers import ALL_METHODS, tiny, write

LLAMA = {"model": {"name": "llama-tiny"}, "input": {"tokens": 13, "seed": 0}, "nodes": {"count": 2}}


def test_llama_runs_every_method_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    path = write(tmp_path / "exp.yaml", tiny(**LLAMA, repetitions=1, warmup=0, output_dir=str(out)))
    assert run_main([str(path)]) == 0
    rows = pd.read_csv(out / "rows.csv")
    assert sorted(rows["method"]) == sorted(m if isinstance(m, str) else m["name"] for m in ALL_METHODS)
    assert (rows["status"] == "ok").all()
    exact = rows[rows["method"].isin(["single", "tensor_parallel", "sequence_parallel"])]
    assert (exact["agreement"] == 1.0).all() and (exact["max_abs_err"] < 1e-4).all()


@pytest.mark.parametrize("backend", ["inprocess", "loopback"])
def test_decode_rows_carry_ttft_per_token_latency_and_tokens_per_second(backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, G = tmp_path / "run", 6
    methods = ["single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
               {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]
    path = write(tmp_path / "exp.yaml", tiny(**{**LLAMA, "input": {"tokens": 13, "generate": G}}, methods=methods,
                                             backend=backend, repetitions=2, warmup=1, output_dir=str(out)))
    assert run_main([str(path)]) == 0
    rows = pd.read_csv(out / "rows.csv")
    assert len(rows) == 2 * len(methods) and (rows["status"] == "ok").all() and (rows["generate"] == G).all()
    assert (rows["ttft_s"] > 0).all() and (rows["ttft_s"] <= rows["latency_s"]).all()
    assert (rows["tpot_median_s"] > 0).all() and (rows["tpot_median_s"] <= rows["tpot_p95_s"]).all()
    # tokens_per_s is the G - 1 per-token times over their sum: the last token comes no later than the reply
    decode_s = (G - 1) / rows["tokens_per_s"]
    assert (rows["ttft_s"] + decode_s <= rows["latency_s"] * (1 + 1e-9)).all()
    assert (decode_s >= (G - 1) * rows["tpot_median_s"] / 10).all()  # a mean gap is not far below the median
    exact = rows[rows["method"].isin(["single", "tensor_parallel", "sequence_parallel"])]
    assert (exact["generated_agreement"] == 1.0).all() and (exact["agreement"] == 1.0).all()
    assert rows["generated_agreement"].between(0, 1).all()
    assert (rows["rss_mib"] > 50).all() and (rows["pss_mib"] > 0).all()
    if backend == "inprocess":  # one process holds every rank: its PSS is part of its resident set
        assert (rows["pss_mib"] <= rows["rss_mib"]).all()
    memory = json.loads((out / "manifest.json").read_text())["memory"]  # what each node held once loaded
    assert len(memory) == len(methods) and {m["after"] for m in memory} == {"load"}
    assert all(len(m["nodes"]) == (1 if backend == "inprocess" else 2) and m["nodes"][0]["rss_mib"] > 50
               for m in memory)


def test_decode_columns_from_the_token_times():
    from testbed.comm.trace import Trace
    from testbed.experiment.metrics import Reference, decode_columns
    from testbed.node.records import RankResult

    def rank(r, times, ids):
        return RankResult(r, None, 1.0, 1.0, 0.0, 0.0, 0.0, 0, 0, Trace(r), token_times_s=times, generated=ids)

    ref = Reference(torch.zeros(1, 3), torch.zeros(1, 5), generated=torch.tensor([[1, 2, 3, 4]]))
    cols = decode_columns([rank(0, [0.1, 0.2], None), rank(1, [0.5, 0.7, 0.8, 1.1], torch.tensor([[1, 2, 9, 4]]))],
                          ref)
    assert cols["ttft_s"] == 0.5 and cols["tpot_median_s"] == pytest.approx(0.2)
    assert cols["tpot_p95_s"] == pytest.approx(0.29) and cols["tokens_per_s"] == pytest.approx(3 / 0.6)
    assert cols["generated_agreement"] == 0.75
    assert decode_columns([rank(0, [], None)], ref) == {}  # prefill only: no decode columns


def test_generate_on_the_simulator_is_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tiny(**{**LLAMA, "input": {"tokens": 13, "generate": 4}}, methods=["single"], backend="sim",
                output_dir=str(tmp_path / "out"))
    path = write(tmp_path / "exp.yaml", data)
    assert run_main([str(path)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("testbed run: error: ")]
    assert len(errors) == 1 and "input.generate: got 4" in errors[0] and "backend sim" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_a_simulated_experiment_on_llama_3_8b_is_checked_without_building_its_weights(tmp_path, monkeypatch):
    import testbed.models
    from testbed.errors import ConfigError
    from testbed.experiment.checks import check_spec
    from testbed.experiment.spec import load_spec

    def refuse(name, **_):  # 32 GB of fp32 weights: this host cannot hold them
        raise AssertionError(f"built {name}")

    monkeypatch.setattr(testbed.models, "build_model", refuse)
    prepared = check_spec(load_spec(Path(__file__).parents[2] / "experiments" / "llm8b_sim.yaml"))
    assert prepared.model is None
    bad = tiny(model={"name": "llama-3-8b"}, input={"tokens": 1024}, nodes={"count": 4}, backend="sim",
               methods=["single", {"name": "block_parallel", "params": {"n_b": 40}}])
    with pytest.raises(ConfigError) as info:
        check_spec(load_spec(write(tmp_path / "bad.yaml", bad)))
    assert info.value.field == "methods[1].params.n_b"


@pytest.mark.parametrize("data,where,allowed", [
    (tiny(input={"tokens": 17, "generate": 4}), "input.generate: got 4", "only causal LMs"),
    (tiny(**{**LLAMA, "input": {"tokens": 13, "generate": 4}}), "input.generate: got 4", "block_parallel"),
    (tiny(**{**LLAMA, "input": {"tokens": 13, "generate": -1}}), "input.generate: got -1", "an integer >= 0"),
])
def test_bad_generate_is_one_error_and_writes_nothing(data, where, allowed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "exp.yaml", {**data, "output_dir": str(tmp_path / "out")})
    assert run_main([str(path)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("testbed run: error: ")]
    assert len(errors) == 1 and where in errors[0] and allowed in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


_NODE = textwrap.dedent("""
    import sys, torch
    from testbed.models import build_model
    m = build_model(sys.argv[1], weights_path=sys.argv[2] or None, share_weights=True)
    with torch.inference_mode():
        m(m.make_input(8))
    print("ready", flush=True)
    sys.stdin.readline()
""")


def _pss_kib(pid: int) -> int:
    """Proportional set size: pages shared by k processes count 1/k in each."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


def _nodes(n, model, ck) -> tuple[int, list]:
    procs = [subprocess.Popen([sys.executable, "-c", _NODE, model, str(ck)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        return sum(_pss_kib(p.pid) for p in procs), procs
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)


def test_co_located_nodes_share_one_copy_of_the_weights(tmp_path):
    from testbed.models import get_config
    from testbed.models.config import CONFIGS
    from testbed.models import build_model, save_hf_weights

    # ~100 MB of fp32 weights: large beside the interpreter and torch (~150 MB resident each)
    cfg = get_config("llama-tiny", dim=512, n_heads=8, n_kv_heads=4, mlp_dim=2048, n_layers=6, vocab_size=8000)
    ck = tmp_path / "ck"
    save_hf_weights(build_model(cfg), ck)
    weights_kib = sum(f.stat().st_size for f in ck.glob("*.safetensors")) // 1024
    # the node processes find the config by name
    boot = tmp_path / "sitecustomize.py"
    boot.write_text("from testbed.models.config import CONFIGS, get_config\n"
                    f"CONFIGS['llama-tiny-wide'] = get_config('llama-tiny', dim=512, n_heads=8, n_kv_heads=4, "
                    "mlp_dim=2048, n_layers=6, vocab_size=8000)\n")
    import os

    env_path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"], old = env_path, os.environ.get("PYTHONPATH", "")
    try:
        base, _ = _nodes(1, "llama-tiny", "")  # the interpreter, torch and a tiny model: no checkpoint
        base4, _ = _nodes(4, "llama-tiny", "")
        one, _ = _nodes(1, "llama-tiny-wide", ck)
        four, _ = _nodes(4, "llama-tiny-wide", ck)
    finally:
        os.environ["PYTHONPATH"] = old
    print(f"\nweights {weights_kib / 1024:.0f} MiB; PSS without weights {base / 1024:.0f} MiB, one node "
          f"{one / 1024:.0f} MiB, four without weights {base4 / 1024:.0f} MiB, four nodes {four / 1024:.0f} MiB")
    assert one - base > 0.9 * weights_kib  # the weights are resident in one node
    # what the checkpoint adds: four nodes do not hold four copies (one copy each would be ~4x)
    assert four - base4 < 2 * (one - base)
    assert CONFIGS.get("llama-tiny-wide") is None
