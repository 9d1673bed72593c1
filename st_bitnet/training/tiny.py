"""Tiny randomly initialised embedders for smoke tests and CPU-only recipe checks."""

from __future__ import annotations

import os
import tempfile


def tiny_bert_sentence_transformer(
    tokenizer_path: str | os.PathLike,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    save_to: str | os.PathLike | None = None,
):
    """A mean-pooled, normalised BERT SentenceTransformer with random weights and a real tokenizer.

    Args:
        tokenizer_path: a folder (or Hub id) holding a BERT-style tokenizer, e.g. all-MiniLM-L6-v2's.
        hidden_size / num_layers / num_heads: the backbone's size.
        seed: the weights' seed (same seed, same model).
        save_to: folder to save the SentenceTransformer in (a temporary one if None).
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="st_bitnet_tiny_bert_") as backbone_dir:
        BertModel(config).save_pretrained(backbone_dir)
        tokenizer.save_pretrained(backbone_dir)
        transformer = Transformer(backbone_dir, max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden_size, "mean"), Normalize()], device="cpu")
    if save_to is not None:
        model.save(str(save_to))
    return model
