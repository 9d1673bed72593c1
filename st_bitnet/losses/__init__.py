"""Training losses for BitNet text embedders.

Contrastive pre-training / fine-tuning reuses sentence-transformers' InfoNCE losses, re-exported here:
``MultipleNegativesRankingLoss`` (in-batch + hard negatives) and ``CachedMultipleNegativesRankingLoss``
(GradCache, for batches larger than memory allows). st_bitnet adds the two distillation losses and their
weighted combination (one shared forward pass, every component logged), the multi-precision output loss
(``MultiPrecisionLoss``, which can also be a component of the combination), the hidden-state loss
(``HiddenStateDistillationLoss``, every block's token states) and two more distillation components:
``PairSimilarityDistillationLoss`` (in-batch KL over (anchor, positive) only).
``MultiPrecisionSimilarityDistillationLoss`` is the deprecated name of
``MultiPrecisionLoss(SimilarityDistributionDistillationLoss)`` averaged over the precisions (also with
``teacher="self"``). :mod:`.traits` reads what each loss class declares it needs (a teacher) and allows
(being wrapped by ``MultiPrecisionLoss``).
"""

from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    CoSENTLoss,
    MultipleNegativesRankingLoss,
)

from . import traits
from .attention_relation_distillation import AttentionRelationDistillationLoss
from .embedding_mse_distillation import EmbeddingMSEDistillationLoss
from .hidden_state_capture import HiddenStateCapture
from .hidden_state_distillation import HiddenStateDistillationLoss
from .multi_precision_loss import MultiPrecisionLoss
from .multi_precision_similarity_distillation import MultiPrecisionSimilarityDistillationLoss
from .pair_similarity_distillation import PairSimilarityDistillationLoss
from .qkv_capture import QKVCapture, find_qkv_projections
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss
from .weighted_combination import WeightedCombinationLoss

__all__ = [
    "AttentionRelationDistillationLoss",
    "CachedMultipleNegativesRankingLoss",
    "CoSENTLoss",
    "EmbeddingMSEDistillationLoss",
    "HiddenStateCapture",
    "HiddenStateDistillationLoss",
    "MultiPrecisionLoss",
    "MultiPrecisionSimilarityDistillationLoss",
    "MultipleNegativesRankingLoss",
    "PairSimilarityDistillationLoss",
    "QKVCapture",
    "SimilarityDistributionDistillationLoss",
    "WeightedCombinationLoss",
    "find_qkv_projections",
]
