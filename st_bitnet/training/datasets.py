"""The one training-data loader: built-in offline sets, Hub datasets by name, or local files.

Every source becomes a ``datasets.Dataset`` of text columns in (anchor, positive[, negative]) order, the
layout the contrastive and distillation losses read. Built-in sets read the offline copies through
:mod:`st_bitnet.data` and use **train splits only**, minus the project's held-out slices (Banking77's 20%
slice, SciFact's 200 dev queries): dev and test data is for evaluation, never for training.

Built-in names (``name:`` in a recipe):

=====================  =====================================================================================
``stsb`` / ``sick``    train pairs with a high gold score (``min_score``, default 4.0) -> (anchor, positive)
``msrp``               train pairs labelled paraphrase -> (anchor, positive)
``trecqa``             train (question, correct answer, wrong answer for the same question) -> triplets
``scifact``            train queries (the 200 dev queries excluded) -> (anchor = query, positive = passage)
``scifact_titles``     corpus (title, abstract) pairs, the dev queries' relevant documents excluded
``banking77``          train rows outside the held-out 20% -> (text, another text with the same label)
``emotion``            Emotion train -> same-label pairs (only 6 labels: many in-batch false negatives)
``amazon_counterfactual``  train -> same-label pairs (2 labels: mostly false negatives; not recommended)
=====================  =====================================================================================

Other sources: ``hub:<dataset id>`` (with ``subset`` / ``split``), or a path to a ``.tsv``, ``.csv``,
``.jsonl``, ``.json`` or ``.parquet`` file. ``columns`` selects (and orders) the text columns to keep.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_DATASETS = ("stsb", "sick", "msrp", "trecqa", "scifact", "scifact_titles", "banking77", "emotion",
                    "amazon_counterfactual")
# Sets whose offline copies hold only evaluation splits.
EVALUATION_ONLY = {"snli": "SNLI is only available as dev/test offline, and both are reserved for evaluation"}
FILE_SUFFIXES = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FORBIDDEN_SPLITS = ("dev", "validation", "valid", "test", "trial")


class DatasetConfigError(ValueError):
    """A dataset entry of a recipe cannot be loaded as training data."""


@dataclass
class DatasetSpec:
    """One training dataset of a recipe.

    Args:
        name: a built-in name, ``hub:<id>`` or a file path.
        split: the split to read (``train``; dev/test splits are refused).
        subset: the Hub dataset's configuration name.
        columns: text columns to keep, in (anchor, positive, negative...) order; default: all string columns.
        max_rows: keep at most this many rows (a seeded random sample).
        min_score: for ``stsb`` / ``sick``: the lowest gold score counted as a positive pair.
        alias: the dataset's name in the trainer's logs (default: derived from ``name``).
    """

    name: str
    split: str = "train"
    subset: str | None = None
    columns: list[str] | None = None
    max_rows: int | None = None
    min_score: float = 4.0
    alias: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        if self.alias:
            return self.alias
        base = self.name[4:] if self.name.startswith("hub:") else Path(self.name).stem if _is_file(self.name) else self.name
        return "".join(c if c.isalnum() else "_" for c in base)


def _is_file(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_SUFFIXES


def check_spec(spec: DatasetSpec) -> None:
    """Validate a dataset entry without loading it (recipes call this before loading any model)."""
    if spec.split.lower() in FORBIDDEN_SPLITS:
        raise DatasetConfigError(
            f"dataset {spec.name!r}: split {spec.split!r} is an evaluation split; recipes never train on dev/test data"
        )
    if spec.name in EVALUATION_ONLY:
        raise DatasetConfigError(f"dataset {spec.name!r} cannot be used for training: {EVALUATION_ONLY[spec.name]}")
    if spec.name.startswith("hub:"):
        if len(spec.name) <= 4:
            raise DatasetConfigError("a Hub dataset needs an id: hub:<owner>/<name>")
    elif _is_file(spec.name):
        if not Path(os.path.expandvars(spec.name)).expanduser().is_file():
            raise DatasetConfigError(f"dataset file {spec.name!r} does not exist")
    elif spec.name not in BUILTIN_DATASETS:
        raise DatasetConfigError(
            f"unknown dataset {spec.name!r}: use one of the built-in sets {BUILTIN_DATASETS}, "
            f"'hub:<dataset id>', or a path to a {'/'.join(FILE_SUFFIXES)} file"
        )
    elif spec.split != "train":
        raise DatasetConfigError(f"built-in dataset {spec.name!r} is read from its train split only, not {spec.split!r}")
    if spec.max_rows is not None and spec.max_rows < 1:
        raise DatasetConfigError(f"dataset {spec.name!r}: max_rows must be >= 1, got {spec.max_rows}")


def _same_label_pairs(rows: list[dict[str, Any]], rng: random.Random) -> list[dict[str, str]]:
    by_label: dict[Any, list[str]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row["text"])
    pairs = []
    for label in sorted(by_label, key=str):
        texts = by_label[label]
        if len(texts) < 2:
            continue
        partners = list(range(len(texts)))
        rng.shuffle(partners)
        for i, text in enumerate(texts):
            j = partners[i] if partners[i] != i else (i + 1) % len(texts)
            pairs.append({"anchor": text, "positive": texts[j]})
    return pairs


def _trecqa_triplets(rng: random.Random) -> list[dict[str, str]]:
    from st_bitnet import data

    answers: dict[str, dict[int, list[str]]] = defaultdict(lambda: {0: [], 1: []})
    for row in data.load_pairs("trecqa", "train"):
        answers[row["question"]][int(row["label"])].append(row["answer"])
    all_negatives = [a for q in answers.values() for a in q[0]]
    triplets = []
    for question, by_label in answers.items():
        negatives = by_label[0]
        for k, positive in enumerate(by_label[1]):
            # a wrong answer to the same question is a hard negative; questions without one get a random one
            negative = negatives[k % len(negatives)] if negatives else rng.choice(all_negatives)
            triplets.append({"anchor": question, "positive": positive, "negative": negative})
    return triplets


def sts_dev_pairs() -> set[tuple[str, str]]:
    """Every STS-B / SICK dev pair, in both orders: a few also occur verbatim in the train files."""
    from st_bitnet import data

    pairs = set()
    for name in ("stsb", "sick"):
        for row in data.load_sts(name, "dev"):
            pairs.update({(row["sentence1"], row["sentence2"]), (row["sentence2"], row["sentence1"])})
    return pairs


def builtin_rows(spec: DatasetSpec, seed: int) -> list[dict[str, str]]:
    """Rows of a built-in set (train split, held-out slices removed)."""
    from st_bitnet import data

    rng = random.Random(seed)
    name = spec.name
    if name in ("stsb", "sick", "msrp"):
        if name == "msrp":
            rows = [(r["sentence1"], r["sentence2"]) for r in data.load_pairs("msrp", "train") if r["label"] == 1]
        else:
            rows = [(r["sentence1"], r["sentence2"]) for r in data.load_sts(name, "train") if r["score"] >= spec.min_score]
        dev = sts_dev_pairs()
        return [{"anchor": a, "positive": b} for a, b in rows if (a, b) not in dev]
    if name == "trecqa":
        return _trecqa_triplets(rng)
    if name == "scifact":
        return data.scifact_train_pairs()  # dev queries excluded there
    if name == "scifact_titles":
        return data.scifact_title_pairs()  # dev queries' documents excluded there
    if name == "banking77":
        train_rows, _heldout = data.banking77_split()
        return _same_label_pairs(train_rows, rng)
    return _same_label_pairs(data.load_classification(name, "train"), rng)


def _load_external(spec: DatasetSpec):
    import datasets

    if spec.name.startswith("hub:"):
        return datasets.load_dataset(spec.name[4:], spec.subset, split=spec.split)
    path = str(Path(os.path.expandvars(spec.name)).expanduser())
    builder = FILE_SUFFIXES[Path(path).suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise DatasetConfigError(f"dataset {spec.name!r} is empty (no rows)") from None
        raise


def load_training_dataset(spec: DatasetSpec | dict, seed: int = 42):
    """Load one training dataset as a ``datasets.Dataset`` of text columns.

    Raises:
        DatasetConfigError: unknown name, evaluation split, missing columns, or no rows.
    """
    from datasets import Dataset

    if isinstance(spec, dict):
        spec = DatasetSpec(**spec)
    check_spec(spec)
    if spec.name in BUILTIN_DATASETS:
        dataset = Dataset.from_list(builtin_rows(spec, seed))
    else:
        dataset = _load_external(spec)
    if spec.columns:
        missing = [c for c in spec.columns if c not in dataset.column_names]
        if missing:
            raise DatasetConfigError(f"dataset {spec.name!r} has no column(s) {missing}; it has {dataset.column_names}")
        dataset = dataset.select_columns(list(spec.columns))
    else:
        text_columns = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        keep = text_columns + (["label"] if "label" in dataset.column_names else [])
        dataset = dataset.select_columns(keep)
    if len(dataset) == 0 or len(dataset.column_names) == 0:
        raise DatasetConfigError(f"dataset {spec.name!r} is empty (no rows or no text columns after filtering)")
    if spec.max_rows is not None and len(dataset) > spec.max_rows:
        dataset = dataset.shuffle(seed=seed).select(range(spec.max_rows))
    return dataset


def load_training_datasets(specs: list[DatasetSpec | dict], seed: int = 42):
    """Several datasets: a ``DatasetDict`` keyed by dataset alias (one dataset: the ``Dataset`` itself)."""
    from datasets import DatasetDict

    if not specs:
        raise DatasetConfigError("the recipe lists no training datasets")
    specs = [DatasetSpec(**s) if isinstance(s, dict) else s for s in specs]
    keys = [s.key for s in specs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise DatasetConfigError(f"datasets {sorted(duplicates)} appear twice: give them distinct 'alias' values")
    loaded = {spec.key: load_training_dataset(spec, seed) for spec in specs}
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    return DatasetDict(loaded)
