"""Network emulation: topologies as data (topology), LinkProfile -> tc/iptables (tc), a live Mininet network
(emulation, shaping, batch), the receive-side NFQUEUE delay line (delayline, nfqueue), bandwidth-trace replay
(replay), capability probe and `testbed doctor` (probe, doctor), fidelity checks (fidelity) and clean-up
(cleanup, which is also `testbed clean`)."""
