"""Reading a network namespace's TCP counters from its /proc/PID/net/snmp text."""

from __future__ import annotations

import pytest

from testbed.net.emulation import proc_counters, tcp_retransmits

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 6871234
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 24295 19037 2540 1879 0 6788305 6757772 2911 0 4201 0
Udp: InDatagrams NoPorts
Udp: 10 2
"""


def test_retransmitted_segments_are_read_by_name_from_the_tcp_lines():
    assert tcp_retransmits(SNMP) == 2911
    assert tcp_retransmits(open("/proc/net/snmp").read()) >= 0  # this kernel's own layout


def test_a_text_without_the_counter_is_refused():
    with pytest.raises(ValueError, match="RetransSegs"):
        tcp_retransmits("Udp: InDatagrams\nUdp: 1\n")


def test_a_section_reads_as_names_to_values():
    assert proc_counters(SNMP, "Udp") == {"InDatagrams": 10, "NoPorts": 2}
    assert proc_counters(SNMP, "TcpExt") == {}
    assert "TCPLossProbes" in proc_counters(open("/proc/net/netstat").read(), "TcpExt")  # this kernel's layout

