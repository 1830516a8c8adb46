"""`testbed compare`: every method in one table, bytes checked, bad input reported."""

from __future__ import annotations

from testbed.methods.compare import compare, main


def test_compare_rows_for_every_method():
    rows = compare("gpt2-tiny", tokens=13, nodes=2, batch=2, astra_params={"groups": 2, "codebook_size": 8})
    by = {r["method"]: r for r in rows}
    assert list(by) == ["single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
                        "block_parallel", "astra", "astra[exact]"]
    assert all(not r["error"] and r["bytes_match"] for r in rows)
    assert by["single"]["max_abs_err"] == 0 and by["single"]["sent_per_rank"] == 0
    assert by["sequence_parallel"]["max_abs_err"] < 1e-5 and by["tensor_parallel"]["max_abs_err"] < 1e-5
    assert by["astra[exact]"]["max_abs_err"] < 1e-5
    assert by["astra"]["params"].startswith("G=2, K=8")
    assert by["astra"]["sent_per_rank"] < by["sequence_parallel_int8"]["sent_per_rank"]


def test_compare_main_prints_a_table_and_rows_with_errors(capsys):
    assert main(["--model", "vit-tiny", "--tokens", "10", "--nodes", "3", "--batch", "2", "--codebook-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "astra[exact]" in out and "sent B/rank" in out
    assert "error: world_size: got 3" in out  # 4 heads cannot split over 3 ranks for TP / BP


def test_compare_bad_model_name_exits(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--model", "vit-huge"])
