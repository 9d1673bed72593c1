"""Microsoft's bitnet-embedding layout: plain qwen3 / gemma3_text config, bf16 latent weights, `<proj>.norm.weight`."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from st_bitnet import BitLinear
from st_bitnet.bitlinear import BitRMSNorm, quantize_weight_ternary, ternary_linear_reference
from st_bitnet.microsoft import is_microsoft_format, load_microsoft_model
from st_bitnet.sentence_transformer import load

from conftest import SENTENCES, tiny_config, tiny_tokenizer


def write_microsoft_checkpoint(folder, arch, seed=0):
    """A checkpoint in exactly Microsoft's layout: `model.`-prefixed bf16 latent weights plus per-projection norms."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(arch)).to(torch.bfloat16)
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    norms = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith("_proj"):
            norms[f"model.{name}.norm.weight"] = (torch.rand(module.in_features) + 0.5).to(torch.bfloat16)
    state.update(norms)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    tiny_tokenizer(arch).save_pretrained(folder)
    return model, norms


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_microsoft_checkpoint_loads_as_w158a8(tmp_path, arch):
    latent, norms = write_microsoft_checkpoint(tmp_path / "ms", arch)
    assert is_microsoft_format(tmp_path / "ms")
    model = load_microsoft_model(tmp_path / "ms")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(layers) == len(norms) and all(m.is_packed and m.rms_norm is not None for m in layers.values())

    # Independent check of one projection: RMSNorm(norm.weight) -> int8 -> ternary(absmean of the bf16 weight)
    name = "layers.0.self_attn.q_proj"
    layer = layers[name]
    x = torch.randn(3, layer.in_features)
    norm = BitRMSNorm(layer.in_features, eps=latent.config.rms_norm_eps)
    norm.weight.data = norms[f"model.{name}.norm.weight"].float()
    w = latent.get_submodule(name).weight.float()
    w_q, scale = quantize_weight_ternary(w)
    with torch.no_grad():
        assert torch.equal(layer(x), ternary_linear_reference(norm(x), w_q, scale))
    # Embeddings and block norms come through unchanged
    assert torch.equal(model.get_input_embeddings().weight, latent.get_input_embeddings().weight.float())


def test_microsoft_checkpoint_as_sentence_transformer(tmp_path):
    write_microsoft_checkpoint(tmp_path / "ms", "qwen3")
    st_model = load(str(tmp_path / "ms"))
    emb = st_model.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)  # last-token pooling + L2
    assert st_model[1].pooling_mode == "lasttoken"


def test_not_microsoft_format_and_mismatched_checkpoint(tmp_path):
    model = AutoModel.from_config(tiny_config("qwen3"))
    model.save_pretrained(tmp_path / "plain")
    assert not is_microsoft_format(tmp_path / "plain")
    with pytest.raises(ValueError, match="not Microsoft"):
        load_microsoft_model(tmp_path / "plain")
    _, _ = write_microsoft_checkpoint(tmp_path / "ms", "qwen3")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ms" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "ms" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj.weight"):
        load_microsoft_model(tmp_path / "ms")
