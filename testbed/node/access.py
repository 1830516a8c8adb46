"""Which files a node lets a job read (``testbed node --allow-dir DIR``, repeatable).

A job names files (JobSpec.file_paths: model weights, ASTRA codebooks); a node on a real
network must not read whatever path an orchestrator sends. Every path is resolved with
os.path.realpath (symbolic links and ``..`` cannot leave a directory) and must lie under one
of the allowed directories; for a checkpoint directory so must every file the loader opens
in it (config.json, the shard index and each shard it lists). All of it is checked before
the job reads anything; a path outside raises AccessDenied (PERMISSION_DENIED to the caller).

Without --allow-dir: a node with TLS (--tls-dir) reads no files at all (jobs use seeded
random weights); a node without TLS (loopback, emulation: the experimenter's own machine)
reads any path, as it always did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from testbed.errors import AccessDenied, ConfigError
from testbed.methods.job import JobSpec


class FileAccess:
    """The files a node's jobs may read. ``allow_dirs``: existing directories (resolved once here);
    ``restricted``: with no directory, whether no file at all (True: a TLS node) or any file."""

    def __init__(self, allow_dirs: Sequence[str] = (), restricted: bool = False):
        self.dirs: list[str] = []
        for d in allow_dirs:
            real = os.path.realpath(d)
            if not os.path.isdir(real):
                raise ConfigError("allow_dir", d, "an existing directory")
            self.dirs.append(real)
        self.restricted = restricted or bool(self.dirs)

    def describe(self) -> str:
        if self.dirs:
            return "files under " + ", ".join(self.dirs)
        return "no files (start the node with --allow-dir DIR)" if self.restricted else "any file"

    def check_job(self, job: JobSpec) -> None:
        """Raise AccessDenied for the first file ``job`` would read outside the allowed directories."""
        if not self.restricted:
            return
        for field, path in job.file_paths().items():
            self.check(field, path)
        if job.weights_path:
            self._check_checkpoint(job.weights_path)

    def check(self, field: str, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(field, path, "a file path (a string)")
        real = os.path.realpath(path)
        if not self.dirs:
            raise AccessDenied(field, str(path), "is not readable: this node reads no files (it serves TLS "
                                                 "clients); start the node with --allow-dir DIR")
        if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.dirs):
            shown = f" (resolves to {real!r})" if real != os.path.abspath(path) else ""
            raise AccessDenied(field, str(path), f"is outside the node's allowed directories{shown}; allowed: "
                                                 f"{', '.join(self.dirs)} (--allow-dir)")

    def _check_checkpoint(self, weights_path: str) -> None:
        """Every file the loader opens for ``weights_path`` (testbed.models.loader), each checked
        before the next is read: config.json and the shard index, then the shards the index lists."""
        from testbed.models.hf_checkpoint import INDEX, checkpoint_files

        p = Path(weights_path)
        for f in ((p if p.is_dir() else p.parent) / "config.json", p / INDEX):
            if os.path.lexists(f):
                self.check("weights_path", f)
        try:
            files = checkpoint_files(p)
        except ConfigError:
            return  # not a checkpoint: the loader says so, reading nothing outside
        for f in files:
            self.check("weights_path", f)
