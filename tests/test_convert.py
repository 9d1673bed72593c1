import pytest
import torch
from transformers import AutoModel

import st_bitnet
from st_bitnet import BitLinear, BitNetConversionConfig
from st_bitnet.modeling_bitembed import BitEmbedModel

from conftest import tiny_config

ARCHS = ["qwen3", "qwen2", "llama", "gemma3_text", "bert"]


def _inputs(vocab=30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_swaps_block_linears_and_keeps_shapes(arch):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(arch))
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model = st_bitnet.convert(model)
    converted = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert converted and all(linears[n] == shape for n, shape in converted.items())
    kept = set(linears) - set(converted)
    assert all(".layer" not in f".{n}" for n in kept), kept  # only heads/poolers stay full precision
    assert all(m.rms_norm is not None for m in model.modules() if isinstance(m, BitLinear))
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # really quantized


@pytest.mark.parametrize("arch", ["qwen3", "bert"])
def test_subln_places_norms_only_before_output_projections(arch):
    model = st_bitnet.convert(AutoModel.from_config(tiny_config(arch)), BitNetConversionConfig(norm="subln"))
    assert isinstance(model, BitEmbedModel)  # stock transformers cannot express SubLN
    with_norm = sorted(n for n, m in model.named_modules() if isinstance(m, BitLinear) and m.rms_norm is not None)
    without = [n for n, m in model.named_modules() if isinstance(m, BitLinear) and m.rms_norm is None]
    assert with_norm and without
    if arch == "qwen3":
        assert all(n.endswith(("o_proj", "down_proj")) for n in with_norm)
    else:
        assert all(n.endswith("output.dense") for n in with_norm)


def test_bidirectional_decoder_sees_future_tokens():
    ids, mask = _inputs()
    for bidirectional, expect_change in ((None, False), (True, True)):
        torch.manual_seed(0)
        model = st_bitnet.convert(AutoModel.from_config(tiny_config("qwen3")), BitNetConversionConfig(bidirectional=bidirectional))
        changed = ids.clone()
        changed[0, 5] = (changed[0, 5] + 1) % 30
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]
            b = model(input_ids=changed, attention_mask=mask).last_hidden_state[0, 0]
        assert (not torch.equal(a, b)) == expect_change


def test_gemma3_bidirectional_uses_its_config_switch():
    model = st_bitnet.convert(AutoModel.from_config(tiny_config("gemma3_text")), BitNetConversionConfig(bidirectional=True))
    assert not isinstance(model, BitEmbedModel) and model.config.use_bidirectional_attention


def test_filter_fn_and_modules_to_not_convert():
    model = AutoModel.from_config(tiny_config("qwen3"))
    model = st_bitnet.convert(
        model,
        BitNetConversionConfig(modules_to_not_convert=["layers.0.mlp.down_proj"]),
        filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "mlp" in name,
    )
    names = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert names == {f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")} - {"layers.0.mlp.down_proj"}
    assert "layers.0.mlp.down_proj" in model.config.quantization_config["modules_to_not_convert"]


def test_pack_keeps_outputs_exactly():
    torch.manual_seed(0)
    model = st_bitnet.convert(AutoModel.from_config(tiny_config("qwen3")))
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    st_bitnet.pack(model)
    assert all(m.is_packed for m in model.modules() if isinstance(m, BitLinear))
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(before, after)


def test_bad_inputs():
    with pytest.raises(ValueError, match="norm must be one of"):
        BitNetConversionConfig(norm="layer")
    with pytest.raises(ValueError, match="newer"):
        BitNetConversionConfig(version=99)
    with pytest.raises(TypeError, match="transformers model"):
        st_bitnet.convert(torch.nn.Linear(3, 3))
    model = st_bitnet.convert(AutoModel.from_config(tiny_config("qwen3")))
    with pytest.raises(ValueError, match="already converted"):
        st_bitnet.convert(model)
    with pytest.raises(ValueError, match="no linear layer"):
        st_bitnet.convert(AutoModel.from_config(tiny_config("llama")), filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="no BitLinear"):
        st_bitnet.pack(AutoModel.from_config(tiny_config("llama")))
    with pytest.raises(ValueError, match="unknown BitNetConversionConfig keys"):
        BitNetConversionConfig.from_dict({"nrom": "subln"})
