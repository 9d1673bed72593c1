"""Retrieval metrics from a score matrix (queries x documents): recall@k and nDCG@k, BEIR's definitions."""

from __future__ import annotations

import math

import numpy as np


def per_query_retrieval_metrics(scores: np.ndarray, query_ids: list[str], doc_ids: list[str],
                                qrels: dict[str, dict[str, int]], k: int = 10) -> dict[str, np.ndarray]:
    """recall@k and nDCG@k (graded gains, log2 discount) of every query, as fractions in ``query_ids`` order.

    Args:
        scores: ``(len(query_ids), len(doc_ids))`` similarities; higher ranks first (ties: lower index first).
        query_ids / doc_ids: the ids of the rows / columns.
        qrels: ``{query_id: {doc_id: relevance}}``; relevance <= 0 counts as not relevant.
        k: cut-off.
    """
    scores = np.asarray(scores)
    if scores.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores has shape {scores.shape}, expected ({len(query_ids)}, {len(doc_ids)})")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    recalls, ndcgs = [], []
    for row, qid in enumerate(query_ids):
        relevant = {d: r for d, r in qrels.get(qid, {}).items() if r > 0}
        if not relevant:
            raise ValueError(f"query {qid!r} has no relevant document in qrels")
        ranked = [doc_ids[j] for j in top[row]]
        recalls.append(len(set(ranked) & set(relevant)) / len(relevant))
        dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked))
        ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(relevant.values(), reverse=True)[:k]))
        ndcgs.append(dcg / ideal)
    return {"recall": np.array(recalls), "ndcg": np.array(ndcgs)}


def ndcg_at_k(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], qrels: dict[str, dict[str, int]],
              k: int = 10) -> float:
    """Mean nDCG@k x 100 over the queries (see :func:`per_query_retrieval_metrics`)."""
    return round(100 * float(per_query_retrieval_metrics(scores, query_ids, doc_ids, qrels, k)["ndcg"].mean()), 2)
