"""What `testbed clean` recognises as a run's root-namespace iptables (pure: a listing in, lines out)."""

from __future__ import annotations

from testbed.net.cleanup import run_rules

LISTING = """-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N TBNET-ab12
-N TBNET-live
-A FORWARD -j DOCKER
-A FORWARD -i tbab12s+ -m physdev --physdev-is-bridged -j TBNET-ab12
-A FORWARD -i tblives+ -m physdev --physdev-is-bridged -j TBNET-live
-A TBNET-ab12 -s 10.0.0.1/32 -m physdev --physdev-out tbab12s0-eth2 -j NFQUEUE --queue-num 1
-A TBNET-ab12 -j ACCEPT
"""


def test_a_runs_chain_and_hook_are_found_and_nothing_else():
    lines = run_rules(LISTING, lambda rid: rid == "ab12")
    assert lines == ["-N TBNET-ab12", "-A FORWARD -i tbab12s+ -m physdev --physdev-is-bridged -j TBNET-ab12"]
    assert len(run_rules(LISTING, lambda rid: True)) == 4  # DOCKER and the chains' own rules never
