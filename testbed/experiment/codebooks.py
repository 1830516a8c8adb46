"""ASTRA codebooks for a run: calibrated ONCE per (groups, codebook_size) in the runner's process.

Every astra method of an experiment gets a codebook file by path (JobSpec.codebook_path),
so nodes never calibrate at load time (that would cost every node the same k-means, per
job, per cell). Trained codebooks given as ``model.codebook_path`` are used as they are.
Files are kept in the run directory (``codebooks/astra-G<G>-K<K>.pt``) and reused by
``--resume``, so a resumed run measures with the very same codebooks.

Calibration is what ``Astra`` itself would do without a file (vq.calibrate_codebooks on
seeded inputs of the experiment's token count, ``calibration_samples`` of them), with the
experiment's seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from testbed.experiment.spec import ExperimentSpec, MethodSpec

Key = tuple[int, int, int]  # (groups, codebook_size, calibration samples)


def codebook_key(params: dict) -> Key:
    """What a calibrated codebook depends on, from an astra method's params (Astra's defaults filled in)."""
    from testbed.methods.astra import Astra

    p = {**Astra.DEFAULTS, **params}
    return (1 if p["groups"] is None else p["groups"], 1024 if p["codebook_size"] is None else p["codebook_size"],
            p["calibration_samples"])


def file_name(key: Key) -> str:
    G, K, S = key
    return f"astra-G{G}-K{K}" + (f"-S{S}" if S != 2 else "") + ".pt"


class Codebooks:
    """The codebooks of an experiment's astra methods: calibrated lazily, at most once per key."""

    def __init__(self, spec: ExperimentSpec, model=None, existing_dir: Path | None = None):
        self.spec, self.model, self.existing_dir = spec, model, existing_dir
        self._tensors: dict[Key, torch.Tensor] = {}

    def methods(self) -> list[tuple[int, MethodSpec]]:
        return [(i, m) for i, m in enumerate(self.spec.methods) if m.name == "astra"]

    def trained(self) -> str | None:
        return self.spec.model.codebook_path

    def tensor(self, key: Key) -> torch.Tensor:
        """Calibrate (or read from an earlier session of the same run) the codebooks for ``key``."""
        if key not in self._tensors:
            old = self.existing_dir / file_name(key) if self.existing_dir is not None else None
            if old is not None and old.is_file():
                from testbed.methods.vq import load_codebooks

                self._tensors[key] = load_codebooks(old)[0]
            else:
                from testbed.methods.vq import calibrate_codebooks

                G, K, S = key
                self._tensors[key] = calibrate_codebooks(self._model(), G, K, self.spec.input.tokens,
                                                         seed=self.spec.input.seed, n_samples=S)
        return self._tensors[key]

    def _model(self):
        if self.model is None:
            from testbed.models import build_model

            s = self.spec
            self.model = build_model(s.model.name, seed=s.input.seed, weights_path=s.model.weights_path)
        return self.model

    def write(self, directory: Path, only: list[int] | None = None) -> dict[int, str]:
        """Codebook file per astra method index (absolute paths), written into ``directory`` if missing."""
        out: dict[int, str] = {}
        for i, m in self.methods():
            if only is not None and i not in only:
                continue
            if self.trained():
                out[i] = self.trained()
                continue
            key = codebook_key(m.params)
            path = (directory / file_name(key)).resolve()
            if not path.exists():
                save(path, self.tensor(key), self.meta(key))
            out[i] = str(path)
        return out

    def meta(self, key: Key) -> dict:
        G, K, S = key
        s = self.spec
        return {"groups": G, "codebook_size": K, "calibration_samples": S, "model": s.model.name,
                "tokens": s.input.tokens, "seed": s.input.seed,
                "made_by": "testbed.experiment: vq.calibrate_codebooks (k-means on seeded calibration inputs)"}


def save(path: Path, codebooks: torch.Tensor, meta: dict) -> None:
    """Write atomically: a run killed mid-write never leaves a half file that --resume would trust."""
    from testbed.methods.vq import save_codebooks

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_codebooks(tmp, codebooks, meta)
    os.replace(tmp, path)
