"""LoRA adapters (peft) on latent BitLinear layers.

peft wraps only the layer types it knows (``nn.Linear``, ``Conv*``, ``Embedding``...) and rejects BitLinear; its
custom-module hook (``LoraConfig._register_custom_module``) takes a LoRA layer class per module type. This module
provides that class: the frozen base BitLinear runs as it is (ternary weights, int8 activations, QAT straight-through
gradients to its input) and the low-rank update ``B A x`` runs in float beside it.

A packed BitLinear holds no trainable weights and its kernel has no backward: adapters on it are refused.
Merging is refused too: folding ``B A`` into the latent weights re-quantizes them, so the merged model would not
compute what the adapter was trained to.

Example::

    from peft import LoraConfig
    from st_bitnet.lora import bitlinear_lora

    config = bitlinear_lora(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.add_adapter(config)            # SentenceTransformer; or peft.get_peft_model(backbone, config)
"""

from __future__ import annotations

from functools import lru_cache

from .bitlinear import BitLinear


@lru_cache(maxsize=1)
def bitlinear_lora_layer():
    """The peft LoRA layer class for BitLinear (built on first use: peft is optional)."""
    from peft.tuners.lora.layer import Linear

    class BitLinearLoraLayer(Linear):
        """peft's LoRA ``Linear`` around a latent BitLinear (see the module docs)."""

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            target = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            if isinstance(target, BitLinear) and target.is_packed:
                raise ValueError(
                    "LoRA needs latent BitLinear layers: a packed layer has no trainable weights and its kernel has no "
                    "backward. Add the adapters before st_bitnet.pack / save_pretrained (train the latent model)."
                )
            if getattr(config, "fan_in_fan_out", False):
                raise ValueError("fan_in_fan_out does not apply to BitLinear (its weight is (out_features, in_features))")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def merge(self, *args, **kwargs):
            raise ValueError(
                "merging a LoRA adapter into BitLinear changes its outputs (the merged latent weights are re-quantized "
                "to ternary); keep the adapter separate, or fine-tune the latent weights themselves"
            )

    return BitLinearLoraLayer


def bitlinear_lora(config):
    """Register the BitLinear LoRA layer on a peft ``LoraConfig`` (in place) and return it.

    Args:
        config: a ``peft.LoraConfig`` whose ``target_modules`` name BitLinear layers (and/or plain ones).

    Returns:
        The same config, usable with ``peft.get_peft_model`` or ``SentenceTransformer.add_adapter``.
    """
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise TypeError(f"bitlinear_lora expects a peft LoraConfig, got {type(config).__name__}")
    register({BitLinear: bitlinear_lora_layer()})
    return config
