"""Export a packed st_bitnet embedder to an I2_S GGUF that bitnet.cpp's ``llama-embedding`` reads.

Conventions follow Microsoft's bitnet-embedding converter (``utils/convert-bitnet-embedding-to-gguf.py`` in
microsoft/BitNet), for the ``qwen3`` architecture:

- tensors: ``token_embd.weight`` (F16), ``output_norm.weight``, per block ``blk.{i}.attn_norm`` / ``ffn_norm`` /
  ``attn_q_norm`` / ``attn_k_norm`` (F32), the seven projections ``attn_q/k/v/output``, ``ffn_gate/up/down`` (I2_S),
  and their per-projection input RMSNorms ``blk.{i}.<projection>_norm_in.weight`` (F32; the BitNet-specific part);
- metadata: the usual ``qwen3.*`` hyper-parameters, ``qwen3.pooling_type`` from the sentence-transformers Pooling
  module, ``qwen3.attention.causal = false`` for bidirectional models, ``general.file_type = 40`` (MOSTLY_I2_S);
- tokenizer: BPE (``gpt2`` model, ``qwen2`` pre-tokenizer), with EOS set to ``<|endoftext|>`` and
  ``tokenizer.ggml.add_eos_token = true`` so last-token pooling reads the same position as sentence-transformers.

Norms are written in F32 (ggml's norm ops expect F32 weights; Microsoft's script writes F16).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import introspection
from .i2s import LLAMA_FTYPE_MOSTLY_I2_S, gguf_knows_i2_s, pack_i2_s

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"qwen3": "qwen3"}
PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LAYER_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
POOLING_NAMES = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST", "last": "LAST"}


def _load(model: Any):
    if isinstance(model, (str, os.PathLike)):
        from st_bitnet.sentence_transformer import load

        return load(str(model), device="cpu")
    return model


def _decoder_stack(model: Any):
    """The transformers decoder stack (the module holding ``embed_tokens`` and ``layers``)."""
    try:
        stack = introspection.inner_model(introspection.backbone(model))
    except ValueError as err:
        raise ValueError(f"export_gguf needs a SentenceTransformer with one transformers backbone: {err}") from None
    if not (hasattr(stack, "embed_tokens") and hasattr(stack, "layers")):
        raise ValueError(f"export_gguf found no decoder stack (embed_tokens and layers) in {type(stack).__name__}")
    return stack


def _rope_theta(config) -> float | None:
    theta = getattr(config, "rope_theta", None)
    parameters = getattr(config, "rope_parameters", None)
    if theta is None and isinstance(parameters, dict):
        theta = parameters.get("rope_theta")
    return float(theta) if theta is not None else None


def _write_hparams(writer, config, arch: str, record: dict, pooling: str | None, name: str) -> None:
    import gguf

    head_count = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // head_count
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(getattr(config, "max_position_embeddings", 32768))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or head_count)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    theta = _rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(getattr(config, "rms_norm_eps", 1e-6)))
    writer.add_file_type(LLAMA_FTYPE_MOSTLY_I2_S)
    if pooling is not None:
        if pooling not in POOLING_NAMES:
            raise ValueError(f"pooling mode {pooling!r} has no GGUF equivalent (supported: {sorted(POOLING_NAMES)})")
        writer.add_pooling_type(getattr(gguf.PoolingType, POOLING_NAMES[pooling]))
    if record.get("bidirectional"):
        writer.add_causal_attention(False)
    # st_bitnet provenance (ignored by llama.cpp)
    writer.add_string("st_bitnet.norm", str(record.get("norm", "")))
    writer.add_float32("st_bitnet.projection_rms_norm_eps", float(record.get("rms_norm_eps") or 0.0))


def _write_vocab(writer, tokenizer, config, arch: str, last_token_pooling: bool) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens, token_types = [], []
    for index in range(config.vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            token_types.append(gguf.TokenType.CONTROL if index in special_ids or token.startswith("<|")
                               else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            token_types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=config.vocab_size)
        # sentence-transformers appends <|endoftext|> (not <|im_end|>) on Qwen3 embedders: llama.cpp must append the
        # same token for last-token pooling to read the same position.
        endoftext = vocab.get("<|endoftext|>")
        if endoftext is not None:
            special.special_token_ids["eos"] = endoftext
        special.add_to_gguf(writer)
    if last_token_pooling:
        writer.add_add_eos_token(True)


def _projection_tensors(backbone, record: dict):
    """Yield (gguf name, array, kind) for every tensor of the decoder stack."""
    from st_bitnet.bitlinear import BitLinear, unpack_ternary

    yield "token_embd.weight", backbone.embed_tokens.weight.detach().float().numpy().astype(np.float16), "f16"
    yield "output_norm.weight", backbone.norm.weight.detach().float().numpy(), "f32"
    for index, layer in enumerate(backbone.layers):
        block = f"blk.{index}"
        for hf_name, gguf_name in LAYER_NORMS.items():
            try:
                norm = layer.get_submodule(hf_name)
            except AttributeError:
                continue
            yield f"{block}.{gguf_name}.weight", norm.weight.detach().float().numpy(), "f32"
        for hf_name, gguf_name in PROJECTIONS.items():
            linear = layer.get_submodule(hf_name)
            if not isinstance(linear, BitLinear):
                raise ValueError(f"layers.{index}.{hf_name} is {type(linear).__name__}, not a BitLinear: convert the model first")
            if not linear.is_packed:
                raise ValueError(f"layers.{index}.{hf_name} is not packed: call st_bitnet.pack(model) (or save it) first")
            if linear.rms_norm is None:
                raise ValueError(
                    f"layers.{index}.{hf_name} has no per-projection RMSNorm; bitnet.cpp's qwen3 embedding graph reads "
                    "one per projection (convert with BitNetConversionConfig(norm='per_projection'))"
                )
            ternary = unpack_ternary(linear.weight, linear.out_features).numpy()
            scale = float(1.0 / linear.weight_scale.detach().float().reshape(-1)[0])
            yield f"{block}.{gguf_name}.weight", (ternary, scale), "i2_s"
            yield f"{block}.{gguf_name}_norm_in.weight", linear.rms_norm.weight.detach().float().numpy(), "f32"
            if getattr(linear, "bias", None) is not None:
                logger.warning("%s.%s has a bias; written as %s.bias (qwen3 graphs may ignore it)", block, hf_name, gguf_name)
                yield f"{block}.{gguf_name}.bias", linear.bias.detach().float().numpy(), "f32"


def export_gguf(model: Any, output: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write a packed st_bitnet embedder as an I2_S GGUF for bitnet.cpp (``llama-embedding -m OUT.gguf``).

    Args:
        model: a SentenceTransformer with packed BitLinear projections (``st_bitnet.pack``), or a folder / Hub id
            saved by st_bitnet.
        output: the ``.gguf`` path to write.
        name: ``general.name`` (default: the output file's stem).

    Returns:
        The written path.

    Raises:
        ValueError: for an unsupported architecture, unpacked / unconverted projections, missing per-projection
            norms, or ``in_features`` not a multiple of 128 (I2_S blocks).

    Example::

        import st_bitnet
        from st_bitnet.export import export_gguf

        model = st_bitnet.load("my-bitembed")
        export_gguf(model, "my-bitembed-i2_s.gguf")
        # bitnet.cpp:  ./build/bin/llama-embedding -m my-bitembed-i2_s.gguf -p "hello" --pooling last
    """
    import gguf

    model = _load(model)
    backbone = _decoder_stack(model)
    config = backbone.config
    arch = SUPPORTED_ARCHITECTURES.get(getattr(config, "model_type", ""))
    if arch is None:
        raise ValueError(
            f"export_gguf supports {sorted(SUPPORTED_ARCHITECTURES)} backbones (bitnet.cpp's embedding graphs); "
            f"got model_type={getattr(config, 'model_type', None)!r}"
        )
    record = introspection.conversion_record(model) or {}
    if record and record.get("norm") not in (None, "per_projection"):
        raise ValueError(f"export_gguf needs per-projection norms; this model was converted with norm={record.get('norm')!r}")
    pooling = introspection.pooling_mode(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with gguf_knows_i2_s() as i2_s_type, torch.no_grad():
        writer = gguf.GGUFWriter(str(output), arch)
        _write_hparams(writer, config, arch, record, pooling, name or output.stem)
        _write_vocab(writer, introspection.tokenizer(model), config, arch, last_token_pooling=pooling in ("lasttoken", "last"))
        for tensor_name, value, kind in _projection_tensors(backbone, record):
            if kind == "i2_s":
                ternary, scale = value
                packed = pack_i2_s(ternary, scale)
                # An int8 view keeps gguf from re-deriving the shape from bytes (it knows no I2_S block maths);
                # raw_shape is the logical (out, in) shape, written innermost-first as ggml expects.
                writer.add_tensor(tensor_name, packed.view(np.int8), raw_shape=ternary.shape, raw_dtype=i2_s_type)
            elif kind == "f16":
                writer.add_tensor(tensor_name, np.ascontiguousarray(value, dtype=np.float16))
            else:
                writer.add_tensor(tensor_name, np.ascontiguousarray(value, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output
