"""The host probe: CPU seconds of one fixed block on one thread."""

from __future__ import annotations

import pytest
import torch

from testbed.errors import ConfigError
from testbed.models.probe import host_probe_s


def test_the_probe_times_cpu_on_one_thread_and_gives_the_threads_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = host_probe_s(runs=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert 0 < t < 5.0  # about 12 ms on the reference VM; seconds would mean it timed something else


@pytest.mark.parametrize("runs", [0, -1, 1.5, True, "3"])
def test_bad_run_counts_are_refused_naming_the_field(runs):
    with pytest.raises(ConfigError, match="runs"):
        host_probe_s(runs=runs)
