"""Where things are inside a model: the transformers backbone, its transformer blocks, its tokenizer, its pooling.

Every part of st_bitnet that needs to find the backbone of a SentenceTransformer (or of a transformers model,
possibly wrapped by DDP, FSDP, ``torch.compile`` or peft) asks here, so that a new wrapper or architecture is
taught in one place.

* :func:`unwrap` - the model under DDP / FSDP (``.module``), ``torch.compile`` (``._orig_mod``) and peft wrappers.
* :func:`transformer_modules` / :func:`backbones` / :func:`backbone` - the sentence-transformers modules holding a
  transformers model, and those models.
* :func:`inner_model` - the innermost transformers model (through task heads and st_bitnet's ``bitembed`` wrapper).
* :func:`transformer_layers` - the ``nn.ModuleList`` of transformer blocks; :func:`in_transformer_block` - whether
  a qualified module name lies inside one (both from :data:`BLOCK_CONTAINERS`).
* :func:`tokenizer`, :func:`pooling_mode`, :func:`is_decoder_config`.

Example::

    from st_bitnet import introspection
    backbone = introspection.backbone(st_model)           # e.g. a Qwen3Model
    layers = introspection.transformer_layers(backbone)   # its decoder layers
"""

from __future__ import annotations

import re

import torch.nn as nn

# The attribute names architectures keep their numbered transformer blocks under: Llama/Qwen/Gemma ``layers.N``,
# BERT ``layer.N``, GPT-2 style ``h.N``, generic ``blocks.N``.
BLOCK_CONTAINERS = ("layers", "layer", "h", "blocks")
BLOCK_NAME_RE = re.compile(r"(^|\.)(" + "|".join(BLOCK_CONTAINERS) + r")\.\d+\.")
# Config model types of decoder-only backbones (pooled at the last token), for configs that do not say it otherwise.
DECODER_MODEL_TYPES = ("qwen3", "qwen2", "llama", "gemma3_text", "gemma2", "gemma", "mistral", "phi3")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP (``.module``), ``torch.compile`` (``._orig_mod``) and peft (``get_base_model()``)
    wrappers, however deeply nested; ``model`` itself when it is not wrapped."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
            inner = inner if inner is not model else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_sentence_transformer(obj) -> bool:
    """Whether ``obj`` (unwrapped) is a ``SentenceTransformer``."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - sentence-transformers is a dependency
        return False
    return isinstance(unwrap(obj), SentenceTransformer) if isinstance(obj, nn.Module) else False


def _is_transformers_model(module) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "config")


def transformer_modules(st_model: nn.Module) -> list[nn.Module]:
    """The sentence-transformers modules (``Transformer`` and alike) that hold a transformers model as ``.model``.

    A module qualifies when its ``.model`` is a module with a ``config`` and it has a ``processor`` (the
    tokenizer or processor sentence-transformers 6 gives every text module).
    """
    return [
        module
        for module in unwrap(st_model).modules()
        if _is_transformers_model(getattr(module, "model", None)) and hasattr(module, "processor")
    ]


def backbones(model: nn.Module) -> list[nn.Module]:
    """The transformers models of ``model``: those held by a SentenceTransformer's modules, or ``model`` itself when it
    is a transformers model. Wrappers (DDP, ``torch.compile``, peft) around ``model`` are looked through."""
    model = unwrap(model)
    found = [module.model for module in transformer_modules(model)]
    if not found and _is_transformers_model(model):
        return [model]
    return found


def backbone(model: nn.Module) -> nn.Module:
    """The one transformers model of ``model`` (see :func:`backbones`).

    Raises:
        ValueError: When ``model`` holds none, or several.
    """
    found = backbones(model)
    if len(found) != 1:
        what = "no transformers model" if not found else f"{len(found)} transformers models"
        raise ValueError(f"expected one transformers backbone in this {type(unwrap(model)).__name__}, found {what}")
    return found[0]


def inner_model(model: nn.Module) -> nn.Module:
    """The innermost transformers model: through task heads (``base_model``) and st_bitnet's ``bitembed`` wrapper
    (``.model``), e.g. ``Qwen3ForCausalLM`` or ``BitEmbedModel`` -> ``Qwen3Model``."""
    model = unwrap(model)
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        base = getattr(model, "base_model", model)
        if base is model:
            inner = getattr(model, "model", None)
            base = inner if _is_transformers_model(inner) else model
        model = unwrap(base)
    return model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of a backbone (or of the one backbone of a SentenceTransformer).

    It is the shallowest non-empty ``ModuleList`` held under one of :data:`BLOCK_CONTAINERS` (``layers``, ``layer``,
    ``h``, ``blocks``): ``layers`` of Llama / Qwen / Gemma, ``encoder.layer`` of BERT, ``transformer.h`` of GPT-2,
    ``model.layers`` of a causal-LM head or st_bitnet's ``bitembed`` wrapper.

    Raises:
        LookupError: When the model holds no such list.
    """
    found = backbones(model)
    root = found[0] if len(found) == 1 else unwrap(model)
    candidates = [
        (name.count("."), module)
        for name, module in root.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS
    ]
    if not candidates:
        raise LookupError(
            f"cannot find the transformer layer list of {type(root).__name__} (a ModuleList named one of "
            f"{', '.join(BLOCK_CONTAINERS)})"
        )
    return min(candidates, key=lambda candidate: candidate[0])[1]


def in_transformer_block(name: str) -> bool:
    """Whether the qualified module name ``name`` lies inside a numbered transformer block (``layers.3.mlp.up_proj``)."""
    return bool(BLOCK_NAME_RE.search(name))


def tokenizer(model: nn.Module):
    """The tokenizer of a SentenceTransformer: its own ``tokenizer``, else the first module's tokenizer or processor
    that has a vocabulary.

    Raises:
        ValueError: When the model has none.
    """
    model = unwrap(model)
    candidates = [getattr(model, "tokenizer", None)]
    for module in model.modules():
        candidates += [getattr(module, "tokenizer", None), getattr(module, "processor", None)]
    for candidate in candidates:
        if candidate is not None and hasattr(candidate, "get_vocab"):
            return candidate
    raise ValueError(f"found no tokenizer in this {type(model).__name__}")


def conversion_record(model: nn.Module) -> dict | None:
    """The BitNet conversion record (``config.st_bitnet``: settings, converted modules, packed flag) of the first
    converted backbone of ``model``, or None for an unconverted model."""
    for found in backbones(model):
        record = getattr(getattr(found, "config", None), "st_bitnet", None)
        if isinstance(record, dict):
            return record
    return None


def pooling_mode(model: nn.Module) -> str | None:
    """The pooling mode of a SentenceTransformer's ``Pooling`` module (``"mean"``, ``"lasttoken"``...), or None."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    for module in unwrap(model).modules():
        if isinstance(module, Pooling):
            mode = getattr(module, "pooling_mode", None)
            if isinstance(mode, str):
                return mode
            get = getattr(module, "get_pooling_mode_str", None)
            return get() if callable(get) else None
    return None


def is_decoder_config(config) -> bool:
    """Decoder-style backbones (Qwen, Llama, Gemma...) pool the last token; encoders (BERT...) pool the mean."""
    if getattr(config, "is_decoder", False):
        return True
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs:
        return True
    return (
        hasattr(config, "rope_theta")
        or hasattr(config, "rope_parameters")
        or getattr(config, "model_type", "") in DECODER_MODEL_TYPES
    )
