"""transformers integration: the ``bitembed`` auto classes and st_bitnet's handling of ``bitnet`` checkpoints.

Stock transformers reads BitNet checkpoints through its ``bitnet`` quantization method
(``quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode":
"offline", "use_rms_norm": true}``). st_bitnet writes that format whenever it can express a converted model,
so users without st_bitnet load it with stock libraries. Once st_bitnet is imported, the same checkpoints
load into st_bitnet's :class:`~st_bitnet.bitlinear.BitLinear` instead (same state-dict names, same numbers,
st_bitnet's kernels). Set ``ST_BITNET_TRANSFORMERS_HOOK=0`` before importing st_bitnet to keep stock layers.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .bitlinear import BitLinear
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


def _replace_with_st_bitnet_linear(model, modules_to_not_convert, quantization_config) -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    packed = quantization_config.linear_class == "bitlinear"
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not should_convert_module(name, modules_to_not_convert):
            continue
        with torch.device("meta"):
            new = BitLinear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                use_rms_norm=bool(quantization_config.use_rms_norm),
                rms_norm_eps=quantization_config.rms_norm_eps or 1e-6,
                packed=packed,
                dtype=module.weight.dtype,
            )
        if packed:
            new.requires_grad_(False)
        model.set_submodule(name, new)


def _make_quantizer_class():
    from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer

    class StBitNetHfQuantizer(BitNetHfQuantizer):
        """transformers' bitnet quantizer, building st_bitnet's BitLinear (packed or latent QAT)."""

        def _handled(self) -> bool:
            qc = self.quantization_config
            return not (qc.linear_class == "autobitlinear" and qc.quantization_mode == "offline")

        def validate_environment(self, *args, **kwargs):
            if not self._handled():
                return super().validate_environment(*args, **kwargs)
            # st_bitnet has CPU kernels: no "inference will be slow" warning, no accelerate requirement.

        def _process_model_before_weight_loading(self, model, **kwargs):
            if not self._handled():
                return super()._process_model_before_weight_loading(model, **kwargs)
            self.modules_to_not_convert = self.get_modules_to_not_convert(
                model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
            )
            _replace_with_st_bitnet_linear(model, self.modules_to_not_convert, self.quantization_config)

    return StBitNetHfQuantizer


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

        quantizer_auto.AUTO_QUANTIZER_MAPPING["bitnet"] = _make_quantizer_class()
    _REGISTERED = True
