"""Config of st_bitnet's own transformers class (model type ``bitembed``).

Shipped next to saved models that stock transformers' ``bitnet`` format cannot express (SubLN norms,
bidirectional attention on a causal architecture, widths not divisible by 4), so that users without
st_bitnet can load them with ``trust_remote_code=True``. Depends on transformers only.
"""

from __future__ import annotations

import copy

from transformers import AutoConfig, PretrainedConfig

# Attributes PretrainedConfig's own machinery probes and rewrites (RoPE standardization): answering them from the
# backbone made transformers write the backbone's rope settings onto this config (saved at the top level) and, in
# some versions, insert a top-level ``rope_theta`` float into the backbone's per-layer-type rope dict.
_NOT_FORWARDED_PREFIXES = ("rope_", "partial_rotary_factor", "default_theta", "ignore_keys_at_rope")


class BitEmbedConfig(PretrainedConfig):
    """A backbone config (any transformers architecture) plus the BitNet conversion record.

    Args:
        backbone: the backbone's config as a dict (with its ``model_type``).
        st_bitnet: the conversion record written by :func:`st_bitnet.convert` (norm placement, epsilon,
            converted module names, attention direction, packed or latent).
    """

    model_type = "bitembed"

    def __init__(self, backbone: dict | None = None, st_bitnet: dict | None = None, **kwargs):
        self.backbone = copy.deepcopy(dict(backbone or {}))
        self.st_bitnet = dict(st_bitnet or {})
        # Top-level rope keys written by earlier versions (a copy of the backbone's): the backbone's own are the truth.
        for key in [k for k in kwargs if k.startswith(_NOT_FORWARDED_PREFIXES)]:
            kwargs.pop(key)
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        if "model_type" not in self.backbone:
            raise ValueError("BitEmbedConfig.backbone must hold a transformers config dict with a 'model_type'")
        backbone = dict(self.backbone)
        model_type = backbone.pop("model_type")
        config = AutoConfig.for_model(model_type, **backbone)
        config.st_bitnet = dict(self.st_bitnet)
        return config

    # sentence-transformers and tokenizers look these up on the top-level config (hidden_size, pad_token_id...).
    # Values are copies: nothing done to them can change the backbone's settings.
    def __getattr__(self, name):
        if name.startswith("_") or name in ("backbone", "st_bitnet") or name.startswith(_NOT_FORWARDED_PREFIXES):
            raise AttributeError(name)
        backbone = self.__dict__.get("backbone") or {}
        if name in backbone:
            return copy.deepcopy(backbone[name])
        raise AttributeError(f"'BitEmbedConfig' object has no attribute '{name}'")
