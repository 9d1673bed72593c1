"""Paired bootstrap of the trained-quantizer vs post-hoc comparison of train_multi_precision_smoke.py models.

For each saved multi-precision model and STS dev set, the "advantage" at b bits is Spearman(trained quantizer) -
Spearman(post-hoc quantization) on the same float embeddings, i.e. post-hoc drop - trained drop vs the model's own
16-bit output. A 95% interval from 1,000 resamples of the dev pairs tells a win from noise. With
``--scifact-max-seq-length`` the same is done for SciFact-dev nDCG@10 (resampling the 200 queries; post-hoc ranges
measured on the documents and queries, as in train_multi_precision_smoke.py).

Usage:
    python experiments/multi_precision_smoke/multi_precision_bootstrap.py MODEL [MODEL ...] --scifact-max-seq-length 128 \
        --out experiments/multi_precision_smoke/results/multi_precision_smoke_bootstrap.json
"""

from __future__ import annotations

import argparse
import os
import sys
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sentence_transformers import SentenceTransformer

from st_bitnet import data

# search_scifact.py (the search benchmark) holds the retrieval metrics these runs report
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from st_bitnet.multi_precision import find_quantizer, posthoc_quantizer, similarity_at_bits

# The offline data next to this checkout, unless $ST_BITNET_DATA says otherwise.
os.environ.setdefault("ST_BITNET_DATA", str(Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def pair_cosines(embeddings: np.ndarray, n: int) -> np.ndarray:
    a, b = embeddings[:n].astype(np.float64), embeddings[n:].astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)


def advantage(model, set_name: str, bits: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(point, 2.5th percentile, 97.5th percentile) of Spearman(trained) - Spearman(post-hoc), x100."""
    rows = data.load_sts(set_name, "dev")
    n, gold = len(rows), np.array([r["score"] for r in rows])
    floats = model.encode([r["sentence1"] for r in rows] + [r["sentence2"] for r in rows], batch_size=64)
    trained = pair_cosines(find_quantizer(model).quantize(floats, bits).dequantize(), n)
    posthoc = pair_cosines(posthoc_quantizer(floats).quantize(floats, bits).dequantize(), n)
    point = spearmanr(trained, gold).correlation - spearmanr(posthoc, gold).correlation
    samples = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    deltas = [spearmanr(trained[i], gold[i]).correlation - spearmanr(posthoc[i], gold[i]).correlation for i in samples]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return round(100 * point, 3), round(100 * low, 3), round(100 * high, 3)


def paired_interval(trained: np.ndarray, posthoc: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) x100 of the per-query difference trained - post-hoc, queries resampled."""
    difference = trained - posthoc
    samples = np.random.default_rng(seed).integers(0, len(difference), size=(resamples, len(difference)))
    low, high = np.percentile(difference[samples].mean(axis=1), [2.5, 97.5])
    return round(100 * float(difference.mean()), 3), round(100 * low, 3), round(100 * high, 3)


def scifact_advantages(model, max_seq_length: int, bits_list=(2, 1)) -> dict[int, tuple[float, float, float]]:
    """SciFact-dev nDCG@10 advantage of the trained quantizer over post-hoc at each width, from one encode."""
    from search_scifact import per_query_metrics

    corpus, queries, qrels = data.scifact_dev()
    doc_ids, query_ids = list(corpus), list(queries)
    model[0].max_seq_length = max_seq_length
    docs = model.encode([data.beir_doc_text(corpus[d]) for d in doc_ids], batch_size=64)
    qs = model.encode([queries[q] for q in query_ids], batch_size=64)
    quantizers = {"trained": find_quantizer(model), "posthoc": posthoc_quantizer(np.concatenate([docs, qs]))}
    results = {}
    for bits in bits_list:
        ndcg = {}
        for name, quantizer in quantizers.items():
            scores = similarity_at_bits(quantizer.quantize(qs, bits).dequantize(), quantizer.quantize(docs, bits).dequantize(), bits)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
            hits = [[{"corpus_id": int(i)} for i in row] for row in top]
            ndcg[name] = per_query_metrics(hits, query_ids, doc_ids, qrels)["ndcg"]
        results[bits] = paired_interval(ndcg["trained"], ndcg["posthoc"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="folders saved by train_multi_precision_smoke.py --save-model")
    parser.add_argument("--scifact-max-seq-length", type=int, default=None, help="also bootstrap SciFact-dev nDCG@10")
    parser.add_argument("--out", default="experiments/multi_precision_smoke/results/multi_precision_smoke_bootstrap.json")
    args = parser.parse_args()
    results = {}

    def record(key: str, point: float, low: float, high: float) -> None:
        results[key] = [point, low, high]
        print(f"{key}: advantage {point:.2f}, 95% CI [{low:.2f}, {high:.2f}]", flush=True)

    for path in args.models:
        model = SentenceTransformer(path, device="cpu", trust_remote_code=True)
        for set_name in ("stsb", "sick"):
            for bits in (2, 1):
                record(f"{Path(path).name}/{set_name}/{bits}bit", *advantage(model, set_name, bits))
        if args.scifact_max_seq_length:
            for bits, interval in scifact_advantages(model, args.scifact_max_seq_length).items():
                record(f"{Path(path).name}/scifact/{bits}bit", *interval)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
