"""The issue-#8 ablation recipes (recipes/quality/): they parse, share one budget, and each row changes only
its own component relative to the previous row. No model is loaded (recipes are checked before any load)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

QUALITY = Path(__file__).resolve().parents[1] / "recipes" / "quality"


def _driver():
    spec = importlib.util.spec_from_file_location("quality_run_ablation", QUALITY / "run_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw(name: str) -> dict:
    return yaml.safe_load((QUALITY / name).read_text())


def _stage2(driver, row: str) -> str:
    return driver.ROWS[row][1][-1][0]


BUDGET_KEYS = ("per_device_train_batch_size", "learning_rate", "warmup_steps", "multi_dataset_batch_sampler")


def test_every_recipe_parses_with_the_registered_losses():
    from st_bitnet.training.recipe import load_recipe

    driver = _driver()
    driver.register_losses()
    for path in sorted(QUALITY.glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.seed == 42
        assert recipe.model["max_seq_length"] == 48
        for spec in recipe.datasets:
            assert spec.split == "train"


def test_rows_share_one_budget():
    driver = _driver()
    base = _raw("plain_kd.yaml")
    for name in {recipe for _, stages in driver.ROWS.values() for recipe, _ in stages}:
        raw = _raw(name)
        for key in BUDGET_KEYS:
            assert raw["training"][key] == base["training"][key], (name, key)
        assert raw["model"]["path"] == base["model"]["path"]
        assert raw["model"]["max_seq_length"] == base["model"]["max_seq_length"]


def test_two_stage_rows_split_the_same_step_budget(monkeypatch, tmp_path):
    driver = _driver()
    seen = {}

    def fake_train_stage(recipe, student=None, calibrate_norms=False):
        seen.setdefault(recipe.name, []).append(recipe.training["max_steps"])
        return object(), type("Out", (), {"training_loss": 1.0})()

    monkeypatch.setattr(driver, "train_stage", fake_train_stage)
    driver.register_losses()
    for row, (_, stages) in driver.ROWS.items():
        seen.clear()
        _, info = driver.train_row(row, 161, tmp_path)
        assert sum(info["stage_steps"]) == 161, row
        assert len(info["stage_steps"]) == len(stages)


CUMULATIVE = [
    # (row, previous row, what may differ in the stage-2 recipe)
    ("stage1", "plain_kd", set()),
    ("hard_negatives", "stage1", {"loss", "datasets"}),
    ("similarity_kd", "hard_negatives", {"loss"}),
    ("attention_kd", "similarity_kd", {"loss"}),
    ("per_projection_norms", "attention_kd", {"model"}),
    ("multi_precision", "per_projection_norms", {"loss"}),
    ("multi_precision_nonorm", "attention_kd", {"loss"}),
    ("multi_precision_cal", "per_projection_norms_cal", {"loss"}),
]


@pytest.mark.parametrize("row,previous,allowed", CUMULATIVE)
def test_each_row_changes_only_its_component(row, previous, allowed):
    driver = _driver()
    new, old = _raw(_stage2(driver, row)), _raw(_stage2(driver, previous))
    for raw in (new, old):
        raw["training"].pop("max_steps")  # set per stage by the driver from one --steps budget
    for section in ("model", "teacher", "datasets", "loss", "training", "seed"):
        if section not in allowed:
            assert new.get(section) == old.get(section), (row, section)
    if "loss" in allowed:
        assert new["loss"] != old["loss"]


def test_component_details():
    driver = _driver()
    stage2 = {row: _raw(_stage2(driver, row)) for row in driver.ROWS}
    assert set(stage2["plain_kd"]["loss"]) == {"embedding_mse", "pair_kl"}
    assert stage2["plain_kd"]["model"]["conversion"]["norm"] == "none"
    assert set(stage2["hard_negatives"]["loss"]) - set(stage2["stage1"]["loss"]) == {"contrastive"}
    assert {d["name"]: d.get("columns") for d in stage2["hard_negatives"]["datasets"]}["trecqa"] is None  # triplets
    assert {d["name"]: d.get("columns") for d in stage2["stage1"]["datasets"]}["trecqa"] == ["anchor", "positive"]
    assert stage2["similarity_kd"]["loss"]["similarity_kd"]["type"] == "SimilarityDistributionDistillationLoss"
    assert "pair_kl" not in stage2["similarity_kd"]["loss"]
    assert set(stage2["attention_kd"]["loss"]) - set(stage2["similarity_kd"]["loss"]) == {"attention_kd"}
    assert stage2["per_projection_norms"]["model"]["conversion"]["norm"] == "per_projection"
    assert stage2["attention_kd"]["model"]["conversion"]["norm"] == "none"
    assert set(stage2["multi_precision"]["loss"]) - set(stage2["per_projection_norms"]["loss"]) == {"multi_precision"}
    # stage 1 is converted with the row's own norm: the norms rows override it, the others keep "none"
    for row, (_, stages) in driver.ROWS.items():
        if len(stages) == 2:
            norm = stage2[row]["model"]["conversion"]["norm"]
            override = [o for o in stages[0][1] if o.startswith("model.conversion.norm=")]
            assert (override[0].split("=")[1] if override else _raw(stages[0][0])["model"]["conversion"]["norm"]) == norm


def test_registered_losses_maths():
    import torch

    driver = _driver()
    driver.register_losses()
    import st_bitnet.losses as losses

    mse = losses.EmbeddingMSEDistillationLoss.compute_loss_from_embeddings
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    value = mse(None, [a, a], [b, b])
    expected = (2 - 2 * (a * b).sum(-1)).mean()
    assert torch.allclose(value, expected, atol=1e-5)
    assert mse(None, [a], [a]).item() == pytest.approx(0.0, abs=1e-7)
