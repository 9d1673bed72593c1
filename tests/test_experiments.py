"""The experiments (experiments/<name>/) stay runnable: every driver imports, every YAML parses with the current
recipe schema and trains on train splits only, and the quality ablation's rows split one step budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from st_bitnet.training.recipe import load_recipe

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DRIVERS = sorted(p for p in EXPERIMENTS.glob("*/*.py"))
YAMLS = sorted(EXPERIMENTS.glob("*/**/*.yaml"))  # drivers' own recipes and their recipes/ folders


def _load_driver(path: Path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_experiment_has_a_driver_and_a_readme():
    folders = sorted(p for p in EXPERIMENTS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders
    for folder in folders:
        assert (folder / "README.md").is_file(), folder
        assert list(folder.glob("*.py")), folder


@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_driver_imports_and_has_a_main(path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # drivers add benchmarks/ for the shared retrieval metrics
    module = _load_driver(path)
    assert callable(getattr(module, "main", None))
    if "search_scifact" in path.read_text():
        import search_scifact  # resolved from benchmarks/ by the driver's own sys.path entry

        assert callable(search_scifact.per_query_metrics)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_recipe_parses_and_trains_on_train_splits(path):
    recipe = load_recipe(path)
    assert recipe.datasets and recipe.loss
    assert all(spec.split == "train" for spec in recipe.datasets)


def test_ablation_rows_split_one_step_budget(monkeypatch, tmp_path):
    driver = _load_driver(EXPERIMENTS / "quality_ablation" / "run_ablation.py")
    seen = []

    def fake_train_stage(recipe, student=None, calibrate_norms=False):
        seen.append((recipe.name, recipe.training["max_steps"], recipe.output_dir))
        return object(), type("Out", (), {"training_loss": 1.0})()

    monkeypatch.setattr(driver, "train_stage", fake_train_stage)
    for row, (_, stages) in driver.ROWS.items():
        seen.clear()
        _, info = driver.train_row(row, 161, tmp_path)
        assert sum(info["stage_steps"]) == 161 and [s[1] for s in seen] == info["stage_steps"], row
        assert len(seen) == len(stages)
        assert all(Path(out).parent == tmp_path / row for _, _, out in seen)  # each stage writes under its row
