"""`testbed` command line: a thin dispatcher; each subcommand lives with the component it drives."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "run": ("testbed.experiment.cli", "run_main", "run an experiment YAML (sweep link profiles, record rows, plot)"),
    "merge": ("testbed.experiment.merge", "main", "join the run directories of a sharded sweep (`testbed run "
              "--shard K/N`) into one run directory"),
    "plot": ("testbed.experiment.cli", "plot_main", "make plots from a results directory"),
    "report": ("testbed.experiment.htmlreport", "main", "write a run directory's report.html again (one "
               "self-contained page)"),
    "simulate": ("testbed.experiment.cli", "simulate_main", "alias of `testbed run --backend sim` (the SimPy model)"),
    "schema": ("testbed.experiment.schema", "main", "print the JSON Schema of experiment or topology YAML files "
               "(for editors)"),
    "diff": ("testbed.experiment.diff", "main", "the same cells of two runs side by side (latency ratio B/A, "
             "spread), with warnings where the runs differ"),
    "deploy": ("testbed.experiment.deploy", "main", "write the Kubernetes manifests that run an experiment on a "
               "cluster (node StatefulSet, Service, Secret, ConfigMap, sweep Job)"),
    "calibrate": ("testbed.experiment.calibrate", "calibrate_main", "measure compute profiles on this host for the "
                  "simulator"),
    "validate": ("testbed.experiment.validation", "main", "predict every cell of an emulated run on the simulator "
                 "from calibration alone: |error| per method, plot and CSV"),
    "advise": ("testbed.experiment.advise", "main", "rank every method and its parameters by predicted latency "
               "for a model, token count, devices and link"),
    "fidelity": ("testbed.net.fidelity", "main", "check emulated links with iperf3 and ping against their profiles"),
    "doctor": ("testbed.experiment.doctor", "main", "what this machine can emulate, and why"),
    "clean": ("testbed.net.cleanup", "main", "remove leftovers of a crashed run (namespaces, links, rules, processes)"),
    "node": ("testbed.node.server", "main", "run one edge-device node server (gRPC)"),
    "certs": ("testbed.comm.tls", "main", "make an experiment CA and the node and orchestrator certificates "
              "(mutual TLS for nodes on real networks)"),
    "compare": ("testbed.methods.compare", "main", "compare all methods in-process on one model (no network)"),
    "train": ("testbed.train.cli", "main", "train a small ViT and ASTRA codebooks (NAQ, DCT) on an offline dataset"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: testbed COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`testbed COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"testbed: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
