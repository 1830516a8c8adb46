"""The package's layers import only downwards (read from the source with ast, nothing imported).

models, comm and net stand on errors (and proto for comm); methods on models and comm; node on
methods; sim beside node, on methods and net; backends on node and sim; experiment on backends;
train on models and methods, never imported by the runtime; bench and the command line on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "testbed"

_BASE = {"errors"}
_FILES = _BASE | {"yamlfile"}  # reading the YAML files users write
_RUNTIME_BELOW_BACKENDS = _FILES | {"proto", "models", "comm", "net", "methods", "node", "sim"}
#: layer -> the layers it may import (its own modules always)
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "yamlfile": _BASE,
    "proto": set(),
    "protogen": _BASE,
    "models": _BASE,
    "comm": _BASE | {"proto"},
    "net": _FILES,
    "methods": _BASE | {"models", "comm"},
    "node": _BASE | {"proto", "models", "comm", "net", "methods"},
    "sim": _BASE | {"models", "comm", "net", "methods"},
    "backends": _RUNTIME_BELOW_BACKENDS,
    "experiment": _RUNTIME_BELOW_BACKENDS | {"backends"},
    "train": _BASE | {"models", "comm", "methods"},
    "bench": _RUNTIME_BELOW_BACKENDS | {"backends", "experiment"},
    "cli": set(),  # dispatches by module name (importlib), imports no layer
}


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, also those inside functions."""
    parts = ("testbed",) + path.relative_to(root).with_suffix("").parts
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ((node.module,) if node.module else ()))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if name == "testbed"]
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import of a layer that its importer may not use, as 'file:line: a -> b'."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "proto" in path.relative_to(root).parts[:1]:
            continue  # generated protobuf stubs
        mine = layer_of(path, root)
        allowed = ALLOWED.get(mine)
        if allowed is None:
            found.append(f"{path.relative_to(root)}: layer {mine!r} is not in ALLOWED (place it)")
            continue
        for line, name in imported_modules(path, root):
            bits = name.split(".")
            if bits[0] != "testbed" or len(bits) < 2 or bits[1] == mine:
                continue
            if bits[1] not in allowed:
                found.append(f"{path.relative_to(root)}:{line}: {mine} -> {bits[1]} ({name})")
    return found


def test_layers_import_only_downwards():
    bad = violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer,source,expect", [
    ("comm", "from testbed.node import serde\n", "comm -> node"),
    ("comm", "def f():\n    from testbed.node.channels import X\n", "comm -> node"),
    ("methods", "import testbed.experiment.spec\n", "methods -> experiment"),
    ("node", "from testbed.backends.base import NodeAddress\n", "node -> backends"),
    ("experiment", "from testbed.train.data import load_split\n", "experiment -> train"),
    ("sim", "from testbed.experiment import spec\n", "sim -> experiment"),
    ("node", "from testbed import train\n", "node -> train"),
])
def test_the_check_sees_an_upward_import(tmp_path, layer, source, expect):
    pkg = tmp_path / "testbed"
    (pkg / layer).mkdir(parents=True)
    (pkg / layer / "mod.py").write_text(source)
    (pkg / "models").mkdir()
    (pkg / "models" / "ok.py").write_text("from testbed.errors import check\nfrom . import layers\n")
    bad = violations(pkg)
    assert len(bad) == 1 and expect in bad[0], bad


def test_relative_imports_resolve_to_their_package(tmp_path):
    pkg = tmp_path / "testbed" / "comm"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from ..node import serde\nfrom .base import Communicator\n")
    bad = violations(tmp_path / "testbed")
    assert len(bad) == 1 and "comm -> node (testbed.node)" in bad[0], bad
