"""Embedding-level distillation: squared L2 distance between student and teacher sentence embeddings."""

from __future__ import annotations

import torch
from torch import Tensor

from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss


class EmbeddingMSEDistillationLoss(SimilarityDistributionDistillationLoss):
    """``mean_rows ||s - t||^2`` per column, averaged over the columns, against a frozen live teacher.

    With unit-norm embeddings ``||s - t||^2 = 2 - 2 cos(s, t)``: it pulls every student embedding onto the
    teacher's, which a CPU ablation (experiments/quality_ablation) found to recover a naive BitNet conversion fastest,
    together with the in-batch similarity KL. It shares the teacher plumbing of
    :class:`SimilarityDistributionDistillationLoss` (so :class:`WeightedCombinationLoss` gives it the shared teacher
    embeddings); the similarity arguments of that class are unused.

    Args:
        model: the student SentenceTransformer.
        teacher: a :class:`st_bitnet.teacher.FrozenTeacher` (required: precomputed scores carry no embeddings).

    Example::

        loss = WeightedCombinationLoss(student, {
            "mse": EmbeddingMSEDistillationLoss(student, teacher),
            "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
        })
    """

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        if len(student_embeddings) != len(teacher_embeddings):
            raise ValueError(f"{len(student_embeddings)} student columns vs {len(teacher_embeddings)} teacher columns")
        terms = [
            (s.float() - t.detach().float().to(s.device)).pow(2).sum(-1).mean()
            for s, t in zip(student_embeddings, teacher_embeddings)
        ]
        return torch.stack(terms).mean()

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        raise ValueError("EmbeddingMSEDistillationLoss needs a live teacher: precomputed scores hold no embeddings")
