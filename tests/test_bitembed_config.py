"""BitEmbedConfig forwards backbone settings read-only and never takes part in transformers' RoPE rewriting."""

import json

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from st_bitnet import BitNetConversionConfig
from st_bitnet.configuration_bitembed import BitEmbedConfig
from st_bitnet.sentence_transformer import build_sentence_transformer, save_pretrained

from conftest import SENTENCES, tiny_config, tiny_tokenizer


def _gemma3_backbone() -> dict:
    return tiny_config("gemma3_text").to_dict()


def test_rope_settings_stay_in_the_backbone():
    backbone = _gemma3_backbone()
    config = BitEmbedConfig(backbone=backbone, st_bitnet={"norm": "subln"})
    # transformers standardizes RoPE on any config where hasattr(config, "rope_parameters"); some versions then
    # setdefault a top-level "rope_theta" into that dict, which, forwarded from the backbone, corrupted it.
    assert not hasattr(config, "rope_parameters") and not hasattr(config, "rope_theta")
    assert not any(key.startswith("rope") for key in config.to_dict())
    assert config.backbone["rope_parameters"] == backbone["rope_parameters"]
    assert config.backbone_config().rope_parameters == tiny_config("gemma3_text").rope_parameters


def test_forwarded_values_are_copies():
    config = BitEmbedConfig(backbone=_gemma3_backbone())
    config.layer_types.append("full_attention")  # what an in-place rewrite by a caller would do
    assert config.backbone["layer_types"] == ["sliding_attention", "full_attention"]
    assert config.hidden_size == 64


def test_top_level_rope_keys_of_older_folders_are_dropped():
    backbone = _gemma3_backbone()
    stale = {"full_attention": {"rope_theta": 1.0, "rope_type": "default"}}
    config = BitEmbedConfig(backbone=backbone, rope_parameters=stale, rope_theta=5.0)
    assert "rope_parameters" not in config.to_dict() and "rope_theta" not in config.to_dict()
    assert config.backbone_config().rope_parameters == tiny_config("gemma3_text").rope_parameters


def test_gemma3_subln_odd_width_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone_config = tiny_config("gemma3_text")
    backbone_config.intermediate_size = 98  # not divisible by 4: only the bitembed class stores it
    backbone_dir = tmp_path / "backbone"
    AutoModel.from_config(backbone_config).save_pretrained(backbone_dir)
    tiny_tokenizer("gemma3_text").save_pretrained(backbone_dir)
    raw = json.loads((backbone_dir / "config.json").read_text())
    model = build_sentence_transformer(str(backbone_dir), BitNetConversionConfig(norm="subln"))
    before = model.encode(SENTENCES)
    folder = save_pretrained(model, tmp_path / "saved")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "bitembed" and not any(key.startswith("rope") for key in saved)
    assert saved["backbone"]["rope_parameters"] == raw["rope_parameters"]
    reloaded = SentenceTransformer(str(folder))
    assert np.array_equal(reloaded.encode(SENTENCES), before)
