"""Benchmark: our gRPC collectives against torch.distributed's gloo, side by side in one run.

``python -m testbed.bench.collectives [--sizes 1K,64K,1M] [--world 2,4,8]`` starts one
worker process per rank (rank i on 127.0.0.(i+1) by default, or on ``--hosts``), for each
world size in turn. Every worker opens both a GrpcCommunicator and a gloo process group
between the same processes and times all_gather and both of our all-reduce algorithms
(``all_reduce_ring``, ``all_reduce_direct``; gloo runs its own all-reduce for both) of each size with both,
alternating rep by rep, so both see the same machine load. A rep's time is the
slowest rank's (each rank starts after a gloo barrier); the table shows medians
over reps and the ratio ours/gloo per size. Sizes are per-rank tensor bytes.
"(serde)" is the part of ours spent turning tensors into bytes and back
(testbed.comm.serde, shared with the in-process transport).

``--mininet`` (root) runs the same inside a 4-host star (``topologies/star``) at 100 and
1000 Mbit/s with 0 and 5 ms between any two hosts (``--bandwidths``, ``--delays``;
:func:`run_star`; target ours/gloo <= 1.05 there, the link's share of the time hiding part of
the transport's), and prints per profile what the queues dropped and TCP retransmitted meanwhile. Any other emulated hosts:
call :func:`run` with ``hosts`` set to the hosts' data addresses and ``launch`` starting each
worker in its host, e.g. ``lambda rank, argv: net.hosts[rank].popen(argv, stdin=PIPE, stdout=PIPE, text=True)``.
Workers rendezvous over their stdin/stdout (each binds port 0 and reports its
address), so no fixed port is needed anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable

from testbed.errors import ConfigError, check

COLLECTIVES = ("all_gather", "all_reduce_ring", "all_reduce_direct")
DEFAULT_SIZES = "1K,4K,16K,64K,256K,1M,4M,16M,64M"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

Launch = Callable[[int, list[str]], subprocess.Popen]


@dataclass
class Row:
    collective: str
    size_bytes: int  # per-rank tensor
    ours_s: float  # median over reps of the slowest rank's time
    gloo_s: float
    reps: int
    ours_serialize_s: float = 0.0  # part of ours_s in testbed.comm.serde (median over reps, slowest rank)

    @property
    def ratio(self) -> float:
        return self.ours_s / self.gloo_s

    @property
    def target(self) -> float:
        return 1.0  # at or below gloo at every size


def parse_sizes(text: str) -> list[int]:
    """'1K,64K,1M' -> bytes (K = 1024). Each must be a positive multiple of 4 (float32 tensors)."""
    sizes = []
    for item in text.split(","):
        item = item.strip().upper().removesuffix("B").removesuffix("I")
        num, unit = (item[:-1], item[-1]) if item and item[-1] in _UNITS else (item, "")
        if not num.isdigit() or int(num) * _UNITS[unit] % 4 or int(num) == 0:
            raise ConfigError("sizes", text, "comma-separated sizes like 1K,64K,1M: positive multiples of 4 bytes")
        sizes.append(int(num) * _UNITS[unit])
    return sizes


def reps_for(size: int) -> int:
    """More reps for small sizes (cheap, noisier), fewer for large ones."""
    return 30 if size <= 64 << 10 else 10 if size <= 4 << 20 else 5


# -- the launcher --------------------------------------------------------------------


def local_launch(rank: int, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def run(world: int, sizes: list[int], collectives: tuple[str, ...] = COLLECTIVES, hosts: list[str] | None = None,
        reps: int | None = None, launch: Launch = local_launch) -> list[Row]:
    """Start ``world`` workers with ``launch``, rendezvous them, and return one Row per (collective, size)."""
    hosts = hosts or [f"127.0.0.{r + 1}" for r in range(world)]
    check(len(hosts) == world, "hosts", hosts, f"{world} host addresses (one per rank)")
    base = [sys.executable, "-m", "testbed.bench.collectives", "--worker", "--world", str(world),
            "--sizes", ",".join(map(str, sizes)), "--collectives", ",".join(collectives)]
    if reps:
        base += ["--reps", str(reps)]
    results = run_workers([lambda r=r: launch(r, base + ["--rank", str(r), "--host", hosts[r]]) for r in range(world)],
                          lambda hello: {"grpc": [h["grpc"] for h in hello], "store": hello[0]["store"]})
    return _rows(results, sizes, collectives)


def run_workers(launches: list[Callable[[], subprocess.Popen]], peers: Callable[[list[dict]], object]) -> list[dict]:
    """Start one worker per launch and rendezvous them over their stdin/stdout: read each one's hello
    (a JSON line), send every one ``peers(hellos)`` as JSON, return each one's result line. Workers
    still running when this returns or fails are killed."""
    procs: list[subprocess.Popen] = []
    try:
        for launch in launches:
            procs.append(launch())
        hello = [_read_json(p, r) for r, p in enumerate(procs)]
        line = json.dumps(peers(hello)) + "\n"
        for p in procs:
            p.stdin.write(line)
            p.stdin.flush()
        results = [_read_json(p, r) for r, p in enumerate(procs)]
        for p in procs:
            p.wait(timeout=60)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _read_json(proc: subprocess.Popen, rank: int) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker {rank} ended early (exit code {proc.wait()}); its stderr is above")
    return json.loads(line)


def _rows(results: list[dict], sizes: list[int], collectives: tuple[str, ...]) -> list[Row]:
    rows = []
    for coll in collectives:
        for size in sizes:
            med = {}
            for impl in ("ours", "gloo", "ours_serialize"):
                per_rank = [res["times"][impl][coll][str(size)] for res in results]
                slowest = [max(rep) for rep in zip(*per_rank)]  # a rep ends when its last rank is done
                med[impl] = statistics.median(slowest)
            rows.append(Row(coll, size, med["ours"], med["gloo"], len(slowest), med["ours_serialize"]))
    return rows


def format_table(rows: list[Row], target: float | None = None) -> str:
    """The rows as a table; ``target``: the ours/gloo bound to mark (default: each row's)."""
    lines = [f"{'collective':<17} {'size':>8} {'ours ms':>9} {'(serde)':>9} {'gloo ms':>9} {'ours/gloo':>9} "
             f"{'target':>7}  met"]
    for r in rows:
        bound = r.target if target is None else target
        met = "yes" if r.ratio <= bound else "NO"
        lines.append(f"{r.collective:<17} {_human(r.size_bytes):>8} {r.ours_s * 1e3:>9.3f} "
                     f"{r.ours_serialize_s * 1e3:>9.3f} {r.gloo_s * 1e3:>9.3f} {r.ratio:>9.2f} "
                     f"{'<=' + format(bound, 'g'):>7}  {met}")
    return "\n".join(lines)


STAR_TARGET = 1.05  # inside the shaped star


def run_star(sizes: list[int], collectives: tuple[str, ...] = COLLECTIVES, reps: int | None = None,
             bandwidths_mbps: tuple[float, ...] = (100, 1000), delays_ms: tuple[float, ...] = (0, 5),
             profiles: list | None = None) -> list[dict]:
    """The benchmark with its 4 ranks in the hosts of an emulated 4-host star (root), per profile:
    every bandwidth with every delay, or the ``profiles`` (LinkProfiles) given. Each row also carries
    what the queues dropped and TCP repaired while its profile ran (``loss_counters``)."""
    from testbed.net.emulation import Emulation
    from testbed.net.profile import LinkProfile
    from testbed.net.topology import load_topology

    if profiles is None:
        profiles = [LinkProfile(bandwidth_mbps=bw, delay_ms=d) for bw in bandwidths_mbps for d in delays_ms]
    out = []
    with Emulation(load_topology("star")) as em:
        hosts = em.topology.host_names

        def launch(rank: int, argv: list[str]) -> subprocess.Popen:
            return em.popen(hosts[rank], argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True)

        for prof in profiles:
            em.apply_profile(prof)
            before = loss_counters(em)
            rows = run(len(hosts), sizes, collectives, hosts=[em.data_ip(h) for h in hosts], reps=reps, launch=launch)
            lost = {k: v - before.get(k, 0) for k, v in loss_counters(em).items()}
            loss = f", {prof.loss_pct:g}% loss" if prof.loss_pct else ""
            print(f"# 4-host star, {prof.bandwidth_mbps:g} Mbit/s and {prof.delay_ms:g} ms{loss} between any two hosts "
                  f"({em.mechanism})", flush=True)
            print(format_table(rows, STAR_TARGET), flush=True)
            print(f"# while it ran (ours and gloo): {describe_losses(lost)}", flush=True)
            out += [asdict(r) | {"world": len(hosts), "bandwidth_mbps": prof.bandwidth_mbps, "delay_ms": prof.delay_ms,
                                 "loss_pct": prof.loss_pct, "ratio": r.ratio, **lost} for r in rows]
    return out


def loss_counters(em) -> dict[str, int]:
    """Packets dropped by the qdiscs of the hosts (their egress: the links' sending side) and of the root
    namespace (the switch ports: the receiving side), and the hosts' TCP recovery counters, since boot.
    A qdisc drop at a host's own egress is not a loss on the wire: TCP retries the packet and reduces
    its window (local congestion); a drop at a switch port is one, repaired by retransmission."""
    import re

    def drops(text: str) -> int:
        return sum(int(m) for m in re.findall(r"dropped (\d+)", text))

    def qdiscs(host: str | None) -> str:
        argv = ["tc", "-s", "qdisc", "show"]
        if host is None:
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        p = em.popen(host, argv, device=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return p.communicate()[0]

    rec = em.tcp_recoveries()
    return {"host_queue_drops": sum(drops(qdiscs(h)) for h in em.topology.host_names),
            "switch_queue_drops": drops(qdiscs(None)), "tcp_retransmitted_segments": em.retransmitted_segments(),
            "tcp_loss_probes": rec["TCPLossProbes"], "tcp_timeouts": rec["TCPTimeouts"]}


def describe_losses(c: dict[str, int]) -> str:
    return (f"{c['host_queue_drops']} packets dropped at the hosts' egress queues (retried by TCP, not lost on "
            f"the wire), {c['switch_queue_drops']} at the switch ports; TCP retransmitted "
            f"{c['tcp_retransmitted_segments']} segments ({c['tcp_loss_probes']} loss probes, "
            f"{c['tcp_timeouts']} timeouts)")


def _human(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


# -- one worker (one rank) -------------------------------------------------------------


def worker(rank: int, world: int, host: str, sizes: list[int], collectives: tuple[str, ...], reps: int | None) -> None:
    import torch
    import torch.distributed as dist

    from testbed.comm.grpc import GrpcCommunicator, PeerServer

    torch.set_num_threads(1)  # ranks share the machine's cores; both transports get the same
    server = PeerServer(f"{host}:0")
    store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False) if rank == 0 else None
    print(json.dumps({"grpc": server.address, "store": f"{host}:{store.port}" if store else None}), flush=True)
    peers = json.loads(sys.stdin.readline())
    if store is None:
        store_host, store_port = peers["store"].rsplit(":", 1)
        store = dist.TCPStore(store_host, int(store_port), world, is_master=False)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # bind gloo to this rank's address
    opts._timeout = timedelta(seconds=300)
    gloo = dist.ProcessGroupGloo(store, rank, world, opts)
    comm = GrpcCommunicator(rank, peers["grpc"], server.hub, "bench", timeout_s=300)
    times: dict = {"ours": {}, "gloo": {}, "ours_serialize": {}}
    for coll in collectives:
        for impl in times:
            times[impl][coll] = {}
        for size in sizes:
            ops = _ops(coll, comm, gloo, rank, world)
            x = torch.full((size // 4,), float(rank + 1))
            n = reps or reps_for(size)
            for impl, op in ops.items():
                _check(coll, op(x.clone()), rank, world, impl)  # warm-up, and proof both compute the same
            for impl in times:
                times[impl][coll][str(size)] = []
            for _ in range(n):
                for impl, op in ops.items():  # alternate rep by rep: both see the same load
                    gloo.barrier().wait()
                    comm.trace.start()  # keep the trace from growing over thousands of calls
                    t0 = time.perf_counter()
                    op(x)
                    times[impl][coll][str(size)].append(time.perf_counter() - t0)
                    if impl == "ours":
                        times["ours_serialize"][coll][str(size)].append(comm.trace.serialize_s)
    gloo.barrier().wait()
    print(json.dumps({"rank": rank, "times": times}), flush=True)
    comm.close()
    gloo.barrier().wait()  # every stream is closed before any server stops
    server.stop()


def _ops(coll: str, comm, gloo, rank: int, world: int) -> dict:
    import torch

    if coll == "all_gather":
        def gloo_op(x):
            out = [torch.empty_like(x) for _ in range(world)]
            gloo.allgather([out], [x]).wait()
            return out
        return {"ours": comm.all_gather, "gloo": gloo_op}

    def gloo_reduce(x):
        y = x.clone()  # ours returns a new tensor; gloo reduces in place: copy for the same contract
        gloo.allreduce([y]).wait()
        return y
    algorithm = coll.removeprefix("all_reduce_")
    return {"ours": lambda x: comm.all_reduce(x, algorithm), "gloo": gloo_reduce}


def _check(coll: str, out, rank: int, world: int, impl: str) -> None:
    import torch

    if coll == "all_gather":
        ok = all(torch.all(t == float(r + 1)).item() for r, t in enumerate(out))
    else:
        ok = torch.all(out == float(world * (world + 1) // 2)).item()
    if not ok:
        raise RuntimeError(f"rank {rank}: {impl} {coll} returned a wrong result")


# -- command line ------------------------------------------------------------------------


def _numbers(text: str, field: str, low: float) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(","))
    except ValueError:
        out = ()
    check(bool(out) and all(x >= low for x in out), field, text, f"comma-separated numbers >= {low:g}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.collectives", description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="2,4,8", help="numbers of ranks (processes), comma-separated, run in turn")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"per-rank tensor sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--collectives", default=",".join(COLLECTIVES), help=f"subset of {','.join(COLLECTIVES)}")
    ap.add_argument("--hosts", help="comma-separated address per rank (default 127.0.0.1..N)")
    ap.add_argument("--reps", type=int, help="timed reps per size (default: 30 small, 10 medium, 5 large)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--mininet", action="store_true",
                    help="inside a 4-host star at 100 and 1000 Mbit/s x 0 and 5 ms instead (root; --world is 4)")
    ap.add_argument("--bandwidths", default="100,1000", help="--mininet: link rates in Mbit/s (default 100,1000)")
    ap.add_argument("--delays", default="0,5", help="--mininet: delays between two hosts in ms (default 0,5)")
    ap.add_argument("--ceiling", action="store_true",
                    help="instead: one link's round trip and GB/s for a socket, gloo, bare gRPC and ours "
                         "(testbed.bench.ceiling; sizes default 1M,16M,64M)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    worlds = [int(w) for w in a.world.split(",") if w.strip().isdigit()]
    check(len(worlds) == len(a.world.split(",")) and all(w >= 2 for w in worlds), "world", a.world,
          "comma-separated integers >= 2")
    check(a.reps is None or a.reps >= 1, "reps", a.reps, "an integer >= 1")
    colls = tuple(c.strip() for c in a.collectives.split(","))
    check(set(colls) <= set(COLLECTIVES), "collectives", a.collectives, ", ".join(COLLECTIVES))
    if a.ceiling:
        from testbed.bench import ceiling

        sizes = parse_sizes("1M,16M,64M" if a.sizes == DEFAULT_SIZES else a.sizes)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        result = ceiling.run(sizes, a.reps or 5)
        print(f"# one link, rank 0 -> rank 1 over loopback, {os.cpu_count()} cores, load average {load0:.1f} before / "
              f"{os.getloadavg()[0]:.1f} after, {time.perf_counter() - t0:.0f} s; median GB/s of reps, timed at the "
              "receiver", flush=True)
        print(ceiling.format_table(result), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"times": {str(k): v for k, v in result.times.items()}, "rtt": result.rtt}, f, indent=1)
        return 0
    sizes = parse_sizes(a.sizes)
    if a.worker:
        worker(a.rank, worlds[0], a.host, sizes, colls, a.reps)
        return 0
    if a.mininet:
        out = run_star(sizes, colls, a.reps, _numbers(a.bandwidths, "bandwidths", 0.001), _numbers(a.delays, "delays", 0))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    hosts = a.hosts.split(",") if a.hosts else None
    check(hosts is None or len(worlds) == 1, "hosts", a.hosts, "one world size (--world N) with --hosts")
    out = []
    for world in worlds:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        rows = run(world, sizes, colls, hosts, a.reps)
        print(f"# {world} ranks over {'loopback' if not hosts else ','.join(hosts)}, {os.cpu_count()} cores, "
              f"load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after, {time.perf_counter() - t0:.0f} s; "
              "median of reps, each rep timed by its slowest rank", flush=True)
        print(format_table(rows), flush=True)
        out += [asdict(r) | {"world": world, "ratio": r.ratio} for r in rows]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
