"""Topologies as data: loading, validation with named fields, paths and sweep mapping (no root)."""

from __future__ import annotations

import math

import pytest

from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.net.topology import TOPOLOGY_DIR, load_topology, topology_from_dict

BUILTIN = ["star", "mesh", "line", "shared_medium", "edge_cloud"]


def two_hosts(**link) -> dict:
    return {"name": "pair", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2", **link}]}


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_topologies_load_and_connect_every_pair(name):
    t = load_topology(name)
    assert (TOPOLOGY_DIR / f"{name}.yaml").is_file() and len(t.hosts) == 4
    for src in t.host_names:
        for dst in t.host_names:
            if src != dst:
                assert t.path(src, dst), (src, dst)


def test_inline_mapping_equals_the_yaml_file():
    import yaml

    d = yaml.safe_load((TOPOLOGY_DIR / "star.yaml").read_text())
    assert topology_from_dict(d) == load_topology("star")


def test_profile_per_direction_and_symmetric():
    t = topology_from_dict({"hosts": ["a", "b"], "links": [
        {"a": "a", "b": "b", "a_to_b": {"bandwidth_mbps": 10, "delay_ms": 3}, "b_to_a": {"delay_ms": 7}}]})
    assert t.one_way("a", "b").delay_ms == 3 and t.one_way("b", "a").delay_ms == 7
    assert t.path_effect("a", "b").rtt_ms == 10
    assert t.one_way("a", "b").bandwidth_mbps == 10 and t.one_way("b", "a").bandwidth_mbps is None
    sym = topology_from_dict(two_hosts(profile={"delay_ms": 4}))
    assert sym.links[0].a_to_b == sym.links[0].b_to_a == LinkProfile(delay_ms=4)


def test_star_path_composes_delay_and_loss_over_both_access_links():
    t = topology_from_dict({"hosts": ["h1", "h2"], "switches": ["s1"], "links": [
        {"a": "h1", "b": "s1", "profile": {"delay_ms": 2, "loss_pct": 10, "bandwidth_mbps": 50}},
        {"a": "h2", "b": "s1", "profile": {"delay_ms": 3, "loss_pct": 10, "bandwidth_mbps": 20}}]})
    eff = t.one_way("h1", "h2")
    assert eff.delay_ms == 5 and math.isclose(eff.loss_pct, 19.0) and eff.bandwidth_mbps == 20
    assert [frm for _lk, frm in t.path("h1", "h2")] == ["h1", "s1"]


def test_shared_medium_counts_the_medium_once_per_path():
    t = load_topology("shared_medium")
    eff = t.one_way("h1", "h3")
    assert eff.delay_ms == 2 and eff.bandwidth_mbps == 50


def test_sweep_modes_map_the_profile_as_documented():
    sweep = LinkProfile(bandwidth_mbps=10, delay_ms=20, jitter_ms=4, loss_pct=19)
    star = load_topology("star").with_sweep(sweep)
    half = star.links[0].a_to_b
    assert (half.bandwidth_mbps, half.delay_ms, half.jitter_ms) == (10, 10, 2) and math.isclose(half.loss_pct, 10)
    eff = star.one_way("h1", "h4")  # two half links make the whole profile
    assert (eff.delay_ms, eff.jitter_ms, eff.bandwidth_mbps) == (20, 4, 10) and math.isclose(eff.loss_pct, 19)
    mesh = load_topology("mesh").with_sweep(sweep)
    assert all(lk.a_to_b == sweep and lk.b_to_a == sweep for lk in mesh.links)
    line = load_topology("line").with_sweep(sweep)
    assert line.one_way("h1", "h4").delay_ms == 60  # three full hops
    assert line.links[0].a_to_b == LinkProfile()  # host links stay fixed (unshaped)
    cloud = load_topology("edge_cloud").with_sweep(sweep)
    server_link = next(lk for lk in cloud.links if lk.a == "server")
    assert server_link.a_to_b == LinkProfile(1000, 0.5) and cloud.one_way("e1", "server").delay_ms == 20.5
    cell = load_topology("shared_medium").with_sweep(sweep)
    assert cell.switches[0].medium == sweep and cell.one_way("h1", "h2").delay_ms == 20


@pytest.mark.parametrize("d, field", [
    ({"hosts": ["h1"], "colour": "red"}, "topology.colour"),
    (two_hosts(profile={"bandwidth_mbps": 10, "delay": 5}), "topology.links[0].profile.delay"),
    (two_hosts(profile={"bandwidth_mbps": 0}), "topology.links[0].profile.bandwidth_mbps"),
    (two_hosts(profile={"delay_ms": 1, "jitter_ms": 2}), "topology.links[0].profile.jitter_ms"),
    (two_hosts(a_to_b={"loss_pct": 100}), "topology.links[0].a_to_b.loss_pct"),
    (two_hosts(profile={}, a_to_b={}), "topology.links[0].profile"),
    (two_hosts(sweep="quarter"), "topology.links[0].sweep"),
    ({"hosts": ["h1", {"name": "h2", "device": {"cpu_share": 1.5}}], "links": [{"a": "h1", "b": "h2"}]},
     "topology.hosts[1].device.cpu_share"),
    ({"hosts": ["h1", {"name": "h2", "device": {"gpus": 1}}]}, "topology.hosts[1].device.gpus"),
    ({"hosts": ["h1", "h1"]}, "topology.hosts[1].name"),
    ({"hosts": ["h1", "h-2"]}, "topology.hosts[1].name"),
    ({"hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h3"}]}, "topology.links[0].b"),
    ({"hosts": ["h1", "h2"]}, "topology.links"),
    ({"hosts": ["h1", "h2"], "switches": ["s1", "s2"], "links": [
        {"a": "h1", "b": "s1"}, {"a": "h2", "b": "s2"}, {"a": "s1", "b": "s2"}, {"a": "h1", "b": "s2"}]},
     "topology.links[3]"),
    ({"hosts": "h1"}, "topology.hosts"),
])
def test_bad_topologies_name_the_field(d, field):
    with pytest.raises(ConfigError) as e:
        topology_from_dict(d)
    assert e.value.field == field


def test_errors_from_a_file_name_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("hosts: [h1, h2]\nlinks: [{a: h1, b: h2, profile: {bandwidth_mbps: -1}}]\n")
    with pytest.raises(ConfigError) as e:
        load_topology(p)
    assert e.value.field == "mine.yaml.links[0].profile.bandwidth_mbps"


def test_unknown_topology_name_lists_the_builtin_ones():
    with pytest.raises(ConfigError) as e:
        load_topology("torus")
    assert e.value.field == "topology" and "star" in e.value.allowed


def test_inline_topology_errors_can_be_rebased():
    with pytest.raises(ConfigError) as e:
        topology_from_dict({"hosts": ["h1"], "extra": 1}, where="experiment.topology")
    assert e.value.field == "experiment.topology.extra"


def test_dilated_profile_and_topology_are_slower_by_the_factor():
    from testbed.net.topology import DeviceProfile

    p = LinkProfile(bandwidth_mbps=20, delay_ms=5, jitter_ms=1, loss_pct=2, queue_packets=50)
    d = p.dilated(4)
    assert (d.bandwidth_mbps, d.delay_ms, d.jitter_ms, d.loss_pct, d.queue_packets) == (5, 20, 4, 2, 50)
    assert LinkProfile().dilated(3) == LinkProfile() and p.dilated(1) is p
    topo = topology_from_dict({"name": "t", "hosts": [{"name": "a", "device": {"speed": 0.5, "threads": 2}}, "b"],
                               "switches": [{"name": "ap", "medium": {"bandwidth_mbps": 30}}],
                               "links": [{"a": "a", "b": "ap", "profile": {"bandwidth_mbps": 10, "delay_ms": 2}},
                                         {"a": "b", "b": "ap"}]})
    slow = topo.dilated(2)
    assert slow.hosts[0].device == DeviceProfile(speed=0.25, threads=2)
    assert slow.hosts[1].device.speed == 0.5  # every device, configured or not, runs at 1/F
    assert slow.switches[0].medium.bandwidth_mbps == 15
    assert slow.links[0].a_to_b == LinkProfile(5, 4) and slow.links[1].a_to_b == LinkProfile()
    assert slow.path_effect("a", "b").rtt_ms == 2 * topo.path_effect("a", "b").rtt_ms


def test_cpu_quota_gives_each_core_a_fixed_slice_and_cores_are_spread():
    from testbed.net.cgroups import allocate_cores, cpu_quota
    from testbed.net.topology import DeviceProfile

    assert cpu_quota(DeviceProfile()) is None  # full speed, not pinned: no limit
    assert cpu_quota(DeviceProfile(speed=1, threads=1)) == (10_000, 10_000)  # one whole core
    assert cpu_quota(DeviceProfile(speed=0.25, threads=1)) == (10_000, 40_000)  # a quarter core, 10 ms slices
    assert cpu_quota(DeviceProfile(speed=0.375, threads=2), slice_ms=5) == (10_000, 13_333)
    assert cpu_quota(DeviceProfile(speed=0.001, threads=1)) == (1000, 1_000_000)  # the kernel's longest period
    devs = [DeviceProfile(speed=0.375, threads=1)] * 4
    assert allocate_cores(devs, [0, 1]) == [[0], [1], [0], [1]]  # two per core, 0.75 of each
    mixed = [DeviceProfile(speed=0.2, threads=1), DeviceProfile(speed=0.5, threads=2), DeviceProfile()]
    assert allocate_cores(mixed, [0, 1, 2]) == [[2], [0, 1], None]
    assert allocate_cores([DeviceProfile(speed=1, threads=8)], [0, 1]) == [[0, 1]]


def test_half_mapping_compounds_to_the_profile():
    from testbed.net.topology import half_profile

    p = LinkProfile(50, 8, jitter_ms=2, loss_pct=19)
    h = half_profile(p)
    assert (h.bandwidth_mbps, h.delay_ms, h.jitter_ms) == (50, 4, 1)
    assert math.isclose((1 - h.loss_pct / 100) ** 2, 1 - p.loss_pct / 100)
