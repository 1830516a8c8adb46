"""The Communicator's collectives (written once on post/take) over the in-process transport."""

from __future__ import annotations

import pytest
import torch

from testbed.comm import Trace, run_inprocess
from testbed.comm.base import (ALL_REDUCE, ALL_REDUCE_PLANS, all_reduce_plan, choose_all_reduce,
                               direct_all_reduce_plan, plan_ops, split_sizes)
from testbed.comm.serde import bytes_to_tensor, tensor_to_bytes
from testbed.errors import CommError

WORLDS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("algorithm", ALL_REDUCE)
@pytest.mark.parametrize("n", WORLDS)
def test_all_reduce_sums_and_is_identical_on_every_rank(n, algorithm):
    def fn(rank, comm):
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(7, 13, generator=g)  # 91 elements: not divisible by most n
        return x, comm.all_reduce(x, algorithm)

    out = run_inprocess(n, fn)
    expected = sum(x for x, _ in out)
    for _, y in out:
        torch.testing.assert_close(y, expected)
        assert torch.equal(y, out[0][1])  # each chunk is summed once, by one rank: bit-identical everywhere


@pytest.mark.parametrize("algorithm", ALL_REDUCE)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("numel", [1, 3, 91, 1001])  # fewer elements than ranks, and sizes N does not divide
def test_all_reduce_traces_its_plan_bytes(n, algorithm, numel):
    def fn(rank, comm):
        comm.trace.start()
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        y = comm.all_reduce(x, algorithm)
        comm.trace.finish()
        return x, y, comm.trace

    out = run_inprocess(n, fn)
    expected = sum(x for x, _, _ in out)
    chunks = [k * 4 for k in split_sizes(numel, n)]
    for rank, (_, y, tr) in enumerate(out):
        torch.testing.assert_close(y, expected)
        (ar,) = tr.collectives("all_reduce")
        assert ar.ops == plan_ops(ALL_REDUCE_PLANS[algorithm](rank, n), chunks)
        if algorithm == "direct":  # every other chunk to its owner, then the own sum to every peer
            assert ar.bytes_sent == sum(chunks) - chunks[rank] + (n - 1) * chunks[rank]
    assert sum(tr.bytes_sent for _, _, tr in out) == 2 * (n - 1) * sum(chunks)  # 2(N-1)/N * S per rank on average


def test_direct_all_reduce_takes_two_rounds():
    plan = direct_all_reduce_plan(1, 4)
    assert len({m.step for m in plan}) == 2 and len(all_reduce_plan(1, 4)) == len(plan) == 2 * 2 * 3


def test_ranks_on_different_all_reduce_algorithms_fail_out_of_step():
    def fn(rank, comm):
        comm.all_reduce(torch.ones(8), "ring" if rank == 0 else "direct")

    with pytest.raises(CommError, match="out of step"):
        run_inprocess(2, fn)


def test_unknown_all_reduce_algorithm_is_one_clear_error():
    with pytest.raises(CommError, match="ring, direct"):
        run_inprocess(2, lambda r, c: c.all_reduce(torch.ones(2), "tree"))


@pytest.mark.parametrize("flat, nbytes, n, delay_ms, expected", [
    (True, 1 << 26, 8, None, "direct"),  # flat, not shaped (loopback): same bytes per access link, fewer rounds
    (True, 1 << 26, 8, 1.0, "direct"),  # flat with a delay line: the round trips decide
    (True, 1 << 26, 8, 0.0, "ring"),  # shaped without delay: direct's converging flows overflow the queues
    (True, 4 * 16 << 10, 4, 0.0, "direct"),  # ... unless the chunks are latency-bound
    (False, 1 << 26, 8, None, "ring"),  # shared hops and big chunks: ring's one message per link
    (False, 1 << 26, 8, 5.0, "ring"),
    (False, 1 << 12, 8, None, "direct"),  # latency-bound chunks
    (False, 1 << 26, 2, 0.0, "direct"),  # two ranks: the same two messages
])
def test_default_all_reduce_by_topology_size_and_delay(flat, nbytes, n, delay_ms, expected):
    assert choose_all_reduce(nbytes, n, flat, delay_ms) == expected


@pytest.mark.parametrize("n", WORLDS)
def test_all_gather_returns_every_rank_in_order_with_its_own_shape(n):
    out = run_inprocess(n, lambda r, c: c.all_gather(torch.full((r + 1, 2), float(r))))
    for got in out:
        assert [t.shape[0] for t in got] == list(range(1, n + 1))
        assert [t[0, 0].item() for t in got] == list(range(n))


def test_broadcast_and_point_to_point():
    def fn(rank, comm):
        b = comm.broadcast(torch.arange(5) if rank == 2 else None, src=2)
        if rank == 0:
            comm.send(torch.tensor([42], dtype=torch.int8), dst=3)
        r = comm.recv(src=0) if rank == 3 else None
        return b, r

    out = run_inprocess(4, fn)
    assert all(torch.equal(b, torch.arange(5)) for b, _ in out)
    assert out[3][1].item() == 42 and out[3][1].dtype == torch.int8


@pytest.mark.parametrize("n", [2, 3, 4])
def test_trace_records_exact_payload_bytes_and_compute_segments(n):
    size = 1000  # float32 elements

    def fn(rank, comm):
        comm.trace.start()
        x = torch.ones(size)
        comm.all_gather(x)
        comm.all_reduce(x)
        comm.trace.finish()
        return comm.trace

    traces: list[Trace] = run_inprocess(n, fn)
    chunks = [c.numel() * 4 for c in torch.tensor_split(torch.ones(size), n)]
    for rank, tr in enumerate(traces):
        ag, ar = tr.collectives("all_gather")[0], tr.collectives("all_reduce")[0]
        assert ag.bytes_sent == ag.bytes_recv == (n - 1) * size * 4
        sent = [chunks[(rank - s) % n] for s in range(n - 1)] + [chunks[(rank + 1 - s) % n] for s in range(n - 1)]
        assert ar.bytes_sent == sum(sent)
        assert ar.bytes_recv == sum(chunks[(rank - s - 1) % n] for s in range(n - 1)) + sum(
            chunks[(rank - s) % n] for s in range(n - 1))
        assert tr.bytes_sent == ag.bytes_sent + ar.bytes_sent
        assert all(op in ("send", "recv") for op, _, _ in ag.ops + ar.ops)
        assert tr.compute_s >= 0 and tr.comm_s > 0
        assert Trace.from_dict(tr.to_dict()).to_dict() == tr.to_dict()


def test_ranks_out_of_step_fail_with_a_clear_error():
    def fn(rank, comm):
        if rank == 0:
            comm.all_gather(torch.ones(1))
        else:
            comm.broadcast(torch.ones(1), src=1)  # a different collective at the same point

    with pytest.raises(CommError, match="out of step"):
        run_inprocess(2, fn, timeout_s=5)


def test_a_missing_peer_times_out_naming_it():
    def fn(rank, comm):
        if rank == 0:
            comm.recv(src=1)

    with pytest.raises(CommError, match="nothing from rank 1 within 0.3 s"):
        run_inprocess(2, fn, timeout_s=0.3)


def test_a_failing_rank_aborts_the_others_and_its_error_wins():
    def fn(rank, comm):
        if rank == 1:
            raise RuntimeError("boom in rank 1")
        comm.all_gather(torch.ones(1))

    with pytest.raises(RuntimeError, match="boom in rank 1"):
        run_inprocess(3, fn, timeout_s=30)


def test_run_ranks_aborts_on_the_first_failure_and_returns_results_in_rank_order():
    import threading

    from testbed.comm import run_ranks

    assert run_ranks(3, lambda r: r * 10) == [0, 10, 20]
    stop = threading.Event()

    def fn(rank):
        if rank == 2:
            raise ValueError("rank 2 broke")
        stop.wait(30)  # released by abort()
        raise CommError(f"rank {rank}: group aborted")

    with pytest.raises(ValueError, match="rank 2 broke"):
        run_ranks(3, fn, abort=stop.set)
    assert stop.is_set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                                   torch.int64, torch.bool])
def test_serde_round_trips_every_dtype_bit_for_bit(dtype):
    t = (torch.randn(3, 4, 5) * 50).to(dtype)
    back = bytes_to_tensor(tensor_to_bytes(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert bytes_to_tensor(tensor_to_bytes(torch.tensor(3.5))).item() == 3.5  # 0-d
