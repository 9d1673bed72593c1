"""st_bitnet.introspection: the one place that finds the backbone, its layers, tokenizer and pooling in any wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import st_bitnet
from st_bitnet import introspection
from st_bitnet.sentence_transformer import build_sentence_transformer


@pytest.fixture(scope="module")
def bert_st(backbone_dirs):
    return build_sentence_transformer(str(backbone_dirs["bert"]), convert_model=False)


@pytest.fixture(scope="module")
def qwen3_st(backbone_dirs):
    return build_sentence_transformer(str(backbone_dirs["qwen3"]), convert_model=False)


def test_backbone_of_a_sentence_transformer_is_its_transformers_model(bert_st, qwen3_st):
    assert introspection.backbone(bert_st) is bert_st[0].model
    assert introspection.backbones(qwen3_st) == [qwen3_st[0].model]
    assert introspection.backbone(qwen3_st[0].model) is qwen3_st[0].model  # a transformers model is its own backbone
    assert introspection.transformer_modules(bert_st) == [bert_st[0]]


def test_backbone_refuses_models_without_one():
    with pytest.raises(ValueError, match="no transformers model"):
        introspection.backbone(nn.Sequential(nn.Linear(2, 2)))
    assert introspection.backbones(nn.Sequential(nn.Linear(2, 2))) == []


def test_transformer_layers_of_encoders_decoders_and_wrappers(backbone_dirs, bert_st, qwen3_st):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert introspection.transformer_layers(bert_st) is bert_st[0].model.encoder.layer
    assert introspection.transformer_layers(qwen3_st[0].model) is qwen3_st[0].model.layers
    causal = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(backbone_dirs["qwen3"]))
    assert introspection.inner_model(causal) is causal.model
    assert introspection.transformer_layers(causal) is causal.model.layers
    with pytest.raises(LookupError, match="layer list"):
        introspection.transformer_layers(nn.Sequential(nn.Linear(2, 2)))
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    assert introspection.transformer_layers(gpt2) is gpt2.h


def test_transformer_layers_prefers_the_shallowest_block_list():
    class Multimodal(nn.Module):  # a text stack next to a deeper vision tower, registered first
        def __init__(self):
            super().__init__()
            self.config = object()
            self.vision = nn.Module()
            self.vision.encoder = nn.Module()
            self.vision.encoder.layers = nn.ModuleList([nn.Linear(2, 2)] * 3)
            self.layers = nn.ModuleList([nn.Linear(2, 2)] * 2)
            self.empty = nn.ModuleList()

    model = Multimodal()
    assert introspection.transformer_layers(model) is model.layers


def test_bitembed_wrapper_is_looked_through(backbone_dirs):
    from st_bitnet.modeling_bitembed import BitEmbedModel

    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), st_bitnet.BitNetConversionConfig(norm="subln"))
    wrapper = introspection.backbone(model)
    assert isinstance(wrapper, BitEmbedModel)
    assert introspection.inner_model(wrapper) is wrapper.model
    assert introspection.transformer_layers(model) is wrapper.model.layers


def test_unwrap_compile_peft_and_ddp(tmp_path, bert_st):
    compiled = torch.compile(bert_st)  # wraps lazily: nothing is compiled until called
    assert introspection.unwrap(compiled) is bert_st
    assert introspection.backbone(compiled) is bert_st[0].model

    peft = pytest.importorskip("peft")
    base = introspection.backbone(bert_st)
    import copy

    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"]))
    inner = introspection.unwrap(lora)
    assert not isinstance(inner, peft.PeftModel) and type(inner) is type(base)
    assert len(introspection.transformer_layers(lora)) == len(base.encoder.layer)

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(bert_st)
        assert introspection.unwrap(ddp) is bert_st
        assert introspection.backbone(ddp) is bert_st[0].model
    finally:
        dist.destroy_process_group()


def test_block_names_tokenizer_and_pooling(bert_st, qwen3_st):
    assert introspection.in_transformer_block("encoder.layer.0.attention.self.query")
    assert introspection.in_transformer_block("layers.11.mlp.down_proj")
    assert not introspection.in_transformer_block("embeddings.word_embeddings")
    assert not introspection.in_transformer_block("pooler.dense")
    assert introspection.tokenizer(bert_st) is bert_st.tokenizer
    with pytest.raises(ValueError, match="no tokenizer"):
        introspection.tokenizer(nn.Linear(2, 2))
    assert introspection.pooling_mode(bert_st) == "mean"
    assert introspection.pooling_mode(qwen3_st) == "lasttoken"
    assert introspection.pooling_mode(nn.Linear(2, 2)) is None


def test_decoder_configs(backbone_dirs):
    from transformers import AutoConfig

    assert introspection.is_decoder_config(AutoConfig.from_pretrained(backbone_dirs["qwen3"]))
    assert introspection.is_decoder_config(AutoConfig.from_pretrained(backbone_dirs["gemma3_text"]))
    assert not introspection.is_decoder_config(AutoConfig.from_pretrained(backbone_dirs["bert"]))


def test_conversion_record_of_converted_and_plain_models(backbone_dirs, bert_st):
    assert introspection.conversion_record(bert_st) is None  # not converted
    converted = build_sentence_transformer(str(backbone_dirs["bert"]), st_bitnet.BitNetConversionConfig(norm="none"))
    record = introspection.conversion_record(converted)
    assert record["norm"] == "none" and record["converted_modules"] and not record.get("packed")
    st_bitnet.pack(converted)
    assert introspection.conversion_record(converted)["packed"] is True
