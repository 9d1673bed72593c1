"""LoRA (peft) on latent BitLinear layers trains; packed layers refuse adapters and training with clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, inject_adapter_in_model  # noqa: E402

from st_bitnet import BitLinear, BitNetConversionConfig  # noqa: E402
from st_bitnet.lora import bitlinear_lora  # noqa: E402
from st_bitnet.ops import set_kernel_mode  # noqa: E402
from st_bitnet.sentence_transformer import build_sentence_transformer  # noqa: E402

from conftest import SENTENCES  # noqa: E402


def _encode(model):
    with torch.no_grad():
        return model.encode(SENTENCES, convert_to_tensor=True)


def test_plain_peft_rejects_bitlinear_and_the_registered_config_wraps_it(backbone_dirs):
    model = build_sentence_transformer(str(backbone_dirs["bert"]), BitNetConversionConfig())
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(model[0].model, LoraConfig(r=4, target_modules=["query"]))
    wrapped = get_peft_model(model[0].model, bitlinear_lora(LoraConfig(r=4, target_modules=["query"])))
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * 4 * 64 * 2  # A and B on both layers' query


def test_lora_on_latent_bitlinear_trains_only_the_adapters(backbone_dirs):
    torch.manual_seed(0)
    model = build_sentence_transformer(str(backbone_dirs["bert"]), BitNetConversionConfig())
    before = _encode(model)
    config = bitlinear_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=True))
    inject_adapter_in_model(config, model[0].model)
    torch.testing.assert_close(_encode(model), before)  # B starts at zero: same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    features = model.tokenize(SENTENCES)
    target = torch.eye(len(SENTENCES))
    for _ in range(3):
        emb = model(dict(features))["sentence_embedding"]
        loss = torch.nn.functional.mse_loss(emb @ emb.T, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _encode(model)
    assert (after - before).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    layer = model[0].model.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match="re-quantized"):
        layer.merge()


def test_packed_models_refuse_adapters_and_training(backbone_dirs):
    import st_bitnet

    model = build_sentence_transformer(str(backbone_dirs["bert"]), BitNetConversionConfig())
    st_bitnet.pack(model)
    with pytest.raises(ValueError, match="latent BitLinear"):
        inject_adapter_in_model(bitlinear_lora(LoraConfig(r=4, target_modules=["query"])), model[0].model)
    for mode in (None, "reference"):  # the C kernel path and the pure-PyTorch reference path alike
        set_kernel_mode(mode)
        try:
            for p in model.parameters():
                p.requires_grad_(True)  # someone tries to fine-tune the packed model
            emb = model(dict(model.tokenize(SENTENCES)))["sentence_embedding"]
            with pytest.raises(RuntimeError, match="packed BitLinear is inference-only"):
                emb.sum().backward()
        finally:
            set_kernel_mode(None)
    assert any(isinstance(m, BitLinear) and m.is_packed for m in model.modules())
    with torch.no_grad():
        assert model.encode(SENTENCES).shape == (len(SENTENCES), 64)  # inference unaffected
