"""`testbed advise`: which method and parameters to use, ranked by predicted latency.

    testbed advise --model M --tokens T (--device NAME_OR_SPEC | --topology FILE)
                   (--link PROFILE | --fidelity-table FILE) [--nodes 2,3,4] [--top K] [--confirm]

The ranking is testbed.sim.advise.rank (every method, N, block parallel's n_b, ASTRA's G and K,
predicted on the simulator); each prediction carries the p90 |error| the simulator showed for
that method against the committed emulated references (testbed.sim.advise.ERROR_BAND_PCT).
``--confirm`` writes an experiment YAML (one per node count) with the top K on the same link and
devices, on ``backend: mininet``, and prints the one command that runs it by emulation; as root
with Mininet available it runs it (``--no-run``: only write).

``--device``: ``host`` (one core of this host) or a spec ``speed=S[,threads=T]`` (``S``: a core's
speed in cores of this host, as a topology's device profile; a bare number is the speed).
``--link``: ``BANDWIDTH[/DELAY[/LOSS]]`` in Mbit/s, one-way ms and percent (``none`` bandwidth:
unshaped), e.g. ``20/5`` or ``100/1/0.5``. ``--fidelity-table``: a fidelity.csv of `testbed
fidelity` (or a run's manifest.json): the link is its worst measured path (lowest goodput, turned
back into a wire rate; highest RTT / 2; highest ping loss).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, check
from testbed.net.profile import LinkProfile


def parse_device(text: str) -> tuple[float, int]:
    """``host`` | ``S`` | ``speed=S[,threads=T]`` -> (speed, threads)."""
    t = text.strip()
    if t == "host":
        return 1.0, 1
    fields: dict[str, str] = {}
    for part in t.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            k, v = "speed", k
        fields[k.strip()] = v.strip()
    bad = set(fields) - {"speed", "threads"}
    check(not bad, "--device", text, "host, a speed (0.5) or speed=S[,threads=T]")
    try:
        speed = float(fields.get("speed", "1"))
        threads = int(fields.get("threads", "1"))
    except ValueError:
        raise ConfigError("--device", text, "host, a speed (0.5) or speed=S[,threads=T]") from None
    from testbed.net.topology import DeviceProfile

    try:
        DeviceProfile(speed=speed, threads=threads)  # its own range checks
    except ConfigError as e:
        raise ConfigError(f"--device ({e.field})", e.value, e.allowed) from None
    return speed, threads


def parse_link(text: str) -> LinkProfile:
    """``BANDWIDTH[/DELAY[/LOSS]]`` (Mbit/s | none, ms, %) -> LinkProfile."""
    parts = [p.strip() for p in text.split("/")]
    allowed = "BANDWIDTH[/DELAY[/LOSS]] in Mbit/s (or none), one-way ms and percent, e.g. 20/5 or 100/1/0.5"
    check(1 <= len(parts) <= 3 and all(parts), "--link", text, allowed)
    try:
        bw = None if parts[0].lower() in ("none", "inf") else float(parts[0])
        delay = float(parts[1]) if len(parts) > 1 else 0.0
        loss = float(parts[2]) if len(parts) > 2 else 0.0
    except ValueError:
        raise ConfigError("--link", text, allowed) from None
    check(bw is None or (math.isfinite(bw) and bw > 0), "--link bandwidth", parts[0], "a number > 0 or none")
    check(math.isfinite(delay) and delay >= 0, "--link delay", parts[1] if len(parts) > 1 else "", "ms >= 0")
    check(math.isfinite(loss) and 0 <= loss < 100, "--link loss", parts[-1], "a percentage in [0, 100)")
    return LinkProfile(bw, delay, 0.0, loss)


def link_from_fidelity(path: str | Path) -> tuple[LinkProfile, str]:
    """The worst measured path of a fidelity table (fidelity.csv, or a run's manifest.json) as a link."""
    from testbed.sim.network import WireModel

    p = Path(path)
    check(p.is_file(), "--fidelity-table", str(path), "an existing fidelity.csv (testbed fidelity) or manifest.json")
    rows: list[dict[str, Any]] = []
    if p.suffix == ".json":
        try:
            for cell in json.loads(p.read_text()).get("fidelity") or []:
                rows += cell.get("paths", [])
        except (ValueError, AttributeError):
            raise ConfigError("--fidelity-table", str(path), "a run's manifest.json with a fidelity section") from None
    else:
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))

    def num(r: dict, k: str) -> float | None:
        v = r.get(k)
        try:
            x = float(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None
        return x if x is not None and math.isfinite(x) else None

    good = [num(r, "goodput_mbps") for r in rows]
    rtts = [num(r, "rtt_ms") for r in rows]
    check(any(g for g in good) and any(r is not None for r in rtts), "--fidelity-table", str(path),
          "a table with measured goodput_mbps and rtt_ms (testbed fidelity writes them)")
    w = WireModel()
    payload_per_wire = w.mss_bytes / (w.mss_bytes + w.segment_header_bytes)  # TCP payload per wire byte
    bw = min(g for g in good if g) / payload_per_wire
    delay = max(r for r in rtts if r is not None) / 2
    loss = max((num(r, "ping_loss_pct") or 0.0) for r in rows)
    return (LinkProfile(bw, delay, 0.0, min(loss, 99.0)),
            f"worst of {len(rows)} measured path(s) in {path}: goodput {min(g for g in good if g):.4g} Mbit/s "
            f"(wire rate {bw:.4g}), RTT {2 * delay:.3g} ms, loss {loss:g}%")


def confirm_specs(ranked, top: int, model: str, tokens: int, profile: LinkProfile, topology: Any,
                  device: tuple[float, int] | None, threads: int) -> list[dict]:
    """Experiment configs (as YAML mappings) for the top ``top``: one per node count among them."""
    from collections import OrderedDict

    chosen = [r.candidate for r in ranked[:top]]
    groups: "OrderedDict[int, list]" = OrderedDict()
    for c in chosen:
        groups.setdefault(c.nodes, []).append(c)
    out = []
    for n, cands in groups.items():
        nodes: dict[str, Any] = {"count": n, "threads": device[1] if device else threads}
        if device is not None:
            nodes["device"] = {"speed": device[0]}
        sweep: dict[str, Any] = {"bandwidth_mbps": [profile.bandwidth_mbps] if profile.bandwidth_mbps else [None],
                                 "delay_ms": [profile.delay_ms]}
        if profile.loss_pct:
            sweep["loss_pct"] = [profile.loss_pct]
        if sweep["bandwidth_mbps"] == [None]:
            del sweep["bandwidth_mbps"]
        out.append({
            "name": f"advise-{model}-T{tokens}-N{n}",
            "description": f"testbed advise: the top {top} predicted for {model} at {tokens} tokens, confirmed by "
                           "emulation",
            "model": {"name": model}, "input": {"tokens": tokens, "batch": 1, "seed": 0},
            "methods": [{"name": c.method, "params": c.params} for c in cands],
            "nodes": nodes, "topology": topology, "sweep": sweep, "repetitions": 3, "warmup": 1,
            "backend": "mininet", "emulation": {"time_dilation": "auto"}})
    return out


def _can_emulate() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        from testbed.backends import backend_class

        backend_class("mininet").check_available()
        return True
    except Exception:  # noqa: BLE001 - any reason it cannot run means: only write the file
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed advise", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model name (testbed.models)")
    p.add_argument("--tokens", type=int, required=True, help="input tokens")
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--device", metavar="NAME_OR_SPEC", help="every node's device: host | S | speed=S[,threads=T]")
    dev.add_argument("--topology", metavar="FILE", help="topology YAML (its hosts' devices and links; the sweep "
                     "profile maps onto its links as in a run)")
    link = p.add_mutually_exclusive_group(required=True)
    link.add_argument("--link", metavar="PROFILE", help="BANDWIDTH[/DELAY[/LOSS]]: Mbit/s, one-way ms, percent")
    link.add_argument("--fidelity-table", metavar="FILE", help="fidelity.csv of `testbed fidelity` or a run's "
                      "manifest.json: its worst measured path")
    p.add_argument("--nodes", default="2,3,4", help="node counts to try, comma-separated (default 2,3,4)")
    p.add_argument("--top", type=int, default=5, help="rows marked and confirmed (default 5)")
    p.add_argument("--confirm", action="store_true", help="write an experiment YAML for the top K and say how to "
                   "emulate it (run it when root with Mininet, unless --no-run)")
    p.add_argument("--no-run", action="store_true", help="with --confirm: only write the YAML")
    p.add_argument("--out", metavar="DIR", help="where --confirm writes (default results/advise-<time>)")
    p.add_argument("--calibration", metavar="DIR", default="results/calibration",
                   help="compute profiles directory (default results/calibration; missing ones are measured)")
    p.add_argument("--no-measure", action="store_true", help="never measure: stored profiles or extrapolation")
    args = p.parse_args(argv)
    try:
        return _advise(args)
    except ConfigError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: stopped by SIGINT; calibration measured so far is kept in {args.calibration}",
              file=sys.stderr)
        return 130


def _advise(args: argparse.Namespace) -> int:
    from testbed.models import CONFIGS
    from testbed.sim.advise import rank, separated
    from testbed.sim.simulator import SimConfig, Simulator, speed_from_device

    check(args.model in CONFIGS, "--model", args.model, " | ".join(CONFIGS))
    check(args.tokens >= 1, "--tokens", args.tokens, "an integer >= 1")
    check(args.top >= 1, "--top", args.top, "an integer >= 1")
    try:
        nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--nodes", args.nodes, "comma-separated integers >= 2, e.g. 2,3,4") from None
    check(len(nodes) >= 1 and min(nodes) >= 2, "--nodes", args.nodes, "comma-separated integers >= 2, e.g. 2,3,4")
    device: tuple[float, int] | None = None
    threads = 1
    if args.device is not None:
        device = parse_device(args.device)
        topology: Any = "star"
        speeds = [speed_from_device(device[0])]
        threads = device[1]
        where = f"star of devices at speed {device[0]:g} ({device[1]} thread(s))"
    else:
        from testbed.net.topology import load_topology

        topology = load_topology(args.topology)
        devs = [h.device for h in topology.hosts]
        check(len(devs) >= max(nodes), "--nodes", args.nodes,
              f"at most {len(devs)} (the hosts of {args.topology})")
        speeds = [speed_from_device(d.speed) for d in devs]
        where = f"topology {topology.name} (device speeds {', '.join(f'{d.speed:g}' for d in devs)})"
    if args.link is not None:
        profile, link_note = parse_link(args.link), f"link {args.link}"
    else:
        profile, link_note = link_from_fidelity(args.fidelity_table)
    sim = Simulator(SimConfig(calibration_dir=args.calibration, measure_missing=not args.no_measure),
                    log=lambda m: print(f"  {m}", flush=True))
    t0 = time.perf_counter()
    ranked, skipped = rank(sim, args.model, args.tokens, topology, profile, nodes, speeds, threads=threads)
    print(f"{args.model}, {args.tokens} tokens, {where}; {link_note}; N in {nodes}: {len(ranked)} candidates "
          f"predicted in {time.perf_counter() - t0:.1f} s")
    print(f"{'#':>3}  {'method':<36} {'latency_s':>10} {'band (p90 |error|)':>24} {'comm_s':>8}  source")
    for i, r in enumerate(ranked):
        mark = "*" if i < args.top else " "
        band = f"{r.low_s:.4g}-{r.high_s:.4g} (±{r.band_pct:.0f}%)" if math.isfinite(r.band_pct) else "no band"
        clear = "" if i + 1 >= len(ranked) else (" >" if separated(ranked, i) else " ~")
        print(f"{i + 1:>2}{mark}  {r.candidate.label:<36} {r.latency_s:>10.4g} {band:>24} {r.comm_s:>8.3g}  "
              f"{r.mechanism}{clear}")
    print("band: the method's p90 |error| against the committed emulated references (testbed validate on "
          "results/reference/ quickstart, astra_vit and delay); '>' faster than the next beyond both bands, '~' within them")
    for c, why in skipped:
        print(f"not predicted: {c.label}: {why}")
    if not args.confirm:
        return 0
    import yaml

    topo_entry = topology if isinstance(topology, str) else str(Path(args.topology).resolve())
    specs = confirm_specs(ranked, args.top, args.model, args.tokens, profile, topo_entry, device, threads)
    out = Path(args.out or f"results/advise-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for spec in specs:
        f = out / f"{spec['name']}.yaml"
        f.write_text(yaml.safe_dump(spec, sort_keys=False))
        files.append(f)
    from testbed.experiment.spec import load_spec

    for f in files:
        load_spec(f)  # what was written is a valid experiment
    command = " && ".join(f"sudo testbed run {shlex.quote(str(f))}" for f in files)
    print(f"wrote {', '.join(str(f) for f in files)}")
    if not args.no_run and _can_emulate():
        print(f"running by emulation: {command.replace('sudo ', '')}")
        for f in files:
            rc = subprocess.call([sys.executable, "-m", "testbed.cli", "run", str(f)])
            if rc != 0:
                return rc
        return 0
    print(f"confirm by emulation (root, Mininet): {command}")
    return 0
