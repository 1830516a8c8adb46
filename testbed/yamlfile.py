"""Reading the YAML files users write (experiments, topologies): strict where PyYAML is lax.

- A key given twice in one mapping is refused, naming its YAML path and both lines
  (PyYAML silently keeps the last value).
- Numbers in exponent form without a dot (``1e3``, ``-2E-3``) are numbers, as in YAML 1.2
  and in every other tool a user types them into (PyYAML's YAML 1.1 resolver reads them as
  strings).
- A file that cannot be read, is not UTF-8 text or is not YAML: one ConfigError naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from testbed.errors import ConfigError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's exponent floats."""


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(_key_path(path, key), f"given twice (lines {seen[key]} and {line})",
                                  "each key once per mapping")
            seen[key] = line
            _check_unique_keys(value_node, _key_path(path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")


def parse_yaml(text: str, what: str) -> Any:
    """The data of one YAML document; ``what`` names the source in errors (a file's path)."""
    try:
        node = yaml.compose(text, Loader=StrictLoader)
        if node is None:
            return None
        _check_unique_keys(node)
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(what, (getattr(e, "problem", None) or str(e)) + where, "valid YAML") from None


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file (see the module docstring for what is refused)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e), "a readable YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                          "a UTF-8 YAML file") from None
    return parse_yaml(text, str(path))
