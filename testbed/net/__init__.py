"""Network emulation: topologies, link shaping (htb + netem or NFQUEUE delay line), fidelity checks."""
