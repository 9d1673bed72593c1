"""Embedding-level distillation: squared L2 distance between student and teacher sentence embeddings."""

from __future__ import annotations

import torch
from torch import Tensor

from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss, teacher_embeddings_from_labels


class EmbeddingMSEDistillationLoss(SimilarityDistributionDistillationLoss):
    """``mean_rows ||s - t||^2`` per column, averaged over the columns, against a frozen teacher's embeddings.

    With unit-norm embeddings ``||s - t||^2 = 2 - 2 cos(s, t)``: it pulls every student embedding onto the
    teacher's, which a CPU ablation (experiments/quality_ablation) found to recover a naive BitNet conversion fastest,
    together with the in-batch similarity KL. It shares the teacher plumbing of
    :class:`SimilarityDistributionDistillationLoss` (so :class:`WeightedCombinationLoss` gives it the shared teacher
    embeddings); the similarity arguments of that class are unused.

    Args:
        model: the student SentenceTransformer.
        teacher: a :class:`st_bitnet.teacher.FrozenTeacher`, or None to read the teacher's embeddings precomputed
            into the labels (:func:`st_bitnet.teacher.precompute_teacher_embeddings`); precomputed scores carry none.

    Example::

        loss = WeightedCombinationLoss(student, {
            "mse": EmbeddingMSEDistillationLoss(student, teacher),
            "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
        })
    """

    labels_in_output_space = True  # compares coordinates: a multi-precision wrapper maps teacher embeddings per precision

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        if len(student_embeddings) != len(teacher_embeddings):
            raise ValueError(f"{len(student_embeddings)} student columns vs {len(teacher_embeddings)} teacher columns")
        terms = [
            (s.float() - t.detach().float().to(s.device)).pow(2).sum(-1).mean()
            for s, t in zip(student_embeddings, teacher_embeddings)
        ]
        return torch.stack(terms).mean()

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        teacher = teacher_embeddings_from_labels(labels, student_embeddings)
        if teacher is None:
            raise ValueError("EmbeddingMSEDistillationLoss needs a live teacher or precomputed teacher embeddings "
                             "(batch_size, n_columns, dim) as labels: precomputed scores hold no embeddings")
        return self.compute_loss_from_embeddings(student_embeddings, teacher)
