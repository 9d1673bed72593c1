"""``StBitNetHfQuantizer``: transformers' ``bitnet`` quantizer, building st_bitnet's BitLinear layers.

A module-level class (imported only when st_bitnet registers it), so a loaded model, which keeps its quantizer
as ``model.hf_quantizer``, pickles: sentence-transformers' multi-process encoding sends the model to its workers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer

from .bitlinear import BitLinear


def replace_with_st_bitnet_linear(model: nn.Module, modules_to_not_convert, quantization_config) -> None:
    """Swap every ``nn.Linear`` that transformers' ``bitnet`` method converts for an (empty, meta) BitLinear."""
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
        replace_with_st_bitnet_linear(model, self.modules_to_not_convert, self.quantization_config)
