"""Sharded sweeps: the (cell, method) units of one experiment split over N machines.

    testbed run EXP.yaml --shard K/N --out DIR_K      # on each of N machines, K = 0 .. N-1
    testbed merge OUT DIR_0 ... DIR_N-1                 # one run directory, as if run whole

``K/N`` is 0-based: K runs from 0 to N-1, as Kubernetes' ``JOB_COMPLETION_INDEX`` of an Indexed
Job and a Slurm array ``--array=0-(N-1)`` number their tasks.

Which units a shard runs is decided here only (``select_units``): the sweep's units in the
runner's order (``sweep_units``: cells in sweep order, in each cell the methods in file order)
are dealt in rounds of N, and unit ``i`` goes to shard ``(i + i // N) mod N``. Every shard gets
the same count, give or take one, and every machine computes the same share from the same file.
The shift by the round (``i // N``) keeps one shard from getting one method in every cell when
the number of methods is a multiple of N (plain ``i mod N`` would: with 4 methods and 4 shards
shard 0 would run only the first method, so the slowest method would make the slowest shard).

A shard's manifest records ``shard`` (index, count, selection, its units), the experiment's
digest (``spec_digest``: the resolved spec, output directory aside), and the code version
(testbed.experiment.manifest ``code_version``); `testbed merge` (testbed.experiment.merge)
refuses shards that differ in any of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from testbed.errors import ConfigError, check
from testbed.experiment.spec import Cell, ExperimentSpec, MethodSpec

SELECTION = "round-robin over the sweep's unit order, shifted by one each round: unit i -> (i + i // N) mod N"
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        check(self.count >= 1 and 0 <= self.index < self.count, "--shard", f"{self.index}/{self.count}",
              "K/N with N >= 1 and 0 <= K < N (0-based: K = 0 .. N-1)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "selection": SELECTION}

    @classmethod
    def from_dict(cls, d: dict) -> "Shard":
        return cls(int(d["index"]), int(d["count"]))


def parse_shard(text: str | None, field: str = "--shard") -> Shard | None:
    """``K/N`` (0-based) as a Shard; None for None. Raises one ConfigError naming ``field``."""
    if text is None:
        return None
    m = _SHARD.match(str(text))
    allowed = "K/N with integers N >= 1 and 0 <= K < N (0-based: shards 0/N .. N-1/N)"
    if not m:
        raise ConfigError(field, text, allowed)
    k, n = int(m.group(1)), int(m.group(2))
    check(n >= 1 and k < n, field, text, allowed)
    return Shard(k, n)


def shard_for(spec: ExperimentSpec, text: str | None, field: str = "--shard") -> Shard | None:
    """``parse_shard`` plus: the experiment has at least N units, so that no shard is empty."""
    shard = parse_shard(text, field)
    units = len(sweep_units(spec))
    check(shard is None or shard.count <= units, field, text,
          f"N <= {units}, the experiment's (cell, method) units (every shard runs at least one)")
    return shard


def cell_id(cell: Cell, method_index: int) -> str:
    """Row key of a (cell, method) unit: stable for a given experiment file."""
    return f"p{cell.index}/m{method_index}"


def sweep_units(spec: ExperimentSpec) -> list[tuple[Cell, int, MethodSpec]]:
    """Every (cell, method index, method) unit of the sweep, in the order the runner measures them."""
    return [(c, mi, m) for c in spec.cells() for mi, m in enumerate(spec.methods)]


def shard_of(i: int, count: int) -> int:
    """The shard (0-based) that unit ``i`` of the sweep's order belongs to, of ``count``."""
    return (i + i // count) % count


def select_units(units: list, shard: Shard | None) -> list:
    """The units of ``shard`` (all for None), in their sweep order."""
    if shard is None:
        return list(units)
    return [u for i, u in enumerate(units) if shard_of(i, shard.count) == shard.index]


def unit_order(spec: ExperimentSpec) -> dict[str, int]:
    """cell_id -> its position in the whole sweep's order (what `testbed merge` sorts rows by)."""
    return {cell_id(c, mi): i for i, (c, mi, _) in enumerate(sweep_units(spec))}


def spec_config(spec_dict: dict) -> dict:
    """The part of a resolved spec (ExperimentSpec.to_dict) that says which experiment it is."""
    return {k: v for k, v in spec_dict.items() if k != "output_dir"}


def spec_digest(spec_dict: dict) -> str:
    """sha256 of the resolved experiment (output directory aside): equal for the same file on any machine."""
    text = json.dumps(spec_config(spec_dict), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
