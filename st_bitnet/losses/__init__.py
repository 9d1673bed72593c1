"""Training losses for BitNet text embedders.

Contrastive pre-training / fine-tuning reuses sentence-transformers' InfoNCE losses, re-exported here:
``MultipleNegativesRankingLoss`` (in-batch + hard negatives) and ``CachedMultipleNegativesRankingLoss``
(GradCache, for batches larger than memory allows). st_bitnet adds the two distillation losses and their
weighted combination (one shared forward pass, every component logged).
"""

from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    CoSENTLoss,
    MultipleNegativesRankingLoss,
)

from .attention_relation_distillation import AttentionRelationDistillationLoss
from .embedding_mse_distillation import EmbeddingMSEDistillationLoss
from .qkv_capture import QKVCapture, find_qkv_projections
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss
from .weighted_combination import WeightedCombinationLoss

__all__ = [
    "AttentionRelationDistillationLoss",
    "CachedMultipleNegativesRankingLoss",
    "CoSENTLoss",
    "EmbeddingMSEDistillationLoss",
    "MultipleNegativesRankingLoss",
    "QKVCapture",
    "SimilarityDistributionDistillationLoss",
    "WeightedCombinationLoss",
    "find_qkv_projections",
]

try:  # owned by the multi-precision work; may not exist yet
    from .multi_precision_loss import MultiPrecisionLoss  # noqa: F401

    __all__.append("MultiPrecisionLoss")
except ModuleNotFoundError as error:
    if error.name != __name__ + ".multi_precision_loss":
        raise
