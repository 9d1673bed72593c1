from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sentence_transformers.util import cos_sim

KL_DIRECTIONS = ("forward", "reverse")


def teacher_embeddings_from_labels(labels: Tensor | None, student_embeddings: list[Tensor]) -> list[Tensor] | None:
    """Per-column teacher embeddings from precomputed labels of shape ``(B, n_columns, dim)``
    (:func:`st_bitnet.teacher.precompute_teacher_embeddings`); None when ``labels`` are not embedding-shaped."""
    if not isinstance(labels, Tensor) or labels.dim() != 3:
        return None
    expected = (student_embeddings[0].size(0), len(student_embeddings), student_embeddings[0].size(-1))
    if tuple(labels.shape) != expected:
        raise ValueError(f"precomputed teacher embeddings must have shape (batch_size, n_columns, dim) = {expected}, "
                         f"got {tuple(labels.shape)}")
    return list(labels.unbind(dim=1))


def embed_columns(model, sentence_features: Iterable[dict[str, Tensor]]) -> list[Tensor]:
    """One student forward pass per input column; works with sentence-transformers 6.0 and 6.2."""
    return [model(dict(features))["sentence_embedding"] for features in sentence_features]


class SimilarityDistributionDistillationLoss(nn.Module):
    needs_teacher = True  # a live teacher, or its precomputed scores or embeddings
    accepts_teacher_embeddings = True
    labels_in_output_space = False  # precomputed teacher embeddings are compared by similarity: they stay float

    def __init__(
        self,
        model,
        teacher=None,
        temperature: float = 0.05,
        teacher_temperature: float | None = None,
        kl_direction: str = "forward",
        in_batch_negatives: bool = True,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
    ) -> None:
        """
        Similarity-distribution distillation: the student's softmax over a query's candidate similarities
        (its positive, its hard negatives and, by default, every other document in the batch) is trained to
        match the frozen full-precision teacher's softmax over the same candidates.

        With ``p_t = softmax(s_teacher / teacher_temperature)`` and ``p_s = softmax(s_student / temperature)``
        per query row, the loss is the row-averaged

        * ``kl_direction="forward"`` (default): ``KL(p_t || p_s) = sum p_t (log p_t - log p_s)``, the usual
          knowledge-distillation direction; mass-covering, the student must give weight to every candidate
          the teacher finds plausible;
        * ``kl_direction="reverse"``: ``KL(p_s || p_t)``, mode-seeking.

        The loss is not multiplied by ``temperature ** 2`` (Hinton et al.'s scaling is meant for temperatures
        above 1; with cosine similarities and ``temperature=0.05`` it would shrink the loss 400-fold), so
        weigh it directly against the contrastive loss.

        Teacher scores come from a live teacher (``teacher=FrozenTeacher(...)``, run in no-grad on the same token
        ids; scores the full in-batch matrix), from the teacher's embeddings precomputed into the dataset's ``label``
        column (:func:`st_bitnet.teacher.precompute_teacher_embeddings`; the same loss without a teacher forward per
        step), or from its per-row scores (:func:`st_bitnet.teacher.precompute_teacher_scores`; own candidates only).

        Args:
            model: the student SentenceTransformer.
            teacher: a :class:`~st_bitnet.teacher.FrozenTeacher`, or None to read precomputed teacher embeddings or
                scores from the labels.
            temperature: softmax temperature of the student scores (``0.05`` = MultipleNegativesRankingLoss'
                ``scale=20``).
            teacher_temperature: temperature of the teacher scores; defaults to ``temperature``.
            kl_direction: ``"forward"`` (KL(teacher || student)) or ``"reverse"`` (KL(student || teacher)).
            in_batch_negatives: with a live teacher, also distill over the other rows' documents; if False, each
                query's distribution covers only its own positive and hard negatives.
            similarity_fct: the similarity used for both models' scores (default cosine).

        References:
            - Hinton et al., Distilling the Knowledge in a Neural Network, https://arxiv.org/abs/1503.02531
            - BitDistill, https://arxiv.org/abs/2510.13998 (logits distillation for 1.58-bit models)

        Requirements:
            1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples
            2. a live teacher, or labels holding the teacher's embeddings or per-row scores

        Inputs:
            +-------------------------------------------------+----------------------------------------------+
            | Inputs                                          | Labels                                       |
            +=================================================+==============================================+
            | (anchor, positive, negative_1, ..., negative_n) | none (live teacher)                          |
            +-------------------------------------------------+----------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | [E(anchor), E(positive), E(negative_i)]      |
            +-------------------------------------------------+----------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | [T(anchor, positive), T(anchor, negative_i)] |
            +-------------------------------------------------+----------------------------------------------+

        Example:
            ::

                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                import st_bitnet
                from st_bitnet.losses import SimilarityDistributionDistillationLoss
                from st_bitnet.teacher import FrozenTeacher

                student = st_bitnet.convert(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"))
                teacher = FrozenTeacher("sentence-transformers/all-MiniLM-L6-v2", student=student)
                loss = SimilarityDistributionDistillationLoss(student, teacher=teacher)
                trainer = SentenceTransformerTrainer(model=student, train_dataset=pairs, loss=loss)
                trainer.train()
        """
        super().__init__()
        self.model = model
        self.teacher = teacher
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature if teacher_temperature is not None else temperature)
        if not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be positive, got {teacher_temperature}")
        if kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
        self.kl_direction = kl_direction
        self.in_batch_negatives = in_batch_negatives
        self.similarity_fct = similarity_fct

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        sentence_features = list(sentence_features)
        if self.teacher is None and labels is None:
            raise ValueError(
                "SimilarityDistributionDistillationLoss needs a teacher: pass teacher=FrozenTeacher(...) or "
                "precompute the teacher's scores into the dataset's label column"
            )
        student = embed_columns(self.model, sentence_features)
        if self.teacher is not None:
            teacher = [self.teacher.embed(features) for features in sentence_features]
            return self.compute_loss_from_embeddings(student, teacher)
        return self.compute_loss_from_labels(student, labels)

    def candidate_scores(self, embeddings: list[Tensor]) -> Tensor:
        """Scores of each query against its candidates: ``(B, B * n_docs)`` in-batch, else ``(B, n_docs)``."""
        if len(embeddings) < 2:
            raise ValueError(f"expected a query column and at least one document column, got {len(embeddings)}")
        query, docs = embeddings[0], embeddings[1:]
        if self.in_batch_negatives:
            return self.similarity_fct(query, torch.cat(docs, dim=0))
        return self.own_candidate_scores(query, docs)

    def own_candidate_scores(self, query: Tensor, docs: list[Tensor]) -> Tensor:
        """``(B, n_docs)``: each query against its own positive and hard negatives only."""
        return torch.stack([self.similarity_fct(query, d).diagonal() for d in docs], dim=1)

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        student_scores = self.candidate_scores(student_embeddings)
        with torch.no_grad():
            teacher_scores = self.candidate_scores([t.detach().to(student_scores) for t in teacher_embeddings])
        return self.compute_loss_from_scores(student_scores, teacher_scores)

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """From precomputed labels: the teacher's embeddings ``(B, n_columns, dim)`` (same loss as a live teacher,
        in-batch negatives included), or its per-row scores ``(B, n_candidate_columns)`` (own candidates only)."""
        teacher = teacher_embeddings_from_labels(labels, student_embeddings)
        if teacher is not None:
            return self.compute_loss_from_embeddings(student_embeddings, teacher)
        query, docs = student_embeddings[0], student_embeddings[1:]
        if labels.dim() != 2 or labels.shape != (query.size(0), len(docs)):
            raise ValueError(
                f"precomputed teacher scores must have shape (batch_size, n_candidate_columns) = "
                f"({query.size(0)}, {len(docs)}), got {tuple(labels.shape)}"
            )
        student_scores = self.own_candidate_scores(query, docs)
        return self.compute_loss_from_scores(student_scores, labels.to(student_scores))

    def compute_loss_from_scores(self, student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
        """The KL between the two softmax distributions, averaged over rows. Tensor-only: ``(B, C)`` each."""
        if student_scores.shape != teacher_scores.shape:
            raise ValueError(f"score shapes differ: {tuple(student_scores.shape)} vs {tuple(teacher_scores.shape)}")
        if student_scores.size(-1) < 2:
            raise ValueError("a softmax over a single candidate is constant: add negatives or in-batch negatives")
        student_log_p = F.log_softmax(student_scores.float() / self.temperature, dim=-1)
        teacher_log_p = F.log_softmax(teacher_scores.detach().float() / self.teacher_temperature, dim=-1)
        if self.kl_direction == "forward":
            kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="none")
        else:
            kl = F.kl_div(teacher_log_p, student_log_p, log_target=True, reduction="none")
        return kl.sum(-1).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            "kl_direction": self.kl_direction,
            "in_batch_negatives": self.in_batch_negatives,
            "precomputed_teacher_scores": self.teacher is None,
        }

    @property
    def citation(self) -> str:
        return """
@misc{hinton2015distilling,
    title={Distilling the Knowledge in a Neural Network},
    author={Geoffrey Hinton and Oriol Vinyals and Jeff Dean},
    year={2015},
    eprint={1503.02531},
    archivePrefix={arXiv},
}
"""
