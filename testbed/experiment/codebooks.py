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
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from testbed.errors import check
from testbed.experiment.spec import ExperimentSpec, MethodSpec

Key = tuple[int, int, int]  # (groups, codebook_size, calibration samples)


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
                 directory: Path | None = None):
        self.spec, self.model = spec, model
        self.directory = None if directory is None else Path(directory)
        self.existing_dir = existing_dir if existing_dir is not None else self.directory
        self._tensors: dict[Key, torch.Tensor] = {}

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
            save(path, self.tensor(key), self.meta(key))
        return str(path)

    def tensor(self, key: Key) -> torch.Tensor:
        """Fit (or read from an earlier session of the same run) the codebooks for ``key``."""
        if key not in self._tensors:
            old = self.existing_dir / file_name(key) if self.existing_dir is not None else None
            if old is not None and old.is_file():
                from testbed.methods.vq import load_codebooks

                self._tensors[key] = load_codebooks(old)[0]
            else:
                from testbed.methods.vq import fit_codebooks

                G, K, S = key
                self._tensors[key] = fit_codebooks(self._model(), G, K, self.spec.input.tokens,
                                                   seed=self.spec.input.seed, n_samples=S)
        return self._tensors[key]

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
