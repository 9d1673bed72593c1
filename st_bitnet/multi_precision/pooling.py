"""``QuantizationAwarePooling``: pooling whose output statistics suit the multi-precision quantizer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from sentence_transformers.sentence_transformer.modules import Pooling

from .module_io import SafetensorsModuleIO

Normalization = Literal["rms", "layer", "none"]


# sentence-transformers < 5 and GGUF converters (llama.cpp / bitnet.cpp's convert-hf-to-gguf) read these booleans.
LEGACY_POOLING_KEYS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class QuantizationAwarePooling(SafetensorsModuleIO, Pooling):
    """sentence-transformers ``Pooling`` followed by a learned normalization that prepares the embedding for
    :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer`.

    The quantizer has fixed per-dimension ranges, but the pooled vectors of one model vary in scale from text to
    text (mean pooling of a BitNet backbone especially). The normalization removes that per-text scale so one set
    of ranges fits every text:

    - ``"rms"`` (default): ``x / rms(x) * gain`` with a learned per-dimension ``gain`` (initialised to 1). At
      initialisation it only rescales each vector, so it leaves every cosine similarity of a pretrained model
      unchanged; training then re-weights dimensions for the quantizer.
    - ``"layer"``: ``LayerNorm`` (also centres each vector; changes cosines of a pretrained model).
    - ``"none"``: plain pooling.

    The saved config carries sentence-transformers 6 keys (``embedding_dimension``, ``pooling_mode``,
    ``include_prompt``) *and* the legacy ``pooling_mode_*`` / ``word_embedding_dimension`` keys that GGUF converters
    read.

    Args:
        embedding_dimension: Dimension of the token embeddings.
        pooling_mode: ``"mean"``, ``"cls"``, ``"lasttoken"`` (or any ``Pooling`` mode / tuple of modes).
        include_prompt: If False, prompt tokens are excluded from pooling.
        normalization: ``"rms"``, ``"layer"`` or ``"none"``.
        normalization_eps: Epsilon of the normalization.

    Example:
        ::

            from sentence_transformers import SentenceTransformer
            from sentence_transformers.sentence_transformer.modules import Transformer
            from st_bitnet.multi_precision import MultiPrecisionQuantizer, QuantizationAwarePooling

            transformer = Transformer("Qwen/Qwen3-0.6B")
            pooling = QuantizationAwarePooling(transformer.get_embedding_dimension(), "lasttoken", include_prompt=True)
            model = SentenceTransformer(modules=[transformer, pooling])
            model.append(MultiPrecisionQuantizer.from_embeddings(model.encode(calibration_texts)))
    """

    NORMALIZATIONS = ("rms", "layer", "none")
    config_keys = ["embedding_dimension", "pooling_mode", "include_prompt", "normalization", "normalization_eps"]

    def __init__(
        self,
        embedding_dimension: int,
        pooling_mode: str | tuple[str, ...] | list[str] = "mean",
        include_prompt: bool = True,
        normalization: Normalization = "rms",
        normalization_eps: float = 1e-6,
    ) -> None:
        super().__init__(embedding_dimension, pooling_mode=pooling_mode, include_prompt=include_prompt)
        if normalization not in self.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {self.NORMALIZATIONS}, got {normalization!r}.")
        self.normalization = normalization
        self.normalization_eps = float(normalization_eps)
        dim = self.pooling_output_dimension
        if normalization == "rms":
            self.gain = nn.Parameter(torch.ones(dim))
        elif normalization == "layer":
            self.layer_norm = nn.LayerNorm(dim, eps=self.normalization_eps)

    def normalize(self, embeddings: Tensor) -> Tensor:
        """Apply the learned normalization to pooled ``(batch, dim)`` embeddings (tensor only)."""
        if self.normalization == "rms":
            rms = embeddings.float().pow(2).mean(-1, keepdim=True).add(self.normalization_eps).rsqrt()
            return (embeddings.float() * rms * self.gain.float()).to(embeddings.dtype)
        if self.normalization == "layer":
            return self.layer_norm(embeddings)
        return embeddings

    def forward(self, features: dict[str, Tensor | Any], **kwargs) -> dict[str, Tensor | Any]:
        features = super().forward(features, **kwargs)
        features["sentence_embedding"] = self.normalize(features["sentence_embedding"])
        return features

    def get_config_dict(self) -> dict[str, Any]:
        config = super().get_config_dict()
        modes = (self.pooling_mode,) if isinstance(self.pooling_mode, str) else tuple(self.pooling_mode)
        config["pooling_mode"] = modes[0] if len(modes) == 1 else list(modes)
        config["word_embedding_dimension"] = self.embedding_dimension
        for key, mode in LEGACY_POOLING_KEYS.items():
            config[key] = mode in modes
        return config

    @classmethod
    def load_config(cls, *args, **kwargs) -> dict[str, Any]:
        config = super().load_config(*args, **kwargs)  # Pooling's: legacy booleans -> pooling_mode
        word_dim = config.pop("word_embedding_dimension", None)
        config.setdefault("embedding_dimension", word_dim)
        return config

