"""Generate the Python gRPC stubs in testbed/proto/ from protos/*.proto (grpcio-tools' protoc).

The stubs are never edited by hand and never committed: `make protos` runs
``python -m testbed.protogen`` at set-up, and importing ``testbed.proto`` calls
:func:`ensure` so a stale or missing stub is regenerated before use. Staleness is
by modification time, as make does; ``--check`` compares the stubs in use with a
fresh generation byte for byte (the test suite runs that comparison).

protoc sees protos/ as ``testbed/proto/`` (``-Itestbed/proto=protos``), so the
generated modules import each other as ``from testbed.proto import ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent / "proto"  # where the stubs live
PROTO_DIR = Path(__file__).resolve().parent.parent / "protos"  # the sources (present in a checkout)
VIRTUAL_DIR = "testbed/proto"  # what protoc calls PROTO_DIR


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def outputs_of(proto: Path) -> list[str]:
    """File names protoc writes for one .proto (message module and service module)."""
    return [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto; stubs land in ``out_root/testbed/proto/``. Returns their paths."""
    from grpc_tools import protoc  # imported here: only set-up and stale checkouts need it

    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files in {PROTO_DIR}")
    include = str(resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    args = ["protoc", f"-I{VIRTUAL_DIR}={PROTO_DIR}", f"-I{include}",
            f"--python_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [f"{VIRTUAL_DIR}/{p.name}" for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(p.name for p in protos)} (its message is above)")
    out_dir = out_root / VIRTUAL_DIR
    return [out_dir / name for p in protos for name in outputs_of(p)]


def stale() -> bool:
    """True if a stub is missing or older than its .proto (or than this generator)."""
    newest_input = os.stat(__file__).st_mtime
    for proto in proto_files():
        src = max(proto.stat().st_mtime, newest_input)
        for name in outputs_of(proto):
            out = PACKAGE_DIR / name
            if not out.exists() or out.stat().st_mtime < src:
                return True
    return False


def regenerate() -> list[Path]:
    """Generate into a temporary directory, then move the stubs in atomically.

    Atomic replacement matters because several node processes may import a stale
    checkout at the same moment.
    """
    PACKAGE_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PACKAGE_DIR, prefix=".gen-") as tmp:
        written = []
        for path in generate(Path(tmp)):
            dst = PACKAGE_DIR / path.name
            os.replace(path, dst)
            written.append(dst)
    return written


def ensure() -> None:
    """Regenerate the stubs if they are stale; a no-op without protos/ (installed package)."""
    if PROTO_DIR.is_dir() and proto_files() and stale():
        regenerate()


def differences() -> list[str]:
    """Stub files whose content differs from what protoc makes from the .proto files now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh
                if not (PACKAGE_DIR / p.name).exists() or (PACKAGE_DIR / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.protogen", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="regenerate even if the stubs look fresh")
    ap.add_argument("--check", action="store_true", help="exit 1 if the stubs in use differ from a fresh generation")
    args = ap.parse_args(argv)
    if args.check:
        diff = differences()
        if diff:
            print(f"stale stubs in {PACKAGE_DIR}: {', '.join(diff)}; run `python -m testbed.protogen --force`")
            return 1
        print(f"stubs in {PACKAGE_DIR} match {PROTO_DIR}")
        return 0
    if args.force or stale():
        for path in regenerate():
            print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
