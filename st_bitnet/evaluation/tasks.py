"""mteb tasks for the dev protocol, with their data loaded from local files (or from the Hub by name).

Each local task is mteb's own task class (``mteb.get_task(name)``: its metadata, evaluator, metrics and main
score), with ``task.dataset`` filled from ``st_bitnet.data`` instead of the Hub. The dev protocol:

============================== ============== =========================================================
mteb task                      type           local data (``st_bitnet.data``)
============================== ============== =========================================================
STSBenchmark                   STS            ``sts/stsb/dev.tsv``
SICK-R                         STS            ``sts/sick/dev.tsv`` (SICK's official trial split)
EmotionClassification          Classification ``classification/emotion`` train -> dev
AmazonCounterfactualClass.     Classification ``classification/amazon_counterfactual`` (en) train -> dev
Banking77Classification        Classification ``banking77_split()``: train minus a fixed 20% -> that 20%
SciFact                        Retrieval      full corpus, the fixed 200 held-out train queries
============================== ============== =========================================================

Main scores (mteb's): STS cosine Spearman, classification accuracy (logistic regression on embeddings, mteb's
``samples_per_label`` x ``n_experiments`` protocol), retrieval nDCG@10.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from .. import data

logger = logging.getLogger(__name__)

LOCAL_SPLIT = "dev"
SUBSAMPLE_SEED = 42

# mteb task name -> (task type, short description of the local data)
DEV_TASKS: dict[str, tuple[str, str]] = {
    "STSBenchmark": ("STS", "sts/stsb/dev.tsv"),
    "SICK-R": ("STS", "sts/sick/dev.tsv (trial)"),
    "EmotionClassification": ("Classification", "classification/emotion train->dev"),
    "AmazonCounterfactualClassification": ("Classification", "classification/amazon_counterfactual train->dev"),
    "Banking77Classification": ("Classification", "banking77 train minus fixed 20% -> held-out 20%"),
    "SciFact": ("Retrieval", "retrieval/scifact corpus, 200 held-out train queries"),
}
DEV_TASK_NAMES: tuple[str, ...] = tuple(DEV_TASKS)

# Friendly aliases accepted on the command line.
TASK_ALIASES = {
    "stsb": "STSBenchmark",
    "sts-b": "STSBenchmark",
    "sick": "SICK-R",
    "sick-r": "SICK-R",
    "emotion": "EmotionClassification",
    "amazon_counterfactual": "AmazonCounterfactualClassification",
    "amazoncounterfactual": "AmazonCounterfactualClassification",
    "banking77": "Banking77Classification",
    "scifact": "SciFact",
}


@dataclass
class PreparedTask:
    """An mteb task with its data in place, ready for ``task.evaluate(encoder, split=split, ...)``."""

    task: Any
    split: str
    source: str  # "local" or "hub"
    data_description: str

    @property
    def name(self) -> str:
        return self.task.metadata.name

    @property
    def type(self) -> str:
        return self.task.metadata.type

    @property
    def main_score_name(self) -> str:
        return self.task.metadata.main_score


def canonical_task_name(name: str) -> str:
    """Map an alias (``stsb``, ``banking77``...) to its mteb task name; other names pass through."""
    return TASK_ALIASES.get(name.lower(), name)


def _subsample(rows: list, max_samples: int | None) -> list:
    if max_samples is None or len(rows) <= max_samples:
        return rows
    indices = sorted(random.Random(SUBSAMPLE_SEED).sample(range(len(rows)), max_samples))
    return [rows[i] for i in indices]


def _sts_dataset(name: str, max_samples: int | None):
    from datasets import Dataset, DatasetDict

    rows = _subsample(data.load_sts(name, "dev"), max_samples)
    return DatasetDict({LOCAL_SPLIT: Dataset.from_list(rows)})


def _classification_dataset(name: str, max_samples: int | None):
    from datasets import Dataset, DatasetDict

    train_rows, eval_rows = data.dev_classification_splits(name)
    eval_rows = _subsample(eval_rows, max_samples)
    if max_samples is not None:
        # Quick runs: a smaller pool for mteb's per-label undersampling (its union over experiments is encoded).
        train_rows = _subsample(train_rows, 10 * max_samples)
    # Integer labels from one sorted label set across both splits (mteb's evaluator wants consistent ids).
    names = sorted({str(r["label"]) for r in train_rows} | {str(r["label"]) for r in eval_rows})
    label_id = {label: i for i, label in enumerate(names)}

    def to_dataset(rows):
        return Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [label_id[str(r["label"])] for r in rows]}
        )

    return DatasetDict({"train": to_dataset(train_rows), LOCAL_SPLIT: to_dataset(eval_rows)})


def _retrieval_split(max_samples: int | None) -> dict[str, Any]:
    from datasets import Dataset

    corpus, queries, qrels = data.scifact_dev()
    if max_samples is not None and len(queries) > max_samples:
        # Quick runs: fewer queries and a smaller corpus (their positives + a fixed sample of distractors).
        kept = sorted(random.Random(SUBSAMPLE_SEED).sample(sorted(queries), max_samples))
        queries = {q: queries[q] for q in kept}
        qrels = {q: qrels[q] for q in kept}
        positives = {doc for q in qrels for doc in qrels[q]}
        others = sorted(set(corpus) - positives)
        n_distractors = max(0, 10 * max_samples - len(positives))
        distractors = random.Random(SUBSAMPLE_SEED).sample(others, min(n_distractors, len(others)))
        corpus = {doc: corpus[doc] for doc in sorted(positives | set(distractors))}
    return {
        "corpus": Dataset.from_list([{"id": d, "title": v["title"], "text": v["text"]} for d, v in corpus.items()]),
        "queries": Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
        "relevant_docs": {q: dict(docs) for q, docs in qrels.items()},
        "top_ranked": None,
    }


def load_local_task(name: str, max_samples: int | None = None) -> PreparedTask:
    """mteb's task class for ``name`` with its dev data loaded from ``st_bitnet.data`` (no network).

    Args:
        name: an mteb task name from :data:`DEV_TASK_NAMES` (or an alias such as ``"stsb"``).
        max_samples: cap on evaluation pairs / texts / queries, for quick runs (fixed-seed subsample; the
            classifier's training pool is capped at 10x and the retrieval corpus at 10x too; scores are then not
            comparable with full runs).
    """
    import mteb

    name = canonical_task_name(name)
    if name not in DEV_TASKS:
        raise ValueError(f"No local dev data for task {name!r}; local tasks are {DEV_TASK_NAMES}.")
    task_type, description = DEV_TASKS[name]
    task = mteb.get_task(name)
    if task_type == "STS":
        dataset = _sts_dataset("stsb" if name == "STSBenchmark" else "sick", max_samples)
    elif task_type == "Classification":
        local = {
            "EmotionClassification": "emotion",
            "AmazonCounterfactualClassification": "amazon_counterfactual",
            "Banking77Classification": "banking77",
        }[name]
        dataset = _classification_dataset(local, max_samples)
    else:
        dataset = {LOCAL_SPLIT: _retrieval_split(max_samples)}
    task.dataset = {"default": dataset}
    task.hf_subsets = ["default"]
    task.data_loaded = True
    return PreparedTask(task=task, split=LOCAL_SPLIT, source="local", data_description=description)


def load_hub_task(name: str, split: str | None = None, languages: list[str] | None = ("eng",)) -> PreparedTask:
    """An mteb task by name, loading its data from the Hugging Face Hub (needs network access).

    Args:
        name: any mteb task name.
        split: evaluation split; defaults to the task's first eval split.
        languages: subsets to keep for multilingual tasks (ISO 639-3), ``None`` for all.
    """
    import mteb

    name = canonical_task_name(name)
    task = mteb.get_task(name, languages=list(languages) if languages else None)
    task.load_data()
    split = split or task.metadata.eval_splits[0]
    return PreparedTask(task=task, split=split, source="hub", data_description=f"hub:{task.metadata.dataset['path']}")


def prepare_tasks(
    names: list[str] | None = None, source: str = "auto", max_samples: int | None = None
) -> list[PreparedTask]:
    """Resolve task names to prepared mteb tasks.

    Args:
        names: mteb task names or aliases; ``None`` for the whole dev protocol (:data:`DEV_TASK_NAMES`).
        source: ``"local"`` (offline files only), ``"hub"`` (mteb's Hub data by name), or ``"auto"``
            (local files for dev-protocol tasks when the data folder exists, the Hub otherwise).
        max_samples: cap for quick runs (local tasks only).
    """
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    names = [canonical_task_name(n) for n in (names or DEV_TASK_NAMES)]
    prepared = []
    for name in names:
        local_possible = name in DEV_TASKS and data.has_data()
        if source == "local" or (source == "auto" and local_possible):
            if not data.has_data():
                data.data_root()  # raises the clear "data folder not found" error
            prepared.append(load_local_task(name, max_samples=max_samples))
        else:
            if max_samples is not None:
                logger.warning("--max-samples is ignored for Hub task %s", name)
            prepared.append(load_hub_task(name))
    return prepared


def calibration_texts(n_per_source: int = 200) -> list[str] | None:
    """A fixed sample of *training-side* texts to calibrate post-hoc output quantization ranges once per model.

    Drawn from STS-B train, Emotion train, the Banking77 train side, SciFact train queries and SciFact corpus
    documents (the retrieval index itself, which an index may legitimately calibrate on); never from a dev slice.
    Returns None when the offline data folder is absent (each batch is then calibrated on itself).
    """
    if not data.has_data():
        return None
    rng = random.Random(SUBSAMPLE_SEED)

    def sample(texts: list[str]) -> list[str]:
        texts = sorted(set(texts))
        return rng.sample(texts, min(n_per_source, len(texts)))

    corpus, queries, _ = data.load_beir("scifact")
    train_query_ids, _ = data.scifact_split()
    banking_train, _ = data.banking77_split()
    texts = []
    texts += sample([r["sentence1"] for r in data.load_sts("stsb", "train")])
    texts += sample([r["text"] for r in data.load_classification("emotion", "train")])
    texts += sample([r["text"] for r in banking_train])
    texts += sample([queries[q] for q in train_query_ids])
    texts += sample([data.beir_doc_text(d) for d in corpus.values()])
    return texts
