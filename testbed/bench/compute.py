"""Per-rank compute time of every method, and ASTRA's VQ encode + decode share of it.

`python -m testbed.bench.compute` (defaults: vit-base, 1024 tokens, N=4, 1 torch thread per rank).

How ranks are isolated: on a 2-core machine, N ranks run at once contend for the cores, so their
compute times would mostly measure the contention. Instead each method first runs once with all
ranks in threads (in-process Communicator) while every message a rank receives is recorded; then
each rank is run ALONE in the main thread, pinned to ``--threads`` torch threads, with a
communicator that hands it the recorded messages of its peers (its own sends are dropped). The
rank therefore does exactly its real work on real data, with no other rank running. Compute time
is CPU time of the rank's thread (time.thread_time, so waiting for a core shared with other load
does not count) outside Communicator calls; the trace's wall-clock compute time is printed
beside it. Each figure is from the fastest of ``--reps`` runs after one warm-up.
The replayed output is checked against the recorded one.

ASTRA's VQ time (CPU): encode = nearest-code search + bit packing of the local tokens; decode =
unpacking + turning peers' codes into K^, V^ (table lookups when lookup tables are on; otherwise
dequantize, while the K/V projection of h^ counts as attention compute: SP does the same projection).
Why the exhaustive search has a floor: it costs t*K*D multiply-adds per block, against roughly
t*(12 D^2) + 2*t*T*D for the rest of a rank's block; for ViT-Base, T=1024, N=4, K=1024 that is
~8% by arithmetic alone. The default search (vq.Quantizer: an int8 first pass, exact re-ranking of
its vq.RERANK nearest) is printed beside the exhaustive one on the same rank's real activations:
time per block and the fraction of tokens whose code both pick.
"""

from __future__ import annotations

import argparse
import time

import torch

from testbed.comm.base import Communicator, check_tag
from testbed.comm.inprocess import InProcessCommunicator, InProcessGroup, run_ranks
from testbed.errors import CommError, ConfigError
from testbed.methods import build_method
from testbed.methods import vq
from testbed.models import build_model


class _Recording(InProcessCommunicator):
    """In-process communicator that keeps every message it receives, by (source, tag)."""

    def __init__(self, group: InProcessGroup, rank: int):
        super().__init__(group, rank)
        self.inbox: dict[tuple[int, int], bytes] = {}

    def _take(self, src: int, tag: int) -> bytes:
        data = super()._take(src, tag)
        self.inbox[(src, tag)] = data
        return data


class _Replay(Communicator):
    """One rank alone: peers' messages come from a recording of a real run; sends are dropped."""

    def __init__(self, rank: int, world_size: int, inbox: dict[tuple[int, int], bytes]):
        super().__init__(rank, world_size)
        self.inbox = inbox
        self.cpu_in_comm_s = 0.0  # CPU seconds spent inside collectives (serde of replayed messages)

    def _timed(self, fn, *args):
        c0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.cpu_in_comm_s += time.thread_time() - c0

    def all_gather(self, t):
        return self._timed(super().all_gather, t)

    def all_reduce(self, t, algorithm="ring"):
        return self._timed(super().all_reduce, t, algorithm)

    def rewind(self) -> None:
        """Start the next inference at call number 0, as the recorded one did."""
        self._seq = 0
        self.cpu_in_comm_s = 0.0

    def _post(self, dst: int, tag: int, data) -> None:
        pass

    def _take(self, src: int, tag: int) -> bytes:
        if (src, tag) not in self.inbox:
            raise CommError(f"rank {self.rank}: no recorded message from rank {src} for this call")
        check_tag(self, src, tag, tag)
        return self.inbox[(src, tag)]


def record(model, name: str, params: dict, n: int, inp: torch.Tensor, tokens: int, path: str | None,
           generate: int = 0):
    """Run all ranks once in threads; return (per-rank inboxes, output, output rank). With
    ``generate``: prefill and greedy decode of that many tokens; the output is the token ids."""
    group = InProcessGroup(n, timeout_s=600)
    comms = [_Recording(group, r) for r in range(n)]

    def body(r: int):
        m = build_method(name, model, params, r, n, comms[r], tokens=tokens, codebook_path=path)
        return (m.generate(inp, generate)[0] if generate else m.forward(inp)), m.output_rank

    outs = run_ranks(n, body, group.aborted.set)
    rank = outs[0][1]
    return [c.inbox for c in comms], outs[rank][0], rank


def time_rank(model, name, params, rank, n, inp, tokens, path, inbox, reps) -> dict:
    """Compute seconds (and ASTRA's VQ seconds) of one rank running alone: the fastest repetition."""
    comm = _Replay(rank, n, inbox)
    m = build_method(name, model, params, rank, n, comm, tokens=tokens, codebook_path=path)
    reps_out, out = [], None
    for i in range(reps + 1):  # the first run warms up allocators and caches
        comm.rewind()
        comm.trace.start()
        c0 = time.thread_time()
        out = m.forward(inp)
        cpu = time.thread_time() - c0 - comm.cpu_in_comm_s
        comm.trace.finish()
        vs = getattr(m, "vq_s", {})
        if i:
            reps_out.append({"cpu_s": cpu, "compute_s": comm.trace.compute_s,
                             "vq_cpu_s": vs.get("encode_cpu_s", 0.0) + vs.get("decode_cpu_s", 0.0),
                             "encode_cpu_s": vs.get("encode_cpu_s", 0.0), "decode_cpu_s": vs.get("decode_cpu_s", 0.0)})
    best = min(reps_out, key=lambda r: r["cpu_s"])
    return {**best, "out": out, "params": m.describe()}


def time_decode(model, name, params, rank, n, inp, tokens, path, inbox, generate, reps) -> dict:
    """CPU seconds per decode step (after prefill) of one rank running alone from recorded peer
    messages: the median step of the fastest repetition, collectives excluded; and the token ids."""
    comm = _Replay(rank, n, inbox)
    m = build_method(name, model, params, rank, n, comm, tokens=tokens, codebook_path=path)
    steps: list[float] = []
    inner = m._decode_step

    def timed_step(ids, pos):  # CPU of each decode step, outside collectives
        c0, comm0 = time.thread_time(), comm.cpu_in_comm_s
        try:
            return inner(ids, pos)
        finally:
            steps.append(time.thread_time() - c0 - (comm.cpu_in_comm_s - comm0))

    m._decode_step = timed_step
    best, ids = None, None
    for i in range(reps + 1):  # the first run warms up
        comm.rewind()
        steps.clear()
        ids, _times = m.generate(inp, generate)
        if i:
            med = sorted(steps)[len(steps) // 2]
            best = med if best is None else min(best, med)
    return {"step_cpu_s": best, "ids": ids}


def decode_bench(model, runs, n: int, inp, tokens: int, generate: int, reps: int) -> list[dict]:
    """Per-token decode compute of every method that decodes (see testbed.methods.decode)."""
    from testbed.methods.decode import check_decodes

    rows = []
    for label, name, params, path in runs:
        try:
            check_decodes(name, model.cfg, generate)
        except ConfigError as e:
            rows.append({"method": label, "skip": f"no decode: {e.allowed}"})
            continue
        world = 1 if name == "single" else n
        try:
            inboxes, ref_ids, out_rank = record(model, name, params, world, inp, tokens, path, generate)
        except ConfigError as e:
            rows.append({"method": label, "skip": f"cannot run: {e}"})
            continue
        ranks = [time_decode(model, name, params, r, world, inp, tokens, path, inboxes[r], generate, reps)
                 for r in range(world)]
        assert torch.equal(ranks[out_rank]["ids"], ref_ids)  # the replay generated the real run's tokens
        rows.append({"method": label, "step_cpu_s": [r["step_cpu_s"] for r in ranks]})
        print(f"  measured decode of {label}", flush=True)
    return rows


def print_decode_table(rows: list[dict], n: int, generate: int) -> None:
    single = next(r["step_cpu_s"][0] for r in rows if r["method"] == "single")
    head = f"{'method':<22} " + " ".join(f"{'r' + str(r) + ' ms':>8}" for r in range(n)) + f" {'max ms':>8} {'1/max':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skip" in r:
            print(f"{r['method']:<22} {r['skip']}")
            continue
        c = r["step_cpu_s"] + [float("nan")] * (n - len(r["step_cpu_s"]))
        print(f"{r['method']:<22} " + " ".join(f"{1e3 * x:>8.2f}" for x in c)
              + f" {1e3 * max(r['step_cpu_s']):>8.2f} {single / max(r['step_cpu_s']):>6.2f}")
    print(f"ms: CPU milliseconds of one decode step (median of the {generate - 1} steps after prefill) on each rank, "
          "collectives excluded; a rank with ~0 holds no cache the step needs (it idles); 1/max: single's / slowest rank's")


def bench(model, runs, n: int, inp, tokens: int, reps: int) -> list[dict]:
    rows = []
    for label, name, params, path in runs:
        world = 1 if name == "single" else n
        t0 = time.perf_counter()
        try:
            inboxes, ref_out, out_rank = record(model, name, params, world, inp, tokens, path)
        except ConfigError as e:  # e.g. tensor parallel on a head count N does not divide
            rows.append({"method": label, "skip": str(e)})
            print(f"  {label}: cannot run ({e})", flush=True)
            continue
        ranks = [time_rank(model, name, params, r, world, inp, tokens, path, inboxes[r], reps) for r in range(world)]
        torch.testing.assert_close(ranks[out_rank]["out"], ref_out)  # the replay did the real run's work
        rows.append({"method": label, "params": ranks[0]["params"], "cpu_s": [r["cpu_s"] for r in ranks],
                     "wall_max_s": max(r["compute_s"] for r in ranks),
                     "encode_s": max(r["encode_cpu_s"] for r in ranks), "decode_s": max(r["decode_cpu_s"] for r in ranks),
                     "vq_share": max(r["vq_cpu_s"] / r["cpu_s"] for r in ranks),
                     "enc_share": max(r["encode_cpu_s"] / r["cpu_s"] for r in ranks),
                     "dec_share": max(r["decode_cpu_s"] / r["cpu_s"] for r in ranks), "wall_s": time.perf_counter() - t0})
        print(f"  measured {label} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    return rows


def print_table(rows: list[dict], n: int) -> None:
    single = rows[0]["cpu_s"][0]
    head = f"{'method':<22} {'params':<32} " + " ".join(f"{'r' + str(r) + ' cpu':>7}" for r in range(n))
    head += (f" {'max cpu':>7} {'1/max':>6} {'wall max':>8} {'VQ enc':>7} {'VQ dec':>7} {'enc %':>6} {'dec %':>6}"
             f" {'VQ share':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skip" in r:
            print(f"{r['method']:<22} cannot run: {r['skip']}")
            continue
        c = r["cpu_s"] + [float("nan")] * (n - len(r["cpu_s"]))
        vq_cols = (f" {r['encode_s']:>7.3f} {r['decode_s']:>7.3f} {100 * r['enc_share']:>5.1f}% "
                   f"{100 * r['dec_share']:>5.1f}% {100 * r['vq_share']:>7.1f}%"
                   if r["method"].startswith("astra") else f" {'':>7} {'':>7} {'':>6} {'':>6} {'':>8}")
        print(f"{r['method']:<22} {r['params'][:32]:<32} " + " ".join(f"{x:>7.3f}" for x in c)
              + f" {max(r['cpu_s']):>7.3f} {single / max(r['cpu_s']):>6.2f} {r['wall_max_s']:>8.3f}" + vq_cols)
    print("cpu: CPU seconds of the rank's thread outside collectives (s); 1/max: single's cpu / slowest rank's; "
          "wall max: slowest rank's compute wall time (s, inflated by other load); VQ enc/dec: CPU s of the "
          "slowest-VQ rank; enc % (search + packing), dec % (unpacking + lookups or dequantize), VQ share: "
          "max over ranks of that VQ cpu / compute cpu")


def search_table(model, codebooks: torch.Tensor, inp: torch.Tensor, n: int, reps: int) -> None:
    """The exhaustive and the default (fast) nearest-code search on rank 0's real LN1 outputs, side by side."""
    from testbed.methods.astra import Astra
    from testbed.methods.base import token_chunks

    cls = 1 if Astra.resolve_params({}, model.cfg)["dct"] else 0  # a ViT's CLS token is never quantized
    s, e = token_chunks(inp_tokens(model, inp) - cls, n)[0]
    hs = [h[:, cls + s:cls + e] for h in vq.block_inputs(model, inp)]  # rank 0's exchanged tokens
    times = {"exact": 0.0, "fast": 0.0}
    agree = []
    for cb, h in zip(codebooks, hs):
        qs = {"exact": vq.Quantizer(cb, exact=True), "fast": vq.Quantizer(cb)}
        best = {k: float("inf") for k in qs}
        for i in range(reps + 1):
            for k, q in qs.items():  # alternated, so both see the same load
                c0 = time.thread_time()
                q(h)
                if i:  # the first call warms up
                    best[k] = min(best[k], time.thread_time() - c0)
        for k in qs:
            times[k] += best[k]
        agree.append((qs["fast"](h) == qs["exact"](h)).float().mean().item())
    L = len(hs)
    print(f"\nnearest-code search, rank 0's {e - s} tokens, G={codebooks.shape[1]}, K={codebooks.shape[2]} "
          f"(fast search {'on' if vq.Quantizer(codebooks[0]).fast else 'OFF: groups narrower than 64'}):")
    print(f"  exhaustive fp32: {1e3 * times['exact'] / L:.2f} ms/block   fast (int8 + exact re-rank of "
          f"{vq.RERANK}): {1e3 * times['fast'] / L:.2f} ms/block   fast/exact {times['fast'] / times['exact']:.2f}   "
          f"same code: {100 * min(agree):.2f}% of tokens (worst block), {100 * sum(agree) / L:.2f}% (mean)")


def inp_tokens(model, inp) -> int:
    from testbed.methods.base import n_tokens

    return n_tokens(model, inp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.compute", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-base")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (ranks run one at a time)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--kmeans-iters", type=int, default=2,
                    help="k-means iterations for the codebooks: their quality does not change compute time")
    ap.add_argument("--methods", default=None,
                    help="comma list of labels to measure (single, tensor_parallel, ..., astra); default: all")
    ap.add_argument("--generate", type=int, default=None,
                    help="causal LMs: also time decode, this many tokens after prefill (default 8; 0: off)")
    a = ap.parse_args(argv)
    from testbed.methods.decode import check_decodes

    torch.set_num_threads(a.threads)
    model = build_model(a.model)
    inp = model.make_input(a.tokens, seed=0)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        runs = [("single", "single", {}, None), ("tensor_parallel", "tensor_parallel", {}, None),
                ("sequence_parallel", "sequence_parallel", {}, None),
                ("sequence_parallel_int8", "sequence_parallel_int8", {}, None),
                ("block_parallel", "block_parallel", {"n_b": 1}, None)]
        cb1 = None
        for g in (1, 32):
            path = str(Path(tmp) / f"cb{g}.pt")
            t0 = time.perf_counter()
            cb = vq.fit_codebooks(model, g, a.codebook_size, a.tokens, n_samples=1, iters=a.kmeans_iters)
            vq.save_codebooks(path, cb)
            cb1 = cb if g == 1 else cb1
            print(f"  codebooks G={g}, K={a.codebook_size}: {time.perf_counter() - t0:.0f} s", flush=True)
            runs.append((f"astra G={g}", "astra", {}, path))
            if g == 1:
                runs.append(("astra G=1 no tables", "astra", {"lookup_tables": False}, path))
        if a.methods:
            keep = set(a.methods.split(","))
            runs = [r for r in runs if r[0] == "single" or r[0] in keep or r[1] in keep]  # single: the 1/max baseline
        rows = bench(model, runs, a.nodes, inp, a.tokens, a.reps)
        generate = (8 if model.cfg.causal else 0) if a.generate is None else a.generate
        if generate:
            check_decodes("single", model.cfg, generate)
            drows = decode_bench(model, [r for r in runs if r[0] != "astra G=1 no tables"], a.nodes, inp,
                                 a.tokens, max(generate, 2), a.reps)
    print(f"\n{a.model}, {a.tokens} tokens, N={a.nodes}: per-rank compute, each rank run alone on {a.threads} "
          f"torch thread(s) from recorded peer messages (fastest of {a.reps})")
    print_table(rows, a.nodes)
    search_table(model, cb1, inp, a.nodes, a.reps)
    if generate:
        print(f"\ndecode after the {a.tokens}-token prefill: per-token compute of each rank, run alone as above "
              f"({max(generate, 2)} tokens generated)")
        print_decode_table(drows, a.nodes, max(generate, 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
