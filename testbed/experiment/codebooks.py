"""ASTRA codebooks for a run: fit ONCE per (groups, codebook_size, samples) in the runner's process.

Every astra method of an experiment gets a codebook file by path (JobSpec.codebook_path),
so nodes never fit codebooks at load time (that would cost every node the same k-means, per
job, per cell). Trained codebooks given as ``model.codebook_path`` are used as they are.
Files live in one directory chosen up front (the run's ``codebooks/``, named
``astra-G<G>-K<K>.pt``): ``Codebooks.file`` writes each key's file there once and hands
the same path to every caller (the spec check and the runner); a file already there
(an earlier session of the same run, ``--resume``) is used as it is, so a resumed run
measures with the very same codebooks.

Fitting is what ``Astra`` itself would do without a file (vq.fit_codebooks on seeded inputs
of the experiment's token count, ``calibration_samples`` of them), with the experiment's seed.

Fitted codebooks are also kept in a user cache (``CodebookCache``: ``$XDG_CACHE_HOME/testbed/
codebooks``, else ``~/.cache/testbed/codebooks``), keyed by everything the fit depends on: the
model's name and config, a digest of its weights file (or its seeded initialisation), groups,
codebook size, calibration samples and tokens, seed, k-means iterations and the fit's version.
A later run of the same experiment reads them instead of fitting again (paper scale: minutes of
k-means); a changed seed or weights file is another key. The cache holds at most
``CACHE_MAX_BYTES``; the least recently used files go first. ``Codebooks.sources`` says for
each key where its codebooks came from ("cached", "run directory" or "fit in S s").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from testbed.errors import check
from testbed.experiment.spec import ExperimentSpec, MethodSpec

Key = tuple[int, int, int]  # (groups, codebook_size, calibration samples)

CACHE_MAX_BYTES = 2 << 30  # paper scale, G=1 K=1024 on vit-base: 38 MiB a file
FIT_ITERS = 20  # vq.fit_codebooks' k-means iterations (part of the cache key)
FIT_VERSION = 1  # bump when vq.fit_codebooks changes what it computes: older cache files are not reused


def cache_dir() -> Path:
    """The user cache directory for codebooks (XDG base directory spec)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "testbed" / "codebooks"


def weights_digest(weights_path: str | None, seed: int) -> str:
    """What identifies the model's weights: the sha256 of its checkpoint's files (every shard, in
    order), or its seeded init."""
    from testbed.models.hf_checkpoint import checkpoint_files

    if not weights_path:
        return f"init:seed={seed}"
    h = hashlib.sha256()
    for path in checkpoint_files(weights_path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


class CodebookCache:
    """Fitted codebooks on disk, one file per identity (a JSON-able dict), least recently used evicted."""

    def __init__(self, directory: Path | None = None, max_bytes: int = CACHE_MAX_BYTES):
        self.directory, self.max_bytes = Path(directory) if directory else cache_dir(), max_bytes

    def path(self, ident: dict) -> Path:
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.pt"

    def get(self, ident: dict) -> torch.Tensor | None:
        """The cached codebooks of ``ident``, or None (missing, unreadable, or another identity)."""
        from testbed.errors import ConfigError
        from testbed.methods.vq import load_codebooks

        path = self.path(ident)
        if not path.is_file():
            return None
        try:
            tensor, meta = load_codebooks(path)
        except ConfigError:  # a torn or foreign file: fit again and overwrite it
            return None
        if meta.get("cache_key") != ident:
            return None
        self._touch(path)  # recently used: evicted last
        return tensor

    def _touch(self, path: Path) -> None:
        """Make ``path`` the most recently used: its mtime above every other file's (file clocks are
        coarse, so two uses within a few ms would otherwise tie)."""
        newest = max((f.stat().st_mtime_ns for f in self.directory.glob("*.pt") if f != path), default=0)
        stamp = max(time.time_ns(), newest + 1)
        os.utime(path, ns=(stamp, stamp))

    def put(self, ident: dict, tensor: torch.Tensor, meta: dict) -> bool:
        """Store (atomically), then evict the least recently used files beyond ``max_bytes``;
        False if it could not be stored."""
        path = self.path(ident)
        try:
            save(path, tensor, {**meta, "cache_key": ident})
            self._touch(path)
        except OSError:  # a read-only or full cache never fails a run: the codebooks are fit either way
            return False
        files = sorted(self.directory.glob("*.pt"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        total = 0
        for f in files:
            total += f.stat().st_size
            if total > self.max_bytes and f != path:
                f.unlink(missing_ok=True)
        return True


def codebook_key(params: dict, cfg=None) -> Key:
    """What fit codebooks depend on, from an astra method's params as Astra resolves them
    (``cfg``: the model's config, for the checks that need it)."""
    from testbed.methods import resolve_params

    p = resolve_params("astra", params, cfg)
    return (p["groups"], p["codebook_size"], p["calibration_samples"])


def file_name(key: Key) -> str:
    G, K, S = key
    return f"astra-G{G}-K{K}" + (f"-S{S}" if S != 2 else "") + ".pt"


class Codebooks:
    """The codebooks of an experiment's astra methods: fit lazily, at most once per key.

    ``directory``: where ``file`` writes each key's file, once (chosen up front; files already
    there are an earlier session's and are used as they are). ``existing_dir``: codebooks of an
    earlier session to read when fitting would otherwise be needed (for ``write``'s callers).
    """

    def __init__(self, spec: ExperimentSpec, model=None, existing_dir: Path | None = None,
                 directory: Path | None = None, cache: CodebookCache | None = None):
        self.spec, self.model = spec, model
        self.directory = None if directory is None else Path(directory)
        self.existing_dir = existing_dir if existing_dir is not None else self.directory
        self._tensors: dict[Key, torch.Tensor] = {}
        self.cache = CodebookCache() if cache is None else cache
        self._weights: str | None = None
        self._in_cache: set[Key] = set()  # keys whose cache file holds this run's codebooks
        self.sources: dict[Key, str] = {}  # where each key's codebooks came from (for the run's log and manifest)

    def methods(self) -> list[tuple[int, MethodSpec]]:
        return [(i, m) for i, m in enumerate(self.spec.methods) if m.name == "astra"]

    def trained(self) -> str | None:
        return self.spec.model.codebook_path

    def file(self, params: dict) -> str:
        """The codebook file (absolute path) for an astra method's ``params``, written into
        ``directory`` the first time its key is asked for."""
        if self.trained():
            return self.trained()
        check(self.directory is not None, "codebooks.directory", None, "a directory given to Codebooks up front")
        return self._file_in(self.directory, params)

    def _file_in(self, directory: Path, params: dict) -> str:
        key = codebook_key(params)
        path = (Path(directory) / file_name(key)).resolve()
        if not path.exists():
            tensor = self.tensor(key)
            if not self._link_cached(key, path):
                save(path, tensor, self.meta(key))
        return str(path)

    def _link_cached(self, key: Key, path: Path) -> bool:
        """Hard-link the cache's file of ``key`` as ``path`` instead of writing the codebooks again
        (False where there is none or the cache is on another file system)."""
        if key not in self._in_cache:  # only a file this run read or wrote there is known to hold them
            return False
        cached = self.cache.path(self.identity(key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(cached, path)  # a later eviction or rewrite of the cache file leaves this one intact
        except OSError:
            return False
        return True

    def tensor(self, key: Key) -> torch.Tensor:
        """The codebooks for ``key``: from an earlier session of the same run, else the user cache,
        else fit (and cached)."""
        if key not in self._tensors:
            old = self.existing_dir / file_name(key) if self.existing_dir is not None else None
            if old is not None and old.is_file():
                from testbed.methods.vq import load_codebooks

                self._tensors[key], self.sources[key] = load_codebooks(old)[0], "run directory"
                return self._tensors[key]
            ident = self.identity(key)
            cached = self.cache.get(ident)
            if cached is not None:
                self._tensors[key], self.sources[key] = cached, "cached"
                self._in_cache.add(key)
                return cached
            from testbed.methods.vq import fit_codebooks

            G, K, S = key
            t0 = time.perf_counter()
            fit = fit_codebooks(self._model(), G, K, self.spec.input.tokens, seed=self.spec.input.seed,
                                n_samples=S, iters=FIT_ITERS)
            self._tensors[key], self.sources[key] = fit, f"fit in {time.perf_counter() - t0:.1f} s"
            if self.cache.put(ident, fit, self.meta(key)):
                self._in_cache.add(key)
        return self._tensors[key]

    def identity(self, key: Key) -> dict:
        """Everything the fit of ``key`` depends on (the user cache's key)."""
        G, K, S = key
        s = self.spec
        if self._weights is None:  # hashed once per run (paper-scale weights: ~350 MB)
            self._weights = weights_digest(s.model.weights_path, s.input.seed)
        ident = {"model": s.model.name, "config": dataclasses.asdict(self._model().cfg), "weights": self._weights,
                 "groups": G, "codebook_size": K, "calibration_samples": S, "tokens": s.input.tokens,
                 "seed": s.input.seed, "iters": FIT_ITERS, "fit": FIT_VERSION}
        return json.loads(json.dumps(ident))  # as it reads back from a file (tuples as lists)

    def describe(self) -> dict[str, str]:
        """Per key that was asked for ("astra G=1 K=1024"), where its codebooks came from."""
        return {f"astra G={G} K={K}" + (f" S={S}" if S != 2 else ""): v for (G, K, S), v in self.sources.items()}

    def _model(self):
        if self.model is None:
            from testbed.models import build_model

            s = self.spec
            self.model = build_model(s.model.name, seed=s.input.seed, weights_path=s.model.weights_path)
        return self.model

    def files(self, only: list[int] | None = None) -> dict[int, str]:
        """``file`` per astra method index (all, or those in ``only``)."""
        return {i: self.file(m.params) for i, m in self.methods() if only is None or i in only}

    def write(self, directory: Path, only: list[int] | None = None) -> dict[int, str]:
        """Codebook file per astra method index (absolute paths), written into ``directory`` if missing.

        The form for callers that choose the directory late; ``files`` with ``directory`` given up
        front writes each file once for every caller."""
        if self.directory is not None and Path(directory).resolve() == self.directory.resolve():
            return self.files(only)
        return {i: self.trained() or self._file_in(directory, m.params)
                for i, m in self.methods() if only is None or i in only}

    def meta(self, key: Key) -> dict:
        G, K, S = key
        s = self.spec
        return {"groups": G, "codebook_size": K, "calibration_samples": S, "model": s.model.name,
                "tokens": s.input.tokens, "seed": s.input.seed,
                "made_by": "testbed.experiment: vq.fit_codebooks (k-means fit to seeded inputs)"}


def save(path: Path, codebooks: torch.Tensor, meta: dict) -> None:
    """Write atomically: a run killed mid-write never leaves a half file that --resume would trust."""
    from testbed.methods.vq import save_codebooks

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_codebooks(tmp, codebooks, meta)
    os.replace(tmp, path)
