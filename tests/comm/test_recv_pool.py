"""RecvPool: receive buffers reused only when nothing can read them any more."""

from __future__ import annotations

import torch

from testbed.comm.grpc import RECV_POOL_MIN_BYTES, RecvPool
from testbed.comm.serde import bytes_to_tensor, tensor_to_bytes
from tests.comm.test_grpc import run_grpc


def test_a_buffer_is_reused_only_after_every_reference_is_gone():
    pool = RecvPool(size=2)
    msg = tensor_to_bytes(torch.arange(1000, dtype=torch.float32))
    buf = pool.get(len(msg))
    buf[:] = msg
    t = bytes_to_tensor(buf)[10:20]  # a view of a view of the buffer, as a collective hands out
    del buf
    again = pool.get(len(msg))
    assert again is not pool.buffers[0] and len(pool.buffers) == 2  # the first is still read through t
    assert torch.equal(t, torch.arange(10, 20, dtype=torch.float32))
    del t, again
    assert pool.get(len(msg)) is pool.buffers[0]  # both free now: the first of that size again


def test_the_pool_keeps_at_most_its_size_and_replaces_a_free_buffer_of_another_size():
    pool = RecvPool(size=2)
    held = [pool.get(100), pool.get(100), pool.get(100)]  # the third is not kept
    assert len(pool.buffers) == 2 and held[2] is not pool.buffers[0] and held[2] is not pool.buffers[1]
    del held
    b = pool.get(200)  # sizes changed: a free buffer of 100 bytes makes room for it
    assert len(b) == 200 and any(x is b for x in pool.buffers) and len(pool.buffers) == 2


def test_the_pool_keeps_no_more_than_its_bytes():
    pool = RecvPool(size=4, max_bytes=250)
    held = [pool.get(100), pool.get(100), pool.get(100)]
    assert [len(b) for b in pool.buffers] == [100, 100]  # a third would make 300 bytes
    del held
    pool.get(200)  # replacing a free 100-byte buffer would make 300 too
    assert [len(b) for b in pool.buffers] == [100, 100]


def test_tensors_kept_from_earlier_calls_survive_later_ones():
    """all_gather hands out tensors that view receive buffers: later calls of the same sizes
    (which reuse free buffers) must not change what a rank still holds; multi-chunk and
    single-chunk messages alike."""
    n_elems = RECV_POOL_MIN_BYTES // 4 * 3  # 192 KiB: pooled; several chunks at chunk_bytes 64 KiB

    def program(rank, comm):
        kept = []
        for step in range(6):
            kept.append(comm.all_gather(torch.full((n_elems,), float(100 * step + rank))))
            summed = comm.all_reduce(torch.full((n_elems,), float(step)), "direct")
            assert torch.equal(summed, torch.full((n_elems,), float(step * comm.world_size)))
        return kept

    for chunk_bytes in (64 << 10, 1 << 20):
        results = run_grpc(3, program, chunk_bytes=chunk_bytes)
        for rank, kept in enumerate(results):
            for step, gathered in enumerate(kept):
                for src, t in enumerate(gathered):
                    assert torch.equal(t, torch.full((n_elems,), float(100 * step + src))), (rank, step, src)
