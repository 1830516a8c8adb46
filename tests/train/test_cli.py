"""`testbed train base | finetune | eval` end to end, with a few batches."""

from __future__ import annotations

from testbed.cli import main as cli_main
from testbed.methods.vq import load_codebooks
from testbed.models import build_model


def test_base_finetune_eval_round_trip(tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "g16"
    assert cli_main(["train", "base", "--out", str(base), "--max-steps", "2", "--max-images", "64"]) == 0
    assert (base / "model.safetensors").is_file() and not (base / "codebooks.pt").exists()
    assert cli_main(["train", "finetune", "--base", str(base), "--out", str(tuned), "--groups", "16",
                         "--codebook-size", "32", "--no-dct", "--naq-lambda", "0.3", "--max-steps", "2",
                         "--max-images", "64", "--kmeans-tokens", "500", "--kmeans-iters", "2"]) == 0
    cb, meta = load_codebooks(tuned / "codebooks.pt")
    assert cb.shape == (4, 16, 32, 8) and meta == {"model": "vit-digits", "groups": 16, "codebook_size": 32,
                                                   "dct": False, "world_size": 4, "naq_lambda": 0.3,
                                                   "beta": 2.5e-4}
    build_model("vit-digits", weights_path=str(tuned))  # loads as a plain HF checkpoint
    capsys.readouterr()
    assert cli_main(["train", "eval", "--checkpoint", str(tuned), "--dataset", "digits-test-mini"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("astra N=4 {'dct': False} on digits-test-mini: accuracy") and "(32 images)" in out
    assert cli_main(["train", "eval", "--checkpoint", str(base), "--dataset", "digits-test-mini"]) == 0
    assert capsys.readouterr().out.startswith("single N=1")


def test_unknown_dataset_is_one_clear_error(tmp_path, capsys):
    assert cli_main(["train", "base", "--out", str(tmp_path / "x"), "--dataset", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "dataset: got 'imagenet'; allowed: digits-train, digits-test, digits-test-mini" in err
    assert not (tmp_path / "x").exists()
