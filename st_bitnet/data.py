"""The one place that locates the offline data folder and defines train / dev splits.

The offline data folder (``$ST_BITNET_DATA``, default ``~/.cache/st_bitnet/data``; see :func:`data_root`) holds
train and dev splits of
STS-B, SICK, SNLI, MSRP, TrecQA, SciFact (BEIR layout), Banking77, Emotion and AmazonCounterfactual. Test
splits are deliberately absent. Two sets have no dev split, so this module carves fixed held-out slices
out of their train splits, and **training code must exclude them** to keep the dev protocol leak-free:

- Banking77: a fixed, label-stratified 20% of ``train.tsv`` (:func:`banking77_split`).
- SciFact: a fixed 200 of the 809 train queries (:func:`scifact_split`). Their positive documents stay in
  the corpus (the corpus is the retrieval index), but the dev *queries* must never be trained on.

Every split here is deterministic: it depends only on the file contents and :data:`SPLIT_SEED`, never on
global random state, so training and evaluation compute the same slices.

Example::

    from st_bitnet.data import banking77_split, scifact_split, load_sts

    train_rows, heldout_rows = banking77_split()        # train on train_rows only
    train_qids, dev_qids = scifact_split()              # build (query, positive) pairs from train_qids only
    stsb_dev = load_sts("stsb", "dev")                  # [{"sentence1", "sentence2", "score"}, ...]
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

DATA_ENV_VAR = "ST_BITNET_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/st_bitnet/data")
SPLIT_SEED = 20240607
BANKING77_HELDOUT_FRACTION = 0.2
SCIFACT_DEV_QUERIES = 200

STS_SETS = ("stsb", "sick")
PAIR_SETS = ("snli", "msrp", "trecqa")
CLASSIFICATION_SETS = ("banking77", "emotion", "amazon_counterfactual")
RETRIEVAL_SETS = ("scifact",)


def data_root(required: bool = True) -> Path | None:
    """Locate the offline data folder.

    The folder is the environment variable ``ST_BITNET_DATA`` when it is set, else :data:`DEFAULT_DATA_DIR`
    (``~/.cache/st_bitnet/data``).

    Args:
        required: if True (default) raise when the folder cannot be found; otherwise return None.

    Returns:
        The folder, as an absolute :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: if ``required`` and neither location is a folder.
    """
    env_value = os.environ.get(DATA_ENV_VAR)
    candidate = Path(env_value or DEFAULT_DATA_DIR).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if not required:
        return None
    source = f"${DATA_ENV_VAR}" if env_value else f"the default (${DATA_ENV_VAR} is not set)"
    raise FileNotFoundError(
        f"st_bitnet offline data folder not found at {candidate} ({source}). Set the environment variable "
        f"{DATA_ENV_VAR} to the folder holding sts/, classification/, retrieval/ and pairs/, or load the tasks "
        "from the Hub by name."
    )


def has_data() -> bool:
    """True if the offline data folder can be found (used by tests to skip cleanly)."""
    return data_root(required=False) is not None


def _path(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"Expected data file {path} is missing from the offline data folder.")
    return path


def read_tsv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a header-row, tab-separated file (csv-style quoting, as written by the data's exporter)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle, delimiter="\t")]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file (one object per non-empty line)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _check(name: str, allowed: tuple[str, ...], kind: str) -> None:
    if name not in allowed:
        raise ValueError(f"Unknown {kind} set {name!r}; expected one of {allowed}.")


def load_sts(name: str, split: str) -> list[dict[str, Any]]:
    """STS pairs with a float gold score.

    Args:
        name: ``"stsb"`` (scores 0-5) or ``"sick"`` (scores 1-5; ``dev`` is SICK's official trial split).
        split: ``"train"`` or ``"dev"``.

    Returns:
        A list of ``{"sentence1": str, "sentence2": str, "score": float}``.
    """
    _check(name, STS_SETS, "STS")
    rows = read_tsv(_path("sts", name, f"{split}.tsv"))
    return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["score"])} for r in rows]


def load_pairs(name: str, split: str) -> list[dict[str, Any]]:
    """Labelled sentence pairs: SNLI (``dev``/``test``; premise, hypothesis, label), MSRP and TrecQA (``train``).

    Labels stay as in the file: strings for SNLI, ints for MSRP / TrecQA.
    """
    _check(name, PAIR_SETS, "pair")
    rows = read_tsv(_path("pairs", name, f"{split}.tsv"))
    if name in ("msrp", "trecqa"):
        for row in rows:
            row["label"] = int(row["label"])
    return rows


def load_classification(name: str, split: str) -> list[dict[str, Any]]:
    """Text classification rows ``{"text": str, "label": str | int}``.

    Banking77 has only a ``train`` split on disk; use :func:`banking77_split` for its train / held-out slices.
    AmazonCounterfactual labels are ints (1 = counterfactual), the others are label names.
    """
    _check(name, CLASSIFICATION_SETS, "classification")
    rows = read_tsv(_path("classification", name, f"{split}.tsv"))
    if name == "amazon_counterfactual":
        for row in rows:
            row["label"] = int(row["label"])
    return rows


def load_beir(name: str = "scifact") -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """A retrieval set in BEIR layout.

    Returns:
        ``(corpus, queries, qrels)``: ``corpus[doc_id] = {"title", "text"}``, ``queries[query_id] = text``,
        ``qrels[query_id][doc_id] = relevance`` (train qrels, the only ones on disk).
    """
    _check(name, RETRIEVAL_SETS, "retrieval")
    corpus = {
        str(d["_id"]): {"title": d.get("title", "") or "", "text": d.get("text", "") or ""}
        for d in read_jsonl(_path("retrieval", name, "corpus.jsonl"))
    }
    queries = {str(q["_id"]): q["text"] for q in read_jsonl(_path("retrieval", name, "queries.jsonl"))}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for row in read_tsv(_path("retrieval", name, "qrels", "train.tsv")):
        qrels[str(row["query-id"])][str(row["corpus-id"])] = int(row["score"])
    return corpus, queries, dict(qrels)


def banking77_split(
    seed: int = SPLIT_SEED, heldout_fraction: float = BANKING77_HELDOUT_FRACTION
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split Banking77 train into (train_rows, heldout_rows): a fixed, label-stratified held-out slice.

    Per label, the rows are shuffled with a private ``random.Random(seed)`` and the first
    ``round(heldout_fraction * n)`` go to held-out. Rows whose exact text also appears in the held-out slice
    are dropped from the train side, so no held-out sentence is ever trained on.

    Returns:
        ``(train_rows, heldout_rows)``, each a list of ``{"text", "label"}`` in file order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rows = load_classification("banking77", "train")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["label"]].append(index)
    rng = random.Random(seed)
    heldout_indices: set[int] = set()
    for label in sorted(by_label):
        indices = list(by_label[label])
        rng.shuffle(indices)
        heldout_indices.update(indices[: round(heldout_fraction * len(indices))])
    heldout = [row for i, row in enumerate(rows) if i in heldout_indices]
    heldout_texts = {row["text"] for row in heldout}
    train = [row for i, row in enumerate(rows) if i not in heldout_indices and row["text"] not in heldout_texts]
    return train, heldout


def scifact_split(seed: int = SPLIT_SEED, n_dev: int = SCIFACT_DEV_QUERIES) -> tuple[list[str], list[str]]:
    """Split SciFact's train queries into (train_query_ids, dev_query_ids) with a fixed ``n_dev`` dev queries.

    Query ids with qrels are sorted numerically, shuffled with a private ``random.Random(seed)``, and the
    first ``n_dev`` become dev. Both returned lists are sorted. The corpus is untouched: dev positives stay
    retrievable; only the dev queries (and their query->positive pairs) must be excluded from training.
    """
    _, queries, qrels = load_beir("scifact")
    query_ids = sorted((qid for qid in queries if qid in qrels), key=lambda q: (len(q), q))
    if not 0 < n_dev < len(query_ids):
        raise ValueError(f"n_dev must be in (0, {len(query_ids)}), got {n_dev}")
    shuffled = list(query_ids)
    random.Random(seed).shuffle(shuffled)
    dev = set(shuffled[:n_dev])
    order = {qid: i for i, qid in enumerate(query_ids)}
    train_ids = sorted((q for q in query_ids if q not in dev), key=order.__getitem__)
    dev_ids = sorted(dev, key=order.__getitem__)
    return train_ids, dev_ids


def scifact_dev() -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """SciFact retrieval dev set: the full corpus, the 200 held-out queries and their qrels."""
    corpus, queries, qrels = load_beir("scifact")
    _, dev_ids = scifact_split()
    return corpus, {q: queries[q] for q in dev_ids}, {q: qrels[q] for q in dev_ids}


def beir_doc_text(doc: dict[str, str]) -> str:
    """A BEIR corpus entry as one passage: ``title + " " + text``, as mteb / BEIR models usually see documents."""
    return f"{doc['title']} {doc['text']}".strip()


def scifact_train_pairs() -> list[dict[str, str]]:
    """(query, positive passage) training pairs from the SciFact train queries only (dev queries excluded).

    The passage is :func:`beir_doc_text`.
    """
    corpus, queries, qrels = load_beir("scifact")
    train_ids, _ = scifact_split()
    pairs = []
    for qid in train_ids:
        for doc_id, relevance in sorted(qrels[qid].items()):
            if relevance > 0 and doc_id in corpus:
                pairs.append({"anchor": queries[qid], "positive": beir_doc_text(corpus[doc_id])})
    return pairs


def scifact_title_pairs() -> list[dict[str, str]]:
    """(title, abstract) pairs of the SciFact corpus, the documents judged relevant to a dev query excluded.

    Unsupervised in-domain pairs (no query, no relevance label): a title is a short query-like summary of its
    abstract. Leaving out every positive of the 200 dev queries keeps the documents the dev protocol scores
    against unseen in training, so dev retrieval still measures generalisation to new documents too.
    """
    corpus, _, qrels = load_beir("scifact")
    _, dev_ids = scifact_split()
    held_out = {doc_id for qid in dev_ids for doc_id, relevance in qrels[qid].items() if relevance > 0}
    return [{"anchor": doc["title"].strip(), "positive": doc["text"].strip()}
            for doc_id, doc in sorted(corpus.items())
            if doc_id not in held_out and doc["title"].strip() and doc["text"].strip()]


def dev_classification_splits(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train_rows, eval_rows) for a classification dev task: the classifier fits on the first, scores on the second.

    Banking77 uses :func:`banking77_split`; Emotion and AmazonCounterfactual use their train / dev files.
    """
    if name == "banking77":
        return banking77_split()
    return load_classification(name, "train"), load_classification(name, "dev")


def to_dataset(rows: list[dict[str, Any]]):
    """Turn a list of row dicts into a ``datasets.Dataset`` (imports ``datasets`` lazily)."""
    from datasets import Dataset

    return Dataset.from_list(rows)


__all__ = [
    "DATA_ENV_VAR",
    "SPLIT_SEED",
    "BANKING77_HELDOUT_FRACTION",
    "SCIFACT_DEV_QUERIES",
    "data_root",
    "has_data",
    "read_tsv",
    "read_jsonl",
    "load_sts",
    "load_pairs",
    "load_classification",
    "load_beir",
    "banking77_split",
    "scifact_split",
    "scifact_dev",
    "scifact_train_pairs",
    "dev_classification_splits",
    "to_dataset",
]
