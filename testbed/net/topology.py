"""Topologies as pure data: hosts, switches, links with per-direction LinkProfiles.

Validated without root; testbed.net.emulation turns one into a live Mininet network. The
same structure comes from topologies/*.yaml or inline from an experiment YAML (a dict):

    name: star
    hosts: [h1, {name: h2, device: {speed: 0.5, threads: 1, memory_mb: 2048}}]
    switches: [s1, {name: cell, medium: {bandwidth_mbps: 20}, sweep: full}]
    links:
      - {a: h1, b: s1, profile: {bandwidth_mbps: 100, delay_ms: 5}, sweep: half}
      - {a: h2, b: s1, a_to_b: {bandwidth_mbps: 10}, b_to_a: {bandwidth_mbps: 50}}

A link's ``profile`` shapes both directions; ``a_to_b``/``b_to_a`` shape each direction. A
switch ``medium`` is one shaped bottleneck that every frame entering the switch passes (one
Wi-Fi cell: all hosts share its capacity). Hosts never forward: two hosts talk over their direct
link if they have one, else over the (loop-free) switch tree that connects them.

Sweeps (``with_sweep``): an experiment reshapes all links with one LinkProfile between cells.
Each link and medium says how that profile maps onto it (``sweep:``):
  full  -- takes the sweep profile as it is (mesh links, line hops, edge access links, a medium);
  half  -- bandwidth and queue as given, half the delay and jitter, and the loss that compounds
           over two hops to the given loss (star access links: every host pair crosses two, so
           each pair's path equals the sweep profile);
  fixed -- keeps the profile written in the topology (the cloud server's fast link, unshaped
           access links under a shared medium).
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from testbed.errors import ConfigError, check
from testbed.net.profile import LinkProfile
from testbed.yamlfile import read_yaml

SWEEP_MODES = ("full", "half", "fixed")
MAX_HOSTS = 250  # data addresses are 10.0.0.1 .. 10.0.0.250
MAX_SWITCHES = 99  # keeps generated interface names within Linux's 15 characters
MAX_SPEED = 64.0  # a device core 64x faster than this host's is surely a typo
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")


@dataclass(frozen=True)
class DeviceProfile:
    """What an emulated edge device may use of this machine.

    ``speed`` is the speed of each of the device's cores in cores of this host (1.0: one core
    of this host; 0.25: a core four times slower, e.g. a small board); ``threads`` is how many
    cores the device has. The device gets a CFS quota of speed x threads cores of this host,
    pinned to ``threads`` cores (testbed.net.cgroups); ``threads`` None: no quota and no
    pinning unless speed is below 1 (then one core).
    """

    speed: float = 1.0
    threads: int | None = None
    memory_mb: int | None = None  # memory limit in MiB

    def __post_init__(self) -> None:
        s, t, m = self.speed, self.threads, self.memory_mb
        check(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= MAX_SPEED, "speed", s,
              f"a number in (0, {MAX_SPEED:g}] (1.0 = one core of this host)")
        check(t is None or (isinstance(t, int) and not isinstance(t, bool) and t >= 1), "threads", t,
              "an integer >= 1 or null")
        check(m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 16), "memory_mb", m,
              "an integer >= 16 or null")

    @property
    def cores(self) -> int:
        """Cores of the device (1 when ``threads`` is not given)."""
        return self.threads or 1

    @property
    def confined(self) -> bool:
        """True when the device needs a cgroup (a CPU quota, pinned cores or a memory limit)."""
        return self != DeviceProfile()

    def dilated(self, factor: float) -> "DeviceProfile":
        """The device ``factor`` times slower: what time dilation gives each device of this host."""
        return self if factor == 1 else replace(self, speed=self.speed / factor)


@dataclass(frozen=True)
class HostSpec:
    name: str
    device: DeviceProfile = field(default_factory=DeviceProfile)


@dataclass(frozen=True)
class SwitchSpec:
    name: str
    medium: LinkProfile | None = None  # shared bottleneck for every frame entering this switch
    sweep: str = "full"  # how a sweep profile maps onto the medium (only used with a medium)


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    a_to_b: LinkProfile = field(default_factory=LinkProfile)
    b_to_a: LinkProfile = field(default_factory=LinkProfile)
    sweep: str = "full"

    def profile_from(self, node: str) -> LinkProfile:
        """The profile of the direction leaving ``node``."""
        return self.a_to_b if node == self.a else self.b_to_a


@dataclass(frozen=True)
class PathEffect:
    """What a host-to-host path does to packets: delays add up, losses compound."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    bandwidth_mbps: float | None = None  # narrowest shaped hop (None: unshaped)
    rtt_ms: float = 0.0  # this path's delay plus the reverse path's delay


@dataclass(frozen=True)
class Topology:
    name: str
    hosts: tuple[HostSpec, ...]
    switches: tuple[SwitchSpec, ...] = ()
    links: tuple[LinkSpec, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    # -- queries ---------------------------------------------------------
    @property
    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def is_flat(self, n_hosts: int | None = None) -> bool:
        """Whether every pair of the first ``n_hosts`` hosts (all: None) is one link or one switch
        apart, so no link carries traffic between two other pairs (star, mesh, one shared medium)."""
        hosts = self.host_names[:n_hosts]
        return all(len(self.path(a, b)) <= 2 for a in hosts for b in hosts if a != b)

    def switch(self, name: str) -> SwitchSpec | None:
        return next((s for s in self.switches if s.name == name), None)

    def path(self, src: str, dst: str) -> list[tuple[LinkSpec, str]]:
        """Hops from host ``src`` to host ``dst`` as (link, node the hop leaves from)."""
        direct = [lk for lk in self.links if {lk.a, lk.b} == {src, dst}]
        if direct:
            return [(direct[0], src)]
        switches = {s.name for s in self.switches}
        prev: dict[str, tuple[LinkSpec, str] | None] = {src: None}
        todo = deque([src])
        while todo:
            node = todo.popleft()
            for lk in self.links:
                if node not in (lk.a, lk.b):
                    continue
                nxt = lk.b if node == lk.a else lk.a
                if nxt in prev or (nxt != dst and nxt not in switches):
                    continue  # hosts never forward
                prev[nxt] = (lk, node)
                todo.append(nxt)
        if dst not in prev:
            return []
        hops, node = [], dst
        while prev[node] is not None:
            lk, frm = prev[node]  # type: ignore[misc]
            hops.append((lk, frm))
            node = frm
        return hops[::-1]

    def one_way(self, src: str, dst: str) -> PathEffect:
        """Delay, jitter, loss and narrowest bandwidth from ``src`` to ``dst`` (rtt_ms left 0)."""
        delay = jitter = 0.0
        keep = 1.0
        bws: list[float] = []
        for lk, frm in self.path(src, dst):
            for prof in [lk.profile_from(frm)] + self._mediums_entered(lk, frm):
                delay, jitter = delay + prof.delay_ms, jitter + prof.jitter_ms
                keep *= 1 - prof.loss_pct / 100
                if prof.bandwidth_mbps is not None:
                    bws.append(prof.bandwidth_mbps)
        return PathEffect(delay, jitter, 100 * (1 - keep), min(bws) if bws else None)

    def path_effect(self, src: str, dst: str) -> PathEffect:
        """``one_way`` with ``rtt_ms`` filled in from both directions."""
        fwd = self.one_way(src, dst)
        return replace(fwd, rtt_ms=fwd.delay_ms + self.one_way(dst, src).delay_ms)

    def mediums(self, src: str, dst: str) -> list[SwitchSpec]:
        """The shared-medium switches the path from ``src`` to ``dst`` enters, in order."""
        out = []
        for lk, frm in self.path(src, dst):
            sw = self.switch(lk.b if frm == lk.a else lk.a)
            if sw is not None and sw.medium is not None:
                out.append(sw)
        return out

    def _mediums_entered(self, lk: LinkSpec, frm: str) -> list[LinkProfile]:
        to = lk.b if frm == lk.a else lk.a
        sw = self.switch(to)
        return [sw.medium] if sw is not None and sw.medium is not None else []

    # -- sweeps ----------------------------------------------------------
    def with_sweep(self, profile: LinkProfile) -> "Topology":
        """This topology with ``profile`` mapped onto every link and medium by its ``sweep`` mode."""
        links = tuple(replace(lk, a_to_b=_swept(lk.a_to_b, profile, lk.sweep),
                              b_to_a=_swept(lk.b_to_a, profile, lk.sweep)) for lk in self.links)
        switches = tuple(replace(s, medium=_swept(s.medium, profile, s.sweep)) if s.medium is not None else s
                         for s in self.switches)
        return replace(self, links=links, switches=switches)

    def dilated(self, factor: float) -> "Topology":
        """Every link, medium and device ``factor`` times slower (time-dilated emulation)."""
        if factor == 1:
            return self
        return replace(
            self,
            hosts=tuple(replace(h, device=h.device.dilated(factor)) for h in self.hosts),
            switches=tuple(replace(s, medium=s.medium.dilated(factor)) if s.medium is not None else s
                           for s in self.switches),
            links=tuple(replace(lk, a_to_b=lk.a_to_b.dilated(factor), b_to_a=lk.b_to_a.dilated(factor))
                        for lk in self.links))

    def to_dict(self) -> dict:
        def prof(p: LinkProfile) -> dict:
            return {k: v for k, v in p.to_dict().items() if v != getattr(LinkProfile(), k)}

        return {
            "name": self.name,
            "hosts": [{"name": h.name, **({"device": {k: v for k, v in vars(h.device).items() if v is not None}}
                                          if h.device != DeviceProfile() else {})} for h in self.hosts],
            "switches": [{"name": s.name, **({"medium": prof(s.medium), "sweep": s.sweep} if s.medium else {})}
                         for s in self.switches],
            "links": [{"a": lk.a, "b": lk.b, "a_to_b": prof(lk.a_to_b), "b_to_a": prof(lk.b_to_a), "sweep": lk.sweep}
                      for lk in self.links],
        }


def _swept(own: LinkProfile, sweep: LinkProfile, mode: str) -> LinkProfile:
    if mode == "fixed":
        return own
    if mode == "full":
        return sweep
    return half_profile(sweep)


def half_profile(p: LinkProfile) -> LinkProfile:
    """The ``half`` sweep mapping: one of two hops in series (star access links) whose path is ``p``:
    same rate and queue, half the delay and jitter, and the loss that compounds over two hops to p's."""
    keep_one_hop = math.sqrt(1 - p.loss_pct / 100)
    return replace(p, delay_ms=p.delay_ms / 2, jitter_ms=p.jitter_ms / 2, loss_pct=100 * (1 - keep_one_hop))


# -- validation -------------------------------------------------------------
def _validate(t: Topology) -> None:
    check(isinstance(t.name, str) and bool(t.name), "topology.name", t.name, "a non-empty string")
    check(1 <= len(t.hosts) <= MAX_HOSTS, "topology.hosts", len(t.hosts), f"1 to {MAX_HOSTS} hosts")
    check(len(t.switches) <= MAX_SWITCHES, "topology.switches", len(t.switches), f"at most {MAX_SWITCHES}")
    names: set[str] = set()
    for kind, items in (("hosts", t.hosts), ("switches", t.switches)):
        for i, item in enumerate(items):
            check(isinstance(item.name, str) and bool(_NAME.match(item.name)), f"topology.{kind}[{i}].name",
                  item.name, "a letter then up to 15 letters, digits or _")
            check(item.name not in names, f"topology.{kind}[{i}].name", item.name, "a name not used before")
            names.add(item.name)
    for i, s in enumerate(t.switches):
        check(s.sweep in SWEEP_MODES, f"topology.switches[{i}].sweep", s.sweep, ", ".join(SWEEP_MODES))
    pairs: set[frozenset] = set()
    for i, lk in enumerate(t.links):
        for end in ("a", "b"):
            check(getattr(lk, end) in names, f"topology.links[{i}].{end}", getattr(lk, end),
                  "a host or switch named in this topology")
        check(lk.a != lk.b, f"topology.links[{i}].b", lk.b, "a node other than a")
        check(frozenset((lk.a, lk.b)) not in pairs, f"topology.links[{i}]", f"{lk.a}-{lk.b}", "one link per pair")
        pairs.add(frozenset((lk.a, lk.b)))
        check(lk.sweep in SWEEP_MODES, f"topology.links[{i}].sweep", lk.sweep, ", ".join(SWEEP_MODES))
    _check_loop_free(t)
    hosts = t.host_names
    for i, src in enumerate(hosts):
        for dst in hosts[i + 1:]:
            check(bool(t.path(src, dst)), "topology.links", f"no path {src}-{dst}",
                  "links that connect every pair of hosts (hosts do not forward)")


def _check_loop_free(t: Topology) -> None:
    """Bridged (switch) links must form a forest: Linux bridges without STP flood loops forever,
    and a host attached twice to one switch tree would have two paths to its peers."""
    switches = {s.name for s in t.switches}
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent.get(x, x)
        return x

    for i, lk in enumerate(t.links):
        if lk.a not in switches and lk.b not in switches:
            continue  # direct host-host link: routed, never bridged
        ra, rb = root(lk.a), root(lk.b)
        check(ra != rb, f"topology.links[{i}]", f"{lk.a}-{lk.b}", "links that close no loop through switches")
        parent[ra] = rb


# -- loading ----------------------------------------------------------------
CPU_SHARE_MIGRATION = ("`speed` instead (cpu_share was replaced): speed is per device core in cores of this host, "
                       "so cpu_share S on a C-core host with T threads is speed S*C/T (e.g. 0.25 on 2 cores, "
                       "1 thread: speed 0.5)")
_TOP_KEYS = ("name", "hosts", "switches", "links", "description")
_LINK_KEYS = ("a", "b", "profile", "a_to_b", "b_to_a", "sweep")


def _keys(d: object, allowed: tuple[str, ...], where: str) -> dict:
    check(isinstance(d, dict), where, d, f"a mapping with keys {', '.join(allowed)}")
    assert isinstance(d, dict)
    for k in d:
        check(k in allowed, f"{where}.{k}", d[k], f"known keys: {', '.join(allowed)}")
    return d


def _named(item: object, allowed: tuple[str, ...], where: str) -> dict:
    """Hosts and switches may be written as a bare name or as a mapping with ``name``."""
    d = {"name": item} if isinstance(item, str) else _keys(item, allowed, where)
    check("name" in d, f"{where}.name", None, "a name")
    return d


def _host(item: object, where: str) -> HostSpec:
    d = _named(item, ("name", "device"), where)
    return HostSpec(d["name"], device_profile(d.get("device"), f"{where}.device"))


def device_profile(raw: object, where: str) -> DeviceProfile:
    """A DeviceProfile from its mapping (None: the default), errors naming ``where``'s fields."""
    raw = raw or {}
    if isinstance(raw, dict) and "cpu_share" in raw:
        raise ConfigError(f"{where}.cpu_share", raw["cpu_share"], CPU_SHARE_MIGRATION)
    dev = _keys(raw, ("speed", "threads", "memory_mb"), where)
    try:
        return DeviceProfile(**dev)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.field}", e.value, e.allowed) from None


def full_mesh(devices: list[DeviceProfile], name: str = "mesh") -> Topology:
    """Hosts h1..hN with these devices and one direct link per pair that takes the sweep profile as it
    is (``sweep: full``): every ordered pair of hosts gets the cell's profile, as in topologies/mesh.yaml."""
    hosts = tuple(HostSpec(f"h{i + 1}", d) for i, d in enumerate(devices))
    links = tuple(LinkSpec(a.name, b.name) for i, a in enumerate(hosts) for b in hosts[i + 1:])
    return Topology(name, hosts, (), links)


def _switch(item: object, where: str) -> SwitchSpec:
    d = _named(item, ("name", "medium", "sweep"), where)
    medium = LinkProfile.from_dict(d["medium"], f"{where}.medium") if d.get("medium") is not None else None
    return SwitchSpec(d["name"], medium, d.get("sweep", "full"))


def _link(item: object, where: str) -> LinkSpec:
    d = _keys(item, _LINK_KEYS, where)
    for end in ("a", "b"):
        check(end in d, f"{where}.{end}", None, "a host or switch name")
    if "profile" in d:
        check("a_to_b" not in d and "b_to_a" not in d, f"{where}.profile", d["profile"],
              "either profile (both directions) or a_to_b/b_to_a, not both")
        ab = ba = LinkProfile.from_dict(d["profile"] or {}, f"{where}.profile")
    else:
        ab = LinkProfile.from_dict(d.get("a_to_b") or {}, f"{where}.a_to_b")
        ba = LinkProfile.from_dict(d.get("b_to_a") or {}, f"{where}.b_to_a")
    return LinkSpec(d["a"], d["b"], ab, ba, d.get("sweep", "full"))


def topology_from_dict(d: object, where: str = "topology") -> Topology:
    """Build and validate a Topology from a mapping (a YAML file's content or an inline block)."""
    d = _keys(d, _TOP_KEYS, where)
    check("hosts" in d and isinstance(d["hosts"], list), f"{where}.hosts", d.get("hosts"), "a list of hosts")
    for key in ("switches", "links"):
        check(isinstance(d.get(key, []), list), f"{where}.{key}", d.get(key), "a list")
    try:
        return Topology(
            name=d.get("name", "topology"),
            hosts=tuple(_host(h, f"{where}.hosts[{i}]") for i, h in enumerate(d["hosts"])),
            switches=tuple(_switch(s, f"{where}.switches[{i}]") for i, s in enumerate(d.get("switches", []))),
            links=tuple(_link(lk, f"{where}.links[{i}]") for i, lk in enumerate(d.get("links", []))),
        )
    except ConfigError as e:
        if where != "topology" and e.field.startswith("topology"):
            raise ConfigError(where + e.field[len("topology"):], e.value, e.allowed) from None
        raise


def load_topology(source: str | Path | dict) -> Topology:
    """A Topology from a YAML file path, a built-in name (``star`` -> topologies/star.yaml) or a dict."""
    if isinstance(source, dict):
        return topology_from_dict(source)
    path = Path(source)
    if not path.exists() and not path.suffix:
        path = TOPOLOGY_DIR / f"{source}.yaml"
    check(path.is_file(), "topology", str(source),
          f"a YAML file, or one of: {', '.join(sorted(p.stem for p in TOPOLOGY_DIR.glob('*.yaml')))}")
    return topology_from_dict(read_yaml(path), where=path.name)


TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "topologies"
