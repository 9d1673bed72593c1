"""Tests for st_bitnet.data: locating the offline data and the fixed, leak-free dev splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from st_bitnet import data

needs_data = pytest.mark.skipif(
    not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) is absent"
)


def test_data_root_env_var_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert data.data_root() == tmp_path.resolve()


def test_data_root_default_is_the_documented_folder_not_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_root(required=False) is None  # ../shared/data next to the checkout is not looked at
    default = tmp_path / ".cache" / "st_bitnet" / "data"
    with pytest.raises(FileNotFoundError, match=str(default)):
        data.data_root()
    default.mkdir(parents=True)
    assert data.data_root() == default.resolve()


def test_data_root_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV_VAR):
        data.data_root()
    assert data.data_root(required=False) is None


def test_read_tsv_handles_csv_quoting(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text('text\tlabel\n"it says ""pending"", why?"\t1\nplain\t0\n', encoding="utf-8")
    rows = data.read_tsv(path)
    assert rows == [{"text": 'it says "pending", why?', "label": "1"}, {"text": "plain", "label": "0"}]


def test_unknown_set_name_raises():
    with pytest.raises(ValueError, match="Unknown STS set"):
        data.load_sts("stsc", "dev")


@needs_data
def test_loaders_return_expected_sizes_and_types():
    stsb = data.load_sts("stsb", "dev")
    assert len(stsb) == 1500 and isinstance(stsb[0]["score"], float)
    assert len(data.load_sts("sick", "dev")) == 500
    assert len(data.load_classification("emotion", "dev")) == 2000
    counterfactual = data.load_classification("amazon_counterfactual", "dev")
    assert len(counterfactual) == 335 and {r["label"] for r in counterfactual} == {0, 1}
    corpus, queries, qrels = data.load_beir("scifact")
    assert (len(corpus), len(queries), len(qrels)) == (5183, 809, 809)


@needs_data
def test_banking77_split_is_fixed_stratified_and_disjoint():
    train, heldout = data.banking77_split()
    train2, heldout2 = data.banking77_split()
    assert heldout == heldout2 and train == train2
    total = len(data.load_classification("banking77", "train"))
    assert abs(len(heldout) - 0.2 * total) < 77  # per-label rounding only
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    labels_train, labels_heldout = Counter(r["label"] for r in train), Counter(r["label"] for r in heldout)
    assert set(labels_train) == set(labels_heldout) and len(labels_heldout) == 77
    # A different seed gives a different slice (the split really is seed-driven).
    _, other = data.banking77_split(seed=1)
    assert {r["text"] for r in other} != {r["text"] for r in heldout}


@needs_data
def test_scifact_split_fixed_200_and_disjoint():
    train_ids, dev_ids = data.scifact_split()
    assert len(dev_ids) == 200 and len(train_ids) == 609
    assert not set(train_ids) & set(dev_ids)
    assert data.scifact_split() == (train_ids, dev_ids)
    corpus, queries, qrels = data.scifact_dev()
    assert set(queries) == set(dev_ids)
    # Dev positives stay in the corpus.
    assert all(doc in corpus for q in qrels for doc in qrels[q])
    # Training pairs never contain a dev query.
    dev_texts = set(queries.values())
    assert not any(p["anchor"] in dev_texts for p in data.scifact_train_pairs())


@needs_data
def test_to_dataset_roundtrip():
    rows = data.load_sts("sick", "dev")[:5]
    dataset = data.to_dataset(rows)
    assert dataset.column_names == ["sentence1", "sentence2", "score"] and len(dataset) == 5


def test_data_module_does_not_live_in_repo():
    root = data.data_root(required=False)
    if root is None:
        pytest.skip("offline data folder is absent")
    repo = Path(data.__file__).resolve().parent.parent
    assert repo not in root.parents, "offline data must not be copied into the repository"
