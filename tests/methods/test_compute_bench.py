"""The compute benchmark runs end to end on a Llama-family model, decode included; no timing asserted.

The benchmark checks itself that each rank replayed alone reproduces the threaded run's output and
generated tokens (an AssertionError otherwise); here: it runs, covers every method it can, and names
those that cannot run or decode."""

from __future__ import annotations

from testbed.bench import compute


def test_compute_bench_times_prefill_and_decode_of_llama(capsys):
    assert compute.main(["--model", "llama-tiny", "--tokens", "24", "--nodes", "3", "--reps", "1",
                         "--kmeans-iters", "1", "--codebook-size", "16", "--generate", "3"]) == 0
    out = capsys.readouterr().out
    prefill, decode = out.split("decode after the 24-token prefill")
    for label in ("single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel",
                  "astra G=1", "astra G=32"):
        assert f"\n{label} " in prefill
    assert "VQ share" in prefill and "nearest-code search" in prefill
    rows = {line.split()[0]: line for line in decode.splitlines()[3:] if line and not line.startswith("ms:")}
    assert "no decode" in rows["block_parallel"]  # DeTransformer's blocks define no cache hand-off
    for label in ("single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8"):
        assert "no decode" not in rows[label] and "cannot run" not in rows[label]


def test_a_head_count_that_n_does_not_divide_is_named_not_fatal(capsys):
    # llama-tiny has 12 query and 6 KV heads: 5 ranks split neither
    assert compute.main(["--model", "llama-tiny", "--tokens", "24", "--nodes", "5", "--reps", "1",
                         "--kmeans-iters", "1", "--codebook-size", "16", "--generate", "0",
                         "--methods", "tensor_parallel,sequence_parallel"]) == 0
    out = capsys.readouterr().out
    assert "tensor_parallel        cannot run: world_size: got 5" in out
    assert "decode after" not in out
