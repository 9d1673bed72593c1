"""The side-by-side CPU benchmark runs end to end (``--quick``) and reports every variant and column."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def bench():
    import bench_side_by_side

    return bench_side_by_side


def test_quick_run_reports_every_variant_and_column(bench, tmp_path):
    out = tmp_path / "sbs"
    bench.main(["--quick", "--no-memory", "--profile", "--out", str(out)])
    report = json.loads((out.with_suffix(".json")).read_text())
    meta, results = report["meta"], report["results"]
    assert set(meta["skipped"]) | set(meta["variants"]) == set(bench.VARIANTS)
    assert set(bench.ST_VARIANTS) | set(bench.TORCH_VARIANTS) <= set(meta["variants"])
    assert all(reason for reason in meta["skipped"].values())
    columns = [f"{b}x{s}" for b, s in bench.QUICK_SHAPES]
    assert meta["shapes"] == columns and meta["torch"] == torch.__version__ and meta["threads"] >= 1
    assert len(meta["loadavg_before"]) == 3 and len(meta["loadavg_after"]) == 3
    assert set(results) == set(bench.FULL_LAYERS)
    for r in results.values():
        assert list(r["tokens_per_s"]) == columns
        for col in columns:
            speeds = r["tokens_per_s"][col]
            assert set(speeds) == set(meta["variants"]) and all(v > 0 for v in speeds.values())
            best_ours = max(speeds[v] for v in bench.ST_VARIANTS)
            best_theirs = max(v for k, v in speeds.items() if k not in bench.ST_VARIANTS)
            assert r["ratio"][col]["ratio"] == pytest.approx(best_ours / best_theirs)
        from bench_profile import PARTS, PROFILED_VARIANTS

        assert len(r["profile"]) == 2 * len(PROFILED_VARIANTS)  # every profiled variant at two shapes
        for prof in r["profile"].values():
            share = prof["share"]
            assert set(share) == set(PARTS) and sum(share.values()) == pytest.approx(1.0)
            assert share["linears"] > 0 and share["attention"] > 0 and share["norms"] > 0 and prof["forward_ms"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(v in table for v in meta["variants"]) and all(c in table for c in columns)


def test_variants_compute_the_same_model(bench):
    # every variant starts from the same seeded weights: the float ones agree closely, the packed ones with each other
    ids, mask = bench._inputs(2, 16)
    out = {v: bench._forward(bench.build_variant(v, "gemma3", 1), ids, mask).float()
           for v in bench.ST_VARIANTS + bench.TORCH_VARIANTS}  # fmt: skip
    cos = torch.nn.functional.cosine_similarity
    assert cos(out["torch-bf16"], out["torch-fp32"], dim=-1).min() > 0.99
    assert cos(out["torch-int8-dynamic"], out["torch-fp32"], dim=-1).min() > 0.95
    assert cos(out["st_bitnet-bf16"], out["st_bitnet"], dim=-1).min() > 0.99


def test_memory_child_reports_resident_and_peak(bench):
    mem = bench.memory_child("gemma3", 1, "st_bitnet", (1, 8))
    assert 0 < mem["resident_mib"] <= mem["peak_forward_mib"]
