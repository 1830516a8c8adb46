"""Time dilation's factor: auto picks the smallest F at which every node gets its whole device;
bad factors are refused naming the field; the factor reaches rows, manifest and the start line."""

from __future__ import annotations

import json
import os

import pytest

from testbed.errors import ConfigError
from testbed.experiment.checks import _check_topology
from testbed.experiment.cli import run_main
from testbed.experiment.dilation import resolve_dilation
from testbed.experiment.spec import parse_spec
from testbed.experiment.store import read_rows
from testbed.experiment.topology import experiment_topology, node_devices

from .helpers import tiny, write


def _spec(**over):
    return parse_spec(tiny(**{"backend": "mininet", "nodes": {"count": 4}, **over}))


def _factor(spec, cores: int) -> float:
    return resolve_dilation(spec, _check_topology(spec), host_cores=cores).factor


def test_auto_is_the_smallest_factor_that_fits_the_host():
    spec = _spec()  # 4 nodes x 1 thread x speed 1 = 4 cores of demand; 0.5 cores reserved
    assert _factor(spec, 2) == 2.67  # 4 / 1.5, rounded up
    assert _factor(spec, 1) == 8.0  # 4 / 0.5
    assert _factor(spec, 16) == 1.0  # room for everyone: no dilation
    assert _factor(_spec(nodes={"count": 4, "threads": 2}), 2) == 5.34  # 8 / 1.5 rounded up
    slow = _spec(nodes={"count": 4, "device": {"speed": 0.25}})  # four quarter-speed boards need one core
    assert _factor(slow, 2) == 1.0
    fast = _spec(nodes={"count": 4, "device": {"speed": 3}})  # a device core 3x this host's: F >= 3
    assert _factor(fast, 64) == 3.0
    assert _factor(_spec(emulation={"reserve_cores": 0}), 2) == 2.0


def test_a_core_kept_for_the_network_is_no_device_core():
    net = _spec(emulation={"network_core": True})  # 4 device cores of demand; the reserve becomes a whole core
    d = resolve_dilation(net, _check_topology(net), host_cores=2)
    assert d.factor == 4.0 and d.network_core and d.device_cores == 1 and not d.oversubscribed
    assert "one kept for the network" in d.explain()
    assert _factor(_spec(emulation={"network_core": True, "reserve_cores": 2}), 4) == 2.0  # a larger reserve stays
    fixed = _spec(emulation={"network_core": True, "time_dilation": 2})  # 2 device cores at F=2, 1 left
    assert resolve_dilation(fixed, _check_topology(fixed), host_cores=2).oversubscribed
    with pytest.raises(ConfigError) as e:
        resolve_dilation(net, _check_topology(net), host_cores=1)
    assert e.value.field == "emulation.network_core" and "1 core" in e.value.allowed
    off = parse_spec(tiny(backend="inprocess", nodes={"count": 4}, emulation={"network_core": True}))
    assert not resolve_dilation(off, _check_topology(off), host_cores=1).network_core  # mininet only


def test_fixed_factor_and_what_it_warns_about():
    d = resolve_dilation(_spec(emulation={"time_dilation": 1}), _check_topology(_spec()), host_cores=2)
    assert d.factor == 1.0 and d.mode == "fixed" and d.oversubscribed
    assert "4 node(s) need 4 core(s)" in d.warning() and "time_dilation: auto" in d.warning()
    d3 = resolve_dilation(_spec(emulation={"time_dilation": 3}), _check_topology(_spec()), host_cores=2)
    assert d3.factor == 3.0 and d3.warning() is None
    assert "3x slower" in d3.explain() and "divided by 3" in d3.explain()
    with pytest.raises(ConfigError) as e:  # a device faster than a host core cannot be emulated at F=2
        resolve_dilation(_spec(nodes={"count": 4, "device": {"speed": 3}}, emulation={"time_dilation": 2}),
                         _check_topology(_spec()), host_cores=64)
    assert e.value.field == "emulation.time_dilation" and ">= 3" in e.value.allowed


def test_other_work_on_the_host_is_measured_and_warned_about():
    """busy_cores reads /proc/stat: a process spinning on a core shows as (about) one busy core."""
    import subprocess
    import sys

    from testbed.experiment.dilation import BUSY_WARN_CORES, busy_cores, busy_warning

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and 0.6 <= busy <= os.cpu_count()
    d = resolve_dilation(_spec(), _check_topology(_spec()), host_cores=2)
    w = busy_warning(1.0, d)
    assert w is not None and "1 of this host's cores busy" in w and "quiet host" in w
    assert busy_warning(BUSY_WARN_CORES, d) is None and busy_warning(None, d) is None
    off = parse_spec(tiny(backend="inprocess", nodes={"count": 4}))
    assert busy_warning(2.0, resolve_dilation(off, _check_topology(off), host_cores=1)) is None


def test_backends_that_run_in_real_time_get_factor_one():
    for backend in ("inprocess", "sim"):
        spec = parse_spec(tiny(backend=backend, nodes={"count": 4}))
        d = resolve_dilation(spec, _check_topology(spec), host_cores=1)
        assert d.factor == 1.0 and d.mode == "off"


def test_a_factor_over_1000_is_refused_naming_the_field():
    spec = parse_spec(tiny(backend="mininet", nodes={"count": 4, "threads": 256}, topology={
        "name": "q", "hosts": ["a", "b", "c", "d"], "switches": ["s"],
        "links": [{"a": h, "b": "s"} for h in "abcd"]}))
    with pytest.raises(ConfigError) as e:
        resolve_dilation(spec, _check_topology(spec), host_cores=1)  # 1024 device cores on half a core
    assert e.value.field == "emulation.time_dilation" and "<= 1000" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        resolve_dilation(_spec(emulation={"reserve_cores": 2}), _check_topology(_spec()), host_cores=2)
    assert e.value.field == "emulation.reserve_cores"


def test_devices_come_from_the_experiment_else_the_topology():
    spec = _spec(nodes={"count": 2, "threads": 2}, topology={
        "name": "pair", "hosts": [{"name": "a", "device": {"speed": 0.5}}, "b", "c"], "switches": ["s"],
        "links": [{"a": h, "b": "s"} for h in "abc"]})
    devs = node_devices(spec)
    assert [(d.speed, d.threads) for d in devs] == [(0.5, 2), (1.0, 2)]
    assert experiment_topology(spec).hosts[2].device.threads is None  # no node there: left alone
    over = parse_spec({**spec.to_dict(), "nodes": {"count": 2, "device": {"speed": 0.25}}})
    assert [d.speed for d in node_devices(over)] == [0.25, 0.25]


def test_cpu_share_is_refused_with_the_migration():
    with pytest.raises(ConfigError) as e:
        _spec(nodes={"count": 4, "cpu_share": 0.25})
    assert e.value.field == "nodes.cpu_share" and "nodes.device.speed" in e.value.allowed
    from testbed.net.topology import topology_from_dict

    with pytest.raises(ConfigError) as e:
        topology_from_dict({"hosts": [{"name": "a", "device": {"cpu_share": 0.5}}, "b"], "links": [{"a": "a", "b": "b"}]})
    assert e.value.field == "topology.hosts[0].device.cpu_share" and "speed" in e.value.allowed


@pytest.mark.parametrize("emulation, field", [
    ({"time_dilation": 0.5}, "emulation.time_dilation"),
    ({"time_dilation": "x"}, "emulation.time_dilation"),
    ({"time_dilation": 0}, "emulation.time_dilation"),
    ({"pace_compute": "yes"}, "emulation.pace_compute"),
    ({"network_core": 1}, "emulation.network_core"),
])
def test_bad_factor_writes_nothing(tmp_path, monkeypatch, capsys, emulation, field):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "e.yaml", tiny(backend="mininet", nodes={"count": 4}, emulation=emulation))
    assert run_main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and field in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_rows_and_manifest_carry_the_factor(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    path = write(tmp_path / "e.yaml", tiny(methods=["single"], repetitions=1, warmup=0))
    assert run_main([str(path), "--out", str(out), "--no-plots"]) == 0
    assert "time dilation: off" in capsys.readouterr().err
    assert (read_rows(out)["time_dilation"] == 1.0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["time_dilation"]["factor"] == 1.0 and manifest["time_dilation"]["mode"] == "off"
