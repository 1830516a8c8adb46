"""Bad training parameters: one ConfigError naming the field, before anything runs or is written."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.train.cli import main
from testbed.train.config import BaseTrainConfig, FinetuneConfig

BAD = [
    (BaseTrainConfig, {"lr": -1e-3}, "lr"),
    (BaseTrainConfig, {"lr": 0}, "lr"),
    (BaseTrainConfig, {"epochs": 0}, "epochs"),
    (BaseTrainConfig, {"dataset": "mnist"}, "dataset"),
    (BaseTrainConfig, {"model": "gpt2-tiny"}, "model"),
    (BaseTrainConfig, {"model": "no-such-model"}, "model"),
    (FinetuneConfig, {"naq_lambda": -0.1}, "naq_lambda"),
    (FinetuneConfig, {"beta": -1e-4}, "beta"),
    (FinetuneConfig, {"groups": 3}, "groups"),  # 3 does not divide D=128
    (FinetuneConfig, {"groups": 0}, "groups"),
    (FinetuneConfig, {"codebook_size": 1}, "codebook_size"),
    (FinetuneConfig, {"world_size": 0}, "world_size"),
    (FinetuneConfig, {"dct": "yes"}, "dct"),
    (FinetuneConfig, {"lr": -2e-4}, "lr"),
    (FinetuneConfig, {"ema_decay": 1.0}, "ema_decay"),
]


@pytest.mark.parametrize("cls,kw,field", BAD, ids=[f"{c.__name__}-{f}-{list(k.values())[0]}" for c, k, f in BAD])
def test_bad_parameter_names_its_field(cls, kw, field):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: got ")


def test_groups_error_lists_the_divisors():
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(groups=3)
    assert "D=128" in str(e.value) and "32" in str(e.value)


def test_unknown_key_in_a_dict_is_rejected():
    with pytest.raises(ConfigError) as e:
        FinetuneConfig.from_dict({"groups": 4, "lamda": 1.0})
    assert e.value.field == "lamda"
    assert FinetuneConfig.from_dict({"groups": 4}).groups == 4


def test_cli_reports_bad_values_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["base", "--out", str(out), "--lr", "-1"]) == 2
    assert "lr: got -1.0" in capsys.readouterr().err
    assert main(["finetune", "--base", str(tmp_path), "--out", str(out), "--naq-lambda", "-1"]) == 2
    assert "naq_lambda" in capsys.readouterr().err
    assert main(["finetune", "--base", str(tmp_path), "--out", str(out), "--groups", "5"]) == 2
    assert "groups: got 5" in capsys.readouterr().err
    assert not out.exists()
