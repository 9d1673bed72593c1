"""In-batch similarity distillation over the (anchor, positive) columns only."""

from __future__ import annotations

from torch import Tensor

from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss, teacher_embeddings_from_labels


class PairSimilarityDistillationLoss(SimilarityDistributionDistillationLoss):
    """
    The in-batch KL of *plain* distillation: each anchor's softmax over the batch's positives, student against the
    frozen teacher, on the first two columns only. Hard-negative columns of a triplet batch are ignored, so a
    recipe can add hard negatives to its contrastive term without changing what is distilled (they do enter
    :class:`SimilarityDistributionDistillationLoss`, which is the point of comparing the two).

    With ``S`` / ``T`` the ``(B, B)`` cosine matrices of anchors against positives (student / teacher), the loss is
    ``mean_rows KL(softmax(T / teacher_temperature) || softmax(S / temperature))`` (``kl_direction="forward"``).
    The maths is :meth:`compute_loss_from_embeddings` (tensor-only: lists of ``(B, dim)`` tensors, no model needed).

    Args:
        model: the student SentenceTransformer (may be None when only the tensor methods are used).
        teacher: a live :class:`~st_bitnet.teacher.FrozenTeacher`, or None with the teacher's embeddings precomputed
            into the labels (``(B, n_columns, dim)``, :func:`~st_bitnet.teacher.precompute_teacher_embeddings`);
            precomputed per-row scores are refused (they carry no in-batch candidates).
        temperature / teacher_temperature / kl_direction / similarity_fct: as in
            :class:`SimilarityDistributionDistillationLoss` (``in_batch_negatives`` is always True here).

    References:
        - Hinton et al., Distilling the Knowledge in a Neural Network, https://arxiv.org/abs/1503.02531
        - The "plain distillation" baseline of ``recipes/minilm_plain_kd.yaml`` is embedding MSE + an in-batch KL.

    Inputs:
        +---------------------------------------+---------------------------------------------------+
        | Inputs                                | Labels                                            |
        +=======================================+===================================================+
        | (anchor, positive[, negative_1, ...]) | none, or the teacher's embeddings (B, columns, d) |
        +---------------------------------------+---------------------------------------------------+

    Example:
        ::

            from st_bitnet.losses import (EmbeddingMSEDistillationLoss, PairSimilarityDistillationLoss,
                                          WeightedCombinationLoss)
            from st_bitnet.teacher import FrozenTeacher

            teacher = FrozenTeacher("sentence-transformers/all-MiniLM-L6-v2", student=student)
            loss = WeightedCombinationLoss(student, {
                "embedding_mse": EmbeddingMSEDistillationLoss(student, teacher),
                "pair_kl": PairSimilarityDistillationLoss(student, teacher, temperature=0.05),
            })
    """

    def __init__(self, model=None, teacher=None, **kwargs) -> None:
        if kwargs.get("in_batch_negatives", True) is not True:
            raise ValueError("PairSimilarityDistillationLoss is in-batch by definition; in_batch_negatives must be True")
        super().__init__(model, teacher=teacher, **kwargs)

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        """KL over the anchors' in-batch positives; columns after the second (hard negatives) are dropped."""
        if len(student_embeddings) < 2 or len(teacher_embeddings) < 2:
            raise ValueError("PairSimilarityDistillationLoss needs (anchor, positive) columns")
        return super().compute_loss_from_embeddings(student_embeddings[:2], teacher_embeddings[:2])

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """From the teacher's precomputed embeddings ``(B, n_columns, dim)``: the same loss as a live teacher."""
        teacher = teacher_embeddings_from_labels(labels, student_embeddings)
        if teacher is None:
            raise ValueError(
                "PairSimilarityDistillationLoss needs a live teacher or its precomputed embeddings (B, n_columns, dim): "
                f"per-row scores hold no in-batch candidates (labels of shape {tuple(labels.shape)})"
            )
        return self.compute_loss_from_embeddings(student_embeddings, teacher)
