"""transformers integration: the ``bitembed`` auto classes and st_bitnet's handling of ``bitnet`` checkpoints.

Stock transformers reads BitNet checkpoints through its ``bitnet`` quantization method
(``quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode":
"offline", "use_rms_norm": true}``). st_bitnet writes that format whenever it can express a converted model,
so users without st_bitnet load it with stock libraries. Once st_bitnet is imported, the same checkpoints
load into st_bitnet's :class:`~st_bitnet.bitlinear.BitLinear` instead (same state-dict names, same numbers,
st_bitnet's kernels). Set ``ST_BITNET_TRANSFORMERS_HOOK=0`` before importing st_bitnet to keep stock layers.
Registration also installs :mod:`st_bitnet.load_guard` (Microsoft's format through stock calls, corrupt folders
raise).
"""

from __future__ import annotations

import os

import torch.nn as nn

from .configuration_bitembed import BitEmbedConfig
from .modeling_bitembed import BitEmbedModel

_REGISTERED = False


def stock_quantization_config(model: nn.Module) -> dict:
    """transformers' ``bitnet`` quantization_config describing a converted (stock-expressible) model."""
    record = model.config.st_bitnet
    packed = bool(record.get("packed"))
    return {
        "quant_method": "bitnet",
        # packed ternary weights -> transformers' BitLinear; latent float weights -> AutoBitLinear online QAT
        "linear_class": "bitlinear" if packed else "autobitlinear",
        "quantization_mode": "offline" if packed else "online",
        "use_rms_norm": record.get("norm") == "per_projection",
        "rms_norm_eps": record.get("rms_norm_eps", 1e-6),
        "modules_to_not_convert": list(record.get("unconverted_linears", [])),
    }


def register() -> None:
    """Register ``bitembed`` with the Auto classes and route ``bitnet`` checkpoints to st_bitnet (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(BitEmbedConfig.model_type, BitEmbedConfig)
        AutoModel.register(BitEmbedConfig, BitEmbedModel)
    except ValueError:  # already registered by an earlier copy of this module
        pass
    # save_pretrained then writes auto_map and copies the shipped code files for trust_remote_code users.
    BitEmbedConfig.register_for_auto_class()
    BitEmbedModel.register_for_auto_class("AutoModel")
    if os.environ.get("ST_BITNET_TRANSFORMERS_HOOK", "1") != "0":
        from transformers.quantizers import auto as quantizer_auto

        from .hf_quantizer import StBitNetHfQuantizer

        quantizer_auto.AUTO_QUANTIZER_MAPPING["bitnet"] = StBitNetHfQuantizer
    _REGISTERED = True
