"""st_bitnet's own transformers class (model type ``bitembed``): any backbone with BitLinear projections.

Used only where stock transformers' ``bitnet`` quantization format cannot express a converted model:
SubLN norm placement, bidirectional attention on a causal architecture without a config switch for it,
or projection widths not divisible by 4. Shipped with such models (with ``bitlinear.py`` and
``configuration_bitembed.py``) for ``trust_remote_code=True`` loading; depends on torch and transformers only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoModel, PreTrainedModel

from .bitlinear import VALUES_PER_BYTE, BitLinear, BitRMSNorm, projection_gets_norm
from .configuration_bitembed import BitEmbedConfig


def native_bidirectional_switch(config) -> bool:
    """True when the architecture has a config switch for bidirectional attention (Gemma3's EmbeddingGemma flag)."""
    return hasattr(config, "use_bidirectional_attention")


def set_attention_direction(model: nn.Module, bidirectional: bool | None) -> None:
    """Make a backbone's self-attention bidirectional (or causal); None leaves it as it is."""
    if bidirectional is None:
        return
    config = model.config
    if native_bidirectional_switch(config):
        config.use_bidirectional_attention = bool(bidirectional)
    is_decoder_arch = getattr(config, "is_decoder", False) or hasattr(config, "rope_theta") or hasattr(config, "rope_parameters")
    touched = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(getattr(module, "is_causal"), bool):
            module.is_causal = not bidirectional
            touched += 1
    if not bidirectional and not is_decoder_arch and touched == 0:
        raise ValueError(f"{type(model).__name__} is an encoder: it has no causal attention to switch to")


def needs_own_class(model: nn.Module) -> bool:
    """Whether the converted model needs st_bitnet's ``bitembed`` class (stock ``bitnet`` format cannot say it)."""
    record = model.config.st_bitnet
    if record.get("norm") == "subln":
        return True
    if record.get("bidirectional") and not native_bidirectional_switch(model.config):
        return True
    for module in model.modules():
        if isinstance(module, BitLinear) and module.out_features % VALUES_PER_BYTE:
            return True
    return False


def replace_linears(model: nn.Module, record: dict) -> None:
    """Rebuild the BitLinear layers a conversion record describes (their weights are loaded afterwards)."""
    packed = bool(record.get("packed", False))
    eps = float(record.get("rms_norm_eps") or 1e-6)
    for name in record.get("converted_modules", []):
        linear = model.get_submodule(name)
        if isinstance(linear, BitLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"conversion record names {name!r}, which is a {type(linear).__name__}, not a Linear")
        new = BitLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            use_rms_norm=projection_gets_norm(name, record.get("norm", "per_projection")),
            rms_norm_eps=eps,
            packed=packed,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        model.set_submodule(name, new)


class BitEmbedModel(PreTrainedModel):
    """A transformers backbone (``self.model``) whose projections are BitLinear layers.

    ``forward`` takes the backbone's arguments and returns its output (``last_hidden_state``...), with
    bidirectional attention when the conversion asked for it.
    """

    config_class = BitEmbedConfig
    base_model_prefix = "bitembed"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: BitEmbedConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        if backbone is None:
            backbone_config = config.backbone_config()
            backbone_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
            backbone = AutoModel.from_config(backbone_config)
            replace_linears(backbone, config.st_bitnet)
            set_attention_direction(backbone, config.st_bitnet.get("bidirectional"))
        self.model = backbone
        self.post_init()

    @classmethod
    def wrap(cls, backbone: nn.Module) -> "BitEmbedModel":
        """Wrap an already converted backbone (no copy, no re-initialisation)."""
        backbone_dict = backbone.config.to_dict()
        record = backbone_dict.pop("st_bitnet", None) or dict(backbone.config.st_bitnet)
        backbone_dict.pop("quantization_config", None)
        config = BitEmbedConfig(backbone=backbone_dict, st_bitnet=record)
        config._attn_implementation = backbone.config._attn_implementation
        return cls(config, backbone=backbone)

    def _init_weights(self, module):
        if isinstance(module, BitRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, BitLinear):
            if not module.is_packed:
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif hasattr(self, "model") and isinstance(self.model, PreTrainedModel):
            self.model._init_weights(module)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @property
    def bidirectional_by_mask(self) -> bool:
        return bool(self.config.st_bitnet.get("bidirectional")) and not native_bidirectional_switch(self.model.config)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if self.bidirectional_by_mask:
            from transformers.masking_utils import create_bidirectional_mask

            if inputs_embeds is None:
                inputs_embeds = self.model.get_input_embeddings()(input_ids)
            mask = create_bidirectional_mask(
                config=self.model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )
            mapping = {"full_attention": mask, "sliding_attention": mask}
            return self.model(inputs_embeds=inputs_embeds, attention_mask=mapping, **kwargs)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
