"""Tests for the bitnet.cpp export: I2_S packing layout and a full GGUF of a tiny converted Qwen3, read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from st_bitnet.export import (  # noqa: E402
    GGML_TYPE_I2_S,
    LLAMA_FTYPE_MOSTLY_I2_S,
    export_gguf,
    gguf_knows_i2_s,
    pack_i2_s,
    read_i2_s_tensor,
    unpack_i2_s,
)


def test_i2_s_layout_matches_bitnet_cpp_blocks():
    """Byte p of a 128-value block holds values p, 32+p, 64+p, 96+p in bits 7-6, 5-4, 3-2, 1-0; 0=-1, 1=0, 2=+1."""
    ternary = np.zeros((1, 128), dtype=np.int8)
    ternary[0, 0] = 1  # byte 0, bits 7-6 -> code 2
    ternary[0, 33] = -1  # byte 1, bits 5-4 -> code 0
    ternary[0, 127] = 1  # byte 31, bits 1-0 -> code 2
    packed = pack_i2_s(ternary, 0.5)
    assert packed.size == 128 // 4 + 32
    assert packed[0] == 0b10_01_01_01
    assert packed[1] == 0b01_00_01_01
    assert packed[31] == 0b01_01_01_10
    assert packed[2] == 0b01_01_01_01  # all zeros
    assert packed[32:36].view(np.float32)[0] == 0.5 and not packed[36:].any()


def test_i2_s_round_trip_random():
    rng = np.random.default_rng(0)
    ternary = rng.integers(-1, 2, size=(12, 256)).astype(np.int8)
    back, scale = unpack_i2_s(pack_i2_s(ternary, 0.0375), ternary.shape)
    np.testing.assert_array_equal(back, ternary)
    assert scale == np.float32(0.0375)


def test_i2_s_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple|% 128"):
        pack_i2_s(np.zeros((4, 64), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_i2_s(np.full((1, 128), 2, dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="scale"):
        pack_i2_s(np.zeros((1, 128), dtype=np.int8), 0.0)


def test_gguf_type_patch_is_scoped():
    with gguf_knows_i2_s() as member:
        assert int(member) == GGML_TYPE_I2_S
        assert gguf.GGMLQuantizationType(GGML_TYPE_I2_S) is member
    if not hasattr(gguf.GGMLQuantizationType, "I2_S"):
        with pytest.raises(ValueError):
            gguf.GGMLQuantizationType(GGML_TYPE_I2_S)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["BitNet embeddings are ternary.", "Paris is in France.", "hello world"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def packed_qwen3(tmp_path_factory):
    from transformers import AutoModel, Qwen3Config

    import st_bitnet
    from st_bitnet.sentence_transformer import build_sentence_transformer

    folder = tmp_path_factory.mktemp("qwen3")
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = build_sentence_transformer(str(folder), device="cpu")
    st_bitnet.pack(model)
    return model


def test_export_reads_back_with_gguf(packed_qwen3, tmp_path):
    from st_bitnet.bitlinear import BitLinear, unpack_ternary

    path = export_gguf(packed_qwen3, tmp_path / "tiny-i2_s.gguf")
    with gguf_knows_i2_s():
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}

        def field(key):
            return reader.fields[key].contents()

        assert field("general.architecture") == "qwen3"
        assert field("general.file_type") == LLAMA_FTYPE_MOSTLY_I2_S
        assert field("qwen3.block_count") == 2 and field("qwen3.embedding_length") == 128
        assert field("qwen3.attention.head_count_kv") == 2 and field("qwen3.attention.key_length") == 32
        assert field("qwen3.pooling_type") == int(gguf.PoolingType.LAST)
        assert field("tokenizer.ggml.add_eos_token") is True
        tokenizer = packed_qwen3.tokenizer
        assert field("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert field("tokenizer.ggml.tokens")[:2] == ["<|endoftext|>", "<|im_end|>"]

        backbone = packed_qwen3[0].auto_model
        expected = {"token_embd.weight", "output_norm.weight"}
        for i in range(2):
            expected |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm")}
            for proj in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                expected |= {f"blk.{i}.{proj}.weight", f"blk.{i}.{proj}_norm_in.weight"}
        assert set(tensors) == expected
        assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        assert tensors["blk.0.attn_q_norm_in.weight"].tensor_type == gguf.GGMLQuantizationType.F32

        pairs = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_output": "self_attn.o_proj",
                 "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj"}
        for i, layer in enumerate(backbone.layers):
            for proj, hf_name in pairs.items():
                linear = layer.get_submodule(hf_name)
                assert isinstance(linear, BitLinear) and linear.is_packed
                tensor = tensors[f"blk.{i}.{proj}.weight"]
                assert int(tensor.tensor_type) == GGML_TYPE_I2_S
                assert [int(d) for d in tensor.shape] == [linear.in_features, linear.out_features]
                ternary, scale = read_i2_s_tensor(reader, tensor)
                np.testing.assert_array_equal(ternary, unpack_ternary(linear.weight, linear.out_features).numpy())
                assert scale == pytest.approx(1.0 / float(linear.weight_scale), rel=1e-6)
                np.testing.assert_array_equal(
                    np.asarray(tensors[f"blk.{i}.{proj}_norm_in.weight"].data), linear.rms_norm.weight.detach().numpy()
                )
        np.testing.assert_allclose(
            np.asarray(tensors["token_embd.weight"].data, dtype=np.float32),
            backbone.embed_tokens.weight.detach().numpy(), atol=1e-3,
        )


def test_export_refuses_unpacked_or_unsupported(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="no decoder stack|supports"):
        export_gguf(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=50)), tmp_path / "x.gguf")


def test_cli_exports_a_saved_folder(packed_qwen3, tmp_path):
    """`st-bitnet export-gguf FOLDER OUT.gguf` on a folder saved by st_bitnet gives the same I2_S weights."""
    from st_bitnet.evaluation.cli import main
    from st_bitnet.sentence_transformer import save_pretrained

    folder = save_pretrained(packed_qwen3, tmp_path / "saved", model_card=False)
    out = tmp_path / "from-folder.gguf"
    assert main(["export-gguf", str(folder), str(out), "--name", "tiny"]) == 0
    direct = export_gguf(packed_qwen3, tmp_path / "direct.gguf", name="tiny")
    with gguf_knows_i2_s():
        a, b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(direct))
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        assert set(ta) == set(tb)
        for name in ("blk.1.ffn_down.weight", "blk.0.attn_v.weight"):
            np.testing.assert_array_equal(read_i2_s_tensor(a, ta[name])[0], read_i2_s_tensor(b, tb[name])[0])
        assert a.fields["general.name"].contents() == "tiny"
