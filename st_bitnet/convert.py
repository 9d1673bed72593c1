"""Conversion of a transformers backbone (or a SentenceTransformer) into a BitNet encoder."""

from __future__ import annotations

import os
from typing import Callable

import torch.nn as nn

from .bitlinear import BitLinear, projection_gets_norm
from .config import BitNetConversionConfig
from .hf_integration import stock_quantization_config
from .introspection import in_transformer_block, is_sentence_transformer, transformer_modules

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Convert every ``nn.Linear`` inside a numbered transformer block (embeddings, heads and poolers stay full
    precision)."""
    return isinstance(module, nn.Linear) and not isinstance(module, BitLinear) and in_transformer_block(name)


def _backbone_eps(config) -> float:
    for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"):
        value = getattr(config, key, None)
        if isinstance(value, float) and value > 0:
            return value
    return 1e-6


def _load(path: str, **kwargs):
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "modules.json")):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, **kwargs)
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, **kwargs)


def convert(
    model_or_path,
    config: BitNetConversionConfig | None = None,
    filter_fn: FilterFn | None = None,
    **load_kwargs,
):
    """Swap the linear projections of a backbone for latent (trainable) :class:`BitLinear` layers.

    Args:
        model_or_path: a transformers ``PreTrainedModel``, a ``SentenceTransformer``, or a path / Hub id
            (a folder with ``modules.json`` loads as a SentenceTransformer, anything else through
            ``AutoModel``; ``load_kwargs`` go to that call).
        config: the conversion settings; defaults to :class:`BitNetConversionConfig()`.
        filter_fn: ``(module, qualified_name) -> bool`` choosing the layers to convert; defaults to every
            ``nn.Linear`` inside a numbered transformer block (q/k/v/o, gate/up/down, BERT's
            query/key/value/dense...).

    Returns:
        The same object, converted in place. A transformers model whose settings stock transformers cannot
        express (SubLN norms, bidirectional attention for a causal architecture) comes back wrapped in
        :class:`st_bitnet.modeling_bitembed.BitEmbedModel`; inside a SentenceTransformer the wrapper
        replaces the module's model.

    Example::

        from sentence_transformers import SentenceTransformer
        import st_bitnet
        st_model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
        st_bitnet.convert(st_model)          # QAT-ready; train it, then st_bitnet.pack(st_model)
    """
    config = config or BitNetConversionConfig()
    if not isinstance(config, BitNetConversionConfig):
        raise TypeError(f"config must be a BitNetConversionConfig, got {type(config).__name__}")
    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = _load(str(model_or_path), **load_kwargs)
    elif load_kwargs:
        raise TypeError(f"load arguments {sorted(load_kwargs)} only apply when converting from a path")

    if is_sentence_transformer(model_or_path):
        modules = transformer_modules(model_or_path)
        if not modules:
            raise ValueError("this SentenceTransformer has no transformers-based module to convert")
        for module in modules:
            module.model = convert_transformers_model(module.model, config, filter_fn)
        return model_or_path
    if isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        return convert_transformers_model(model_or_path, config, filter_fn)
    raise TypeError(
        f"convert() takes a transformers model, a SentenceTransformer or a path, got {type(model_or_path).__name__}"
    )


def convert_transformers_model(model: nn.Module, config: BitNetConversionConfig, filter_fn: FilterFn | None = None):
    from .modeling_bitembed import BitEmbedModel, needs_own_class, set_attention_direction

    if isinstance(model, BitEmbedModel) or getattr(model.config, "st_bitnet", None):
        raise ValueError("this model is already converted to BitNet")
    filter_fn = filter_fn or default_filter
    eps = config.rms_norm_eps or _backbone_eps(model.config)
    converted: list[str] = []
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, BitLinear):
            continue
        skip = any(name == s or name.endswith("." + s) for s in config.modules_to_not_convert)
        if skip or not filter_fn(module, name):
            kept.append(name)
            continue
        model.set_submodule(name, BitLinear.from_linear(module, use_rms_norm=projection_gets_norm(name, config.norm), rms_norm_eps=eps))
        converted.append(name)
    if not converted:
        raise ValueError(
            f"no linear layer of this {type(model).__name__} matched the conversion filter; "
            "pass filter_fn to choose the layers to convert"
        )
    record = config.to_dict()
    record.update(rms_norm_eps=eps, converted_modules=converted, unconverted_linears=kept)
    model.config.st_bitnet = record
    set_attention_direction(model, config.bidirectional)
    if needs_own_class(model):
        return BitEmbedModel.wrap(model)
    model.config.quantization_config = stock_quantization_config(model)
    return model


def pack(model: nn.Module) -> nn.Module:
    """Quantize every latent BitLinear of ``model`` and switch it to the packed (inference) state, in place.

    Embeddings are unchanged: a float32 model encodes exactly as before (the integer products are exact).
    """
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError("pack() found no BitLinear layer: convert the model first")
    for layer in layers:
        layer.pack_()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and isinstance(getattr(cfg, "st_bitnet", None), dict):
            cfg.st_bitnet["packed"] = True
            if getattr(cfg, "quantization_config", None) is not None:
                cfg.quantization_config = stock_quantization_config(module)
    return model
