"""Model cards describe the saved model, and their usage snippets run as written for every kind of saved folder:
the stock snippet where st_bitnet cannot be imported, the st_bitnet snippet with it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

import st_bitnet
from st_bitnet import BitNetConversionConfig
from st_bitnet.model_card import ST_CARD_MARKER, card_code_blocks, write_model_card
from st_bitnet.multi_precision import MultiPrecisionQuantizer, encode
from st_bitnet.sentence_transformer import build_sentence_transformer, save_pretrained

from conftest import SENTENCES, run_python

REPO_ID = "someone/bitembed-test"
KINDS = {
    "stock-bitnet": (BitNetConversionConfig(), False),
    "bitembed": (BitNetConversionConfig(norm="subln", bidirectional=True), False),
    "stock-with-quantizer": (BitNetConversionConfig(norm="none"), True),
}


def _save(backbone_dirs, folder: Path, config: BitNetConversionConfig, quantizer: bool):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), config)
    if quantizer:
        model.append(MultiPrecisionQuantizer.from_embeddings(model.encode(SENTENCES * 4)))
    return model, save_pretrained(model, folder, repo_id=REPO_ID)


@pytest.mark.parametrize("kind", list(KINDS))
def test_card_snippets_run_as_written(backbone_dirs, tmp_path, kind):
    config, quantizer = KINDS[kind]
    model, folder = _save(backbone_dirs, tmp_path / kind, config, quantizer)
    expected = model.encode(SENTENCES[:3])
    readme = folder / "README.md"
    stock, with_st_bitnet = (block.replace(REPO_ID, str(folder)) for block in card_code_blocks(readme))
    install = card_code_blocks(readme, "bash")[0]
    assert install.split()[:2] == ["pip", "install"]
    needs_accelerate = kind != "bitembed"  # transformers' own bitnet loader imports accelerate
    assert ("accelerate" in install.split()) == needs_accelerate

    # The stock snippet, where st_bitnet cannot be imported (only the packages the card names).
    probe = "\nimport numpy as np\nnp.save({out!r}, embeddings)\nprint(sorted({{type(m).__module__ for m in model.modules()}}))\n"
    modules = run_python(stock + probe.format(out=str(tmp_path / "stock.npy")), hide_st_bitnet=True)
    assert "(3, 64)" in modules and "st_bitnet" not in modules.replace("st_bitnet_modules", "")
    if quantizer:
        assert "quantizer" in modules  # the shipped copy of the quantizer module ran
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), model.encode(sentences), atol=1e-5)
    assert expected.shape == (3, 64)

    # The st_bitnet snippet, as written (st_bitnet imported; no trust_remote_code).
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(with_st_bitnet, "README.md", "exec"), namespace)  # noqa: S102 - our own generated card
    assert namespace["corpus"].bits == 1 and namespace["query"].similarity(namespace["corpus"]).shape == (1, 3)
    if quantizer:
        loaded_quantizer = namespace["model"][-1]
        assert type(loaded_quantizer) is MultiPrecisionQuantizer  # st_bitnet's own class, not the folder's copy
        np.testing.assert_array_equal(namespace["corpus"].codes, encode(model, namespace["documents"], precision="1bit").codes)


def test_multi_precision_folder_ships_its_module_code(backbone_dirs, tmp_path):
    model, folder = _save(backbone_dirs, tmp_path / "mp", BitNetConversionConfig(), True)
    types = [entry["type"] for entry in json.loads((folder / "modules.json").read_text())]
    assert types[-1] == "st_bitnet_modules.MultiPrecisionQuantizer"
    assert {"st_bitnet_modules.py", "quantizer.py", "module_io.py", "packing.py"} <= {p.name for p in folder.glob("*.py")}
    loaded = st_bitnet.load(str(folder))  # no trust_remote_code: st_bitnet's installed class is used
    assert type(loaded[-1]) is MultiPrecisionQuantizer
    np.testing.assert_array_equal(encode(loaded, SENTENCES, precision="2bit").codes,
                                  encode(model, SENTENCES, precision="2bit").codes)
    from st_bitnet.multi_precision import MultiPrecisionSentenceTransformer

    subclass = MultiPrecisionSentenceTransformer(str(folder))  # no trust_remote_code either
    assert type(subclass[-1]) is MultiPrecisionQuantizer
    np.testing.assert_array_equal(subclass.encode(SENTENCES, precision="1bit").codes,
                                  encode(model, SENTENCES, precision="1bit").codes)
    text = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in text and "`st_bitnet_modules.py`" in text


@pytest.mark.parametrize("norm,phrase", [
    ("per_projection", "with an RMSNorm in front of each converted projection"),
    ("subln", "in front of the projections fed by attention and FFN internals only"),
    ("none", "with no added norms"),
])
def test_card_describes_the_saved_norm_placement(backbone_dirs, tmp_path, norm, phrase):
    _, folder = _save(backbone_dirs, tmp_path / norm, BitNetConversionConfig(norm=norm), False)
    text = (folder / "README.md").read_text()
    assert phrase in " ".join(text.split()) and f"| `norm` | {norm} |" in text
    assert "RMSNorm in front of each" not in text or norm == "per_projection"


SENTENCE_TRANSFORMERS_CARD = """---
tags:
- sentence-transformers
- loss:MultipleNegativesRankingLoss
datasets:
- my/pairs
pipeline_tag: sentence-similarity
library_name: sentence-transformers
---

# SentenceTransformer

This is a [sentence-transformers](https://www.SBERT.net) model trained on the my/pairs dataset.

## Usage

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("sentence_transformers_model_id")
```
<!--
### Out-of-Scope Use
-->

<!--
## Bias, Risks and Limitations
-->

## Training Details

### Training Dataset

#### my/pairs

### Training Hyperparameters
- `learning_rate`: 0.0001

### Framework Versions
- Sentence Transformers: 6.2.0
"""


def test_card_extends_the_sentence_transformers_card(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "st_bitnet": {"norm": "none"}}))
    (tmp_path / "README.md").write_text(SENTENCE_TRANSFORMERS_CARD)
    for _ in range(2):  # a rewrite (e.g. with evaluation results) keeps sentence-transformers' part once
        readme = write_model_card(tmp_path, repo_id=REPO_ID)
    text = readme.read_text()
    front = __import__("yaml").safe_load(text.split("---\n")[1])
    assert front["datasets"] == ["my/pairs"] and "loss:MultipleNegativesRankingLoss" in front["tags"]
    assert "bitnet" in front["tags"]
    assert text.count(ST_CARD_MARKER) == 1 and text.count("#### Training Hyperparameters") == 1
    assert "trained with sentence-transformers' trainer" in " ".join(text.split())
    assert "No training was recorded" not in text
    kept = text.split(ST_CARD_MARKER, 1)[1]
    assert "sentence_transformers_model_id" not in kept  # its placeholder usage section is dropped
    assert kept.count("<!--") == kept.count("-->")  # the comment that opened the next section survived
    assert len(card_code_blocks(readme)) == 2  # only st_bitnet's snippets


def test_card_replaces_a_readme_copied_from_the_source_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "README.md").write_text("---\nlibrary_name: sentence-transformers\ndatasets:\n- s2orc\n---\n\n"
                                        "# all-MiniLM-L6-v2\nThis is a sentence-transformers model.\n")
    text = write_model_card(tmp_path).read_text()
    assert "s2orc" not in text and "all-MiniLM-L6-v2" not in text and ST_CARD_MARKER not in text


def test_trained_and_packed_recipe_output_card_records_the_training(tmp_path, tiny_model_dir, pairs_file):
    from st_bitnet.training import run_recipe

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tiny_cpu.yaml"
    overrides = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "training.max_steps=2",
                 "evaluation=[]", "teacher=null", "model.pack=true", f"datasets=[{{name: {pairs_file}, max_rows: 16}}]",
                 "loss={contrastive: {type: MultipleNegativesRankingLoss}}", "training.save_steps=100"]  # fmt: skip
    run_recipe(recipe, overrides)
    text = (tmp_path / "run" / "packed" / "README.md").read_text()
    assert "name: tiny-cpu" in text and "MultipleNegativesRankingLoss" in text  # the st_bitnet recipe
    assert "#### Training Hyperparameters" in text  # sentence-transformers' record of the run, kept
    assert "No training was recorded" not in text
