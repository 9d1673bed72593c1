"""Similarity-distribution distillation of the low-bit (fake-quantized) outputs against the teacher's float scores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from st_bitnet.multi_precision.encode import find_quantizer
from st_bitnet.multi_precision.precision import BITS, resolve_bits
from st_bitnet.multi_precision.quantizer import MultiPrecisionQuantizer

from .multi_precision_loss import quantizer_tied_to_forward
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss, embed_columns

SELF = "self"


class MultiPrecisionSimilarityDistillationLoss(SimilarityDistributionDistillationLoss):
    def __init__(
        self,
        model=None,
        teacher=None,
        precisions: Sequence[int | str] = (8, 4, 2, 1),
        quantizer: MultiPrecisionQuantizer | None = None,
        **kwargs,
    ) -> None:
        """
        Similarity-distribution KD applied to the student's ``b``-bit outputs: for every ``b`` in ``precisions`` the
        student embeddings are fake-quantized by the model's
        :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer` (straight-through gradients, so the backbone and
        the quantizer's ranges both learn) and their in-batch similarity distribution is matched to the teacher's
        *float* one (:class:`SimilarityDistributionDistillationLoss`); the loss is the mean over precisions.

        With ``teacher="self"`` the target is the student's *own* float output (detached): the low-bit codes are
        trained to rank candidates as the model's 16-bit embedding does, which is what the drop from 16 to ``b``
        bits measures. It needs no teacher forward (and no teacher).

        It is the teacher-driven counterpart of ``MultiPrecisionLoss(SimilarityDistributionDistillationLoss)``,
        usable as one component of :class:`WeightedCombinationLoss` (one student and one teacher forward per batch).

        If the model has no quantizer, an uncalibrated one serving 16/8/4/2/1 bits is appended at construction
        (so the trainer's optimizer sees its ranges) and calibrated (median / 2 std) on the first batch's student
        embeddings. A recipe with ``model.multi_precision`` appends a quantizer calibrated on training texts first;
        this loss then uses that one.

        The maths is :meth:`compute_loss_with_quantizer` (tensor-only; no model needed).

        Args:
            model: the student SentenceTransformer (None with an explicit ``quantizer``, for tensor-only use).
            teacher: a live :class:`~st_bitnet.teacher.FrozenTeacher`, ``"self"`` (self-distillation from the
                student's own detached float output), or None for precomputed per-row scores.
            precisions: the bit widths distilled (names such as ``"2bit"`` work), each served by the quantizer.
            quantizer: use this quantizer instead of the model's (it is not appended to the model).
            **kwargs: ``temperature``, ``teacher_temperature``, ``kl_direction``, ``in_batch_negatives``,
                ``similarity_fct`` of :class:`SimilarityDistributionDistillationLoss`.

        References:
            - Nair et al., "Matryoshka Quantization", 2025: https://huggingface.co/papers/2502.06786
            - Hinton et al., Distilling the Knowledge in a Neural Network, https://arxiv.org/abs/1503.02531

        Inputs:
            +-------------------------------------------------+----------------------------------------------+
            | Inputs                                          | Labels                                       |
            +=================================================+==============================================+
            | (anchor, positive, negative_1, ..., negative_n) | none (live teacher)                          |
            +-------------------------------------------------+----------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | [T(anchor, positive), T(anchor, negative_i)] |
            +-------------------------------------------------+----------------------------------------------+

        Example:
            ::

                from st_bitnet.losses import (MultiPrecisionSimilarityDistillationLoss,
                                              SimilarityDistributionDistillationLoss, WeightedCombinationLoss)

                loss = WeightedCombinationLoss(student, {
                    "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
                    "multi_precision": MultiPrecisionSimilarityDistillationLoss(student, teacher, precisions=[8, 4, 2, 1]),
                })
        """
        self_distillation = isinstance(teacher, str)
        if self_distillation and teacher != SELF:
            raise ValueError(f"teacher must be a FrozenTeacher, {SELF!r} or None, got {teacher!r}")
        super().__init__(model, teacher=None if self_distillation else teacher, **kwargs)
        self.self_distillation = self_distillation
        if quantizer is None:
            if model is None:
                raise ValueError("MultiPrecisionSimilarityDistillationLoss needs a model or an explicit quantizer")
            quantizer = find_quantizer(model)
            if quantizer is None:
                getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
                quantizer = MultiPrecisionQuantizer(getter(), precisions=BITS, binary_threshold="offset")
                model.append(quantizer.to(model.device))
        if not precisions:
            raise ValueError("precisions must name at least one bit width")
        self.precisions = tuple(resolve_bits(b) for b in precisions)
        unserved = [b for b in self.precisions if b not in quantizer.precisions]
        if unserved:
            raise ValueError(f"the quantizer serves {quantizer.precisions} bits, not {unserved}")
        object.__setattr__(self, "_quantizer", quantizer)  # not a submodule: it lives in (and trains with) the model

    @property
    def quantizer(self) -> MultiPrecisionQuantizer:
        return self._quantizer

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        with quantizer_tied_to_forward(self._quantizer):  # DDP: the ranges count as used in the forward
            if self.self_distillation:
                student = embed_columns(self.model, sentence_features)
                return self.compute_loss_from_embeddings(student, student)  # the target side is detached
            return super().forward(sentence_features, labels)

    def _calibrate_once(self, student_embeddings: list[Tensor]) -> None:
        if self._quantizer.calibrated:
            return
        self._quantizer.calibrate(torch.cat([s.detach() for s in student_embeddings]).float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process saw its own first batch: take rank 0's ranges so the replicas stay identical
            with torch.no_grad():
                for parameter in self._quantizer.parameters():
                    torch.distributed.broadcast(parameter.data, src=0)

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        self._calibrate_once(student_embeddings)
        return self.compute_loss_with_quantizer(student_embeddings, teacher_embeddings, self._quantizer)

    def compute_loss_with_quantizer(
        self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor], quantizer: MultiPrecisionQuantizer
    ) -> Tensor:
        """Mean over ``self.precisions`` of the similarity KL between the fake-quantized student and the float
        teacher. Tensor-only: lists of ``(B, dim)`` columns (query first)."""
        with torch.no_grad():
            teacher_scores = self.candidate_scores([t.detach().float() for t in teacher_embeddings])
        terms = []
        with quantizer.rotation_fixed():
            for bits in self.precisions:
                quantized = [quantizer.fake_quantize(s.float(), bits) for s in student_embeddings]
                terms.append(self.compute_loss_from_scores(self.candidate_scores(quantized), teacher_scores.to(quantized[0])))
        return torch.stack(terms).mean()

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """Precomputed teacher scores: each precision's own-candidate scores against them, averaged."""
        self._calibrate_once(student_embeddings)
        terms = []
        with self._quantizer.rotation_fixed():
            for bits in self.precisions:
                quantized = [self._quantizer.fake_quantize(s.float(), bits) for s in student_embeddings]
                terms.append(super().compute_loss_from_labels(quantized, labels))
        return torch.stack(terms).mean()

    def get_config_dict(self) -> dict[str, Any]:
        config = {**super().get_config_dict(), "precisions": list(self.precisions)}
        if self.self_distillation:
            config.update(teacher=SELF, precomputed_teacher_scores=False)
        return config
