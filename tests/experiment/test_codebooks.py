"""ASTRA codebooks of a run are fit once, written once into the run directory, and that very file
is what the ranks load."""

from __future__ import annotations

import json

import torch

from testbed.experiment.checks import check_spec
from testbed.experiment.codebooks import CodebookCache, cache_dir
from testbed.experiment.startup import PHASES
from testbed.experiment.runner import Runner
from testbed.experiment.spec import parse_spec

from .helpers import tiny

ASTRA = {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}


def test_the_file_the_check_writes_is_the_one_the_run_loads(tmp_path):
    no_tables = {"name": "astra", "params": {**ASTRA["params"], "lookup_tables": False}}  # same codebooks
    spec = parse_spec(tiny(methods=["single", ASTRA, no_tables], repetitions=1, warmup=0))
    out = tmp_path / "run"
    prepared = check_spec(spec, codebook_dir=out / "codebooks")
    files = sorted((out / "codebooks").iterdir())
    assert [f.name for f in files] == ["astra-G1-K16.pt"]  # one key: one file for both methods
    stamp = files[0].stat().st_mtime_ns
    outcome = Runner(spec, out, prepared=prepared, progress=False, plots=False).run()
    assert outcome.status == "complete" and outcome.failed_rows == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["codebooks"].values()) == {str(files[0].resolve())}
    assert files[0].stat().st_mtime_ns == stamp  # not written again
    assert sorted(f.name for f in (out / "codebooks").iterdir()) == ["astra-G1-K16.pt"]


def test_a_check_without_a_run_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny(methods=[ASTRA]))
    prepared = check_spec(spec)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "later"
    paths = prepared.codebooks.write(out / "codebooks")  # the fitted tensors are kept for a runner
    assert [p.rsplit("/", 1)[1] for p in paths.values()] == ["astra-G1-K16.pt"]


def _run(tmp_path, name: str, **over) -> dict:
    spec = parse_spec(tiny(methods=[ASTRA], repetitions=1, warmup=0, **over))
    out = tmp_path / name
    outcome = Runner(spec, out, prepared=check_spec(spec, codebook_dir=out / "codebooks"), progress=False,
                     plots=False).run()
    assert outcome.status == "complete" and outcome.failed_rows == 0
    manifest = json.loads((out / "manifest.json").read_text())
    startup = manifest["startup"]  # the breakdown to the first measured inference
    assert set(startup) == {"to_first_inference_s", "set-up", *PHASES}
    assert all(v >= 0 for v in startup.values())  # set-up is the rest: named phases never overlap
    return manifest


def test_a_second_run_reuses_the_cached_codebooks_and_a_new_seed_or_weights_file_does_not(tmp_path):
    from testbed.models import build_model
    from testbed.models.loader import save_hf_weights

    first = _run(tmp_path, "a")
    assert first["codebooks_made"]["astra G=1 K=16"].startswith("fit in ") and first["startup"]["calibration"] > 0
    assert len(list(cache_dir().glob("*.pt"))) == 1
    assert _run(tmp_path, "b")["codebooks_made"] == {"astra G=1 K=16": "cached"}
    a, b = (torch.load(tmp_path / d / "codebooks" / "astra-G1-K16.pt", weights_only=True)["codebooks"] for d in "ab")
    assert torch.equal(a, b)  # the cached codebooks are the very ones fit
    (cached,) = cache_dir().glob("*.pt")
    assert (tmp_path / "b" / "codebooks" / "astra-G1-K16.pt").stat().st_ino == cached.stat().st_ino  # linked, not rewritten
    assert _run(tmp_path, "c", input={"tokens": 17, "seed": 1})["codebooks_made"]["astra G=1 K=16"].startswith("fit")
    weights = tmp_path / "w.safetensors"
    save_hf_weights(build_model("vit-tiny", seed=3), weights)
    model = {"name": "vit-tiny", "weights_path": str(weights)}
    assert _run(tmp_path, "d", model=model)["codebooks_made"]["astra G=1 K=16"].startswith("fit")
    assert _run(tmp_path, "e", model=model)["codebooks_made"]["astra G=1 K=16"] == "cached"
    save_hf_weights(build_model("vit-tiny", seed=4), weights)  # same path, other weights
    assert _run(tmp_path, "f", model=model)["codebooks_made"]["astra G=1 K=16"].startswith("fit")


def test_the_cache_keeps_its_size_bound_dropping_the_least_recently_used(tmp_path):
    cache = CodebookCache(tmp_path / "cache", max_bytes=1)  # room for the newest file only
    t = torch.randn(1, 1, 4, 8)
    cache.put({"k": 1}, t, {})
    cache.put({"k": 2}, t + 1, {})
    assert cache.get({"k": 1}) is None and torch.equal(cache.get({"k": 2}), t + 1)
    big = CodebookCache(tmp_path / "big", max_bytes=3 * cache.path({"k": 2}).stat().st_size)
    for k in (1, 2, 3):
        big.put({"k": k}, t, {})
    assert big.get({"k": 1}) is not None  # used: now the most recent
    big.put({"k": 4}, t, {})
    assert [big.get({"k": k}) is not None for k in (1, 2, 3, 4)] == [True, False, True, True]


def test_a_cache_file_of_another_identity_is_not_used(tmp_path):
    cache = CodebookCache(tmp_path)
    cache.put({"k": 1}, torch.randn(1, 1, 4, 8), {})
    cache.path({"k": 2}).write_bytes(cache.path({"k": 1}).read_bytes())  # e.g. a digest collision
    assert cache.get({"k": 2}) is None
    cache.path({"k": 3}).write_bytes(b"torn")
    assert cache.get({"k": 3}) is None
