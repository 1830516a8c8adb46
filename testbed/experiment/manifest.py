"""The manifest of a run directory: what was run, on what, with which code, and how it ended.

manifest.json is rewritten atomically at the start of a run, whenever the backend
is (re)started (shaping mechanism, fidelity table) and at the end, so that even a
killed run leaves a manifest that says what it was. A resumed run appends to
``sessions`` instead of replacing the first session's record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from testbed.experiment.store import MANIFEST, write_json

PACKAGES = ("testbed", "torch", "numpy", "grpcio", "protobuf", "pandas", "pyarrow", "matplotlib", "simpy", "pyyaml",
            "mininet", "NetfilterQueue")
ROOT = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """Commit of the code that ran and whether the working tree differed from it."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def source_digest(root: Path = ROOT) -> str | None:
    """sha256 over the package's Python sources and protos/*.proto (paths and contents; generated stubs
    left out): the same for a git checkout and an image built from it, whether or not .git is there."""
    pkg = root / "testbed"
    if not pkg.is_dir():
        return None
    files = [f for f in sorted(pkg.rglob("*.py")) if not (f.parent.name == "proto" and "_pb2" in f.name)]
    files += sorted((root / "protos").glob("*.proto"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """Which code ran: git commit and dirtiness (None outside a checkout, e.g. in a container image),
    the package version and ``source_digest`` (what `testbed merge` compares)."""
    try:
        version = metadata.version("testbed")
    except metadata.PackageNotFoundError:
        version = None
    return {**git_state(root), "package": version, "source_digest": source_digest(root)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = _module_version(name)
    return out


def _module_version(name: str) -> str | None:
    """Debian's mininet has no dist-info in the venv; ask the module itself."""
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        return None
    return str(getattr(mod, "__version__", getattr(mod, "VERSION", "installed")))


def machine() -> dict[str, Any]:
    u = platform.uname()
    return {"host": u.node, "kernel": f"{u.system} {u.release} {u.version}", "machine": u.machine, "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "user_is_root": os.geteuid() == 0}


class Manifest:
    """manifest.json of one run directory."""

    def __init__(self, out_dir: Path, config: dict, source: str | None, resume: bool):
        self.path = Path(out_dir) / MANIFEST
        old = _read(self.path) if resume else {}
        code = code_version()
        self.data: dict[str, Any] = {
            "experiment": config["name"],
            "config": config,
            "source_file": source,
            "status": "running",
            "created_at": old.get("created_at", now_iso()),
            "updated_at": now_iso(),
            "sessions": old.get("sessions", []),
            "git": {k: code[k] for k in ("commit", "dirty")},
            "code": code,
            "machine": machine(),
            "packages": package_versions(),
            "backend": old.get("backend", {"name": config["backend"], "mechanism": None, "fidelity": None}),
            "files": {"rows_csv": "rows.csv", "rows_parquet": "rows.parquet", "traces": "traces.jsonl",
                      "plots": "plots/", "codebooks": "codebooks/"},
        }
        self.data["sessions"].append({"started_at": now_iso(), "ended_at": None, "status": "running",
                                      "resumed": resume, "git_commit": self.data["git"]["commit"],
                                      "argv": sys.argv[1:]})
        self.write()

    def backend(self, name: str, mechanism: str, fidelity: Any = None, extra: dict | None = None) -> None:
        self.data["backend"] = {"name": name, "mechanism": mechanism, "fidelity": fidelity, **(extra or {})}
        self.write()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def finish(self, status: str, rows: int, failed: int, plots: list[str], superseded: int = 0) -> None:
        """``rows``, ``failed``: current rows (one per unit); ``superseded``: earlier rows of units measured again."""
        s = self.data["sessions"][-1]
        s.update(ended_at=now_iso(), status=status)
        self.data.update(status=status, rows=rows, failed_rows=failed, superseded_rows=superseded, plots=plots)
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = now_iso()
        write_json(self.path, self.data)


def _read(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_manifest(out_dir: str | Path) -> dict:
    return _read(Path(out_dir) / MANIFEST)
