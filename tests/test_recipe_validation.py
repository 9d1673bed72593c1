"""``st-bitnet train --check`` catches unknown loss types, unknown keys and wrong value types at parse time."""

from __future__ import annotations

import copy

import pytest

from st_bitnet.training import RecipeError, parse_recipe
from st_bitnet.training.cli import main as cli_main

BASE = {
    "output_dir": "/tmp/unused",
    "model": {"path": "some/model"},
    "datasets": [{"name": "stsb"}],
    "loss": {"contrastive": {"type": "MultipleNegativesRankingLoss", "weight": 1.0, "scale": 20.0}},
    "training": {"max_steps": 10, "learning_rate": 2.0e-5, "bf16": False},
}


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    holder = raw
    for part in parents:
        holder = holder[part]
    holder[key] = value
    return raw


def test_valid_recipe_parses():
    recipe = parse_recipe(copy.deepcopy(BASE))
    assert recipe.loss["contrastive"]["scale"] == 20.0


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("loss.contrastive.type", "MultipleNegativeRankingLoss", "unknown loss type"),  # typo
        ("loss.contrastive.type", 3, "must be a class name"),
        ("loss.contrastive.scal", 20.0, "unknown argument 'scal'"),
        ("loss.contrastive.scale", "twenty", "scale must be a float"),
        ("loss.contrastive.weight", "1", "weight must be a number"),
        ("loss.contrastive.weight", True, "weight must be a number"),
        ("training.learning_rate", "2e-5", "write 2.0e-5"),
        ("training.max_step", 10, "unknown training option"),
        ("training.bf16", "no", "must be true or false"),
        ("seed", "42", "seed must be a int"),
        ("model.max_seq_length", "128", "max_seq_length must be a int"),
        ("model.pack", "yes", "pack must be a bool"),
        ("training", [1, 2], "training must be a dict"),
    ],
)
def test_bad_values_are_refused_at_parse_time(path, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_with(path, value))


def test_nested_loss_components_are_checked():
    raw = _with("loss.contrastive", {"type": "MatryoshkaLoss", "matryoshka_dims": [64, 32],
                                      "loss": {"type": "MultipleNegativesRankingLoss", "scal": 1.0}})  # fmt: skip
    with pytest.raises(RecipeError, match="contrastive.loss.*unknown argument 'scal'"):
        parse_recipe(raw)


def test_check_reports_the_error_and_exits_2(tmp_path, capsys):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with("loss.contrastive.type", "NoSuchLoss")))
    assert cli_main([str(path), "--check"]) == 2
    assert "unknown loss type 'NoSuchLoss'" in capsys.readouterr().err
