"""`testbed doctor [EXPERIMENT.yaml]`: what this machine can emulate (testbed.net.doctor) and, for
an experiment, the time-dilation factor it would run at and whether its nodes would contend."""

from __future__ import annotations

import sys

from testbed.errors import ConfigError
from testbed.net import doctor as net_doctor


def main(argv: list[str]) -> int:
    args = net_doctor.parser().parse_args(argv)
    rc = net_doctor.report()
    if args.experiment:
        from testbed.experiment.checks import _check_topology
        from testbed.experiment.dilation import resolve_dilation
        from testbed.experiment.spec import load_spec

        try:
            spec = load_spec(args.experiment)
            d = resolve_dilation(spec, _check_topology(spec))
        except ConfigError as e:
            print(f"testbed doctor: error: {e}", file=sys.stderr)
            return 2
        print(f"\n{args.experiment}: {d.explain()}")
        if d.warning():
            print(d.warning())
    return rc
