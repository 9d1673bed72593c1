"""Deprecated name of ``MultiPrecisionLoss(SimilarityDistributionDistillationLoss)``, averaged over the precisions.

The per-precision machinery is :class:`~st_bitnet.losses.MultiPrecisionLoss`'s; this class only keeps what the old
name did on top of it: precisions averaged (weights ``1 / n``), ``teacher="self"`` (the target is the student's own
float output), and a quantizer appended to the model and calibrated on the first batch when the model has none.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from st_bitnet.multi_precision.encode import find_quantizer
from st_bitnet.multi_precision.precision import BITS, resolve_bits
from st_bitnet.multi_precision.quantizer import MultiPrecisionQuantizer

from .multi_precision_loss import MultiPrecisionLoss, quantizer_tied_to_forward
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss, embed_columns

SELF = "self"
_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "MultiPrecisionSimilarityDistillationLoss is deprecated: with a teacher, use MultiPrecisionLoss(model, "
            "SimilarityDistributionDistillationLoss(model, teacher), precisions=...) (recipes: multi_precision: true "
            "on a SimilarityDistributionDistillationLoss component), which sums the precisions where this name "
            "averages them; self-distillation (teacher='self') has no other name yet",
            FutureWarning,  # shown by default: recipes name this loss too
            stacklevel=3,
        )


class MultiPrecisionSimilarityDistillationLoss(MultiPrecisionLoss):
    needs_teacher = True
    not_multi_precision_wrappable_because = "it already trains the low-bit outputs"

    def __init__(
        self,
        model=None,
        teacher=None,
        precisions: Sequence[int | str] = (8, 4, 2, 1),
        quantizer: MultiPrecisionQuantizer | None = None,
        **kwargs,
    ) -> None:
        """
        Deprecated: :class:`MultiPrecisionLoss` over :class:`SimilarityDistributionDistillationLoss`, with the
        precisions averaged. For every ``b`` in ``precisions`` the student embeddings are fake-quantized by the
        model's :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer` (straight-through) and their in-batch
        similarity distribution is matched to the teacher's *float* one; the loss is the mean over precisions.

        With ``teacher="self"`` the target is the student's *own* float output (detached): the low-bit codes are
        trained to rank candidates as the model's 16-bit embedding does. It needs no teacher.

        If the model has no quantizer, an uncalibrated one serving 16/8/4/2/1 bits is appended at construction (so
        the trainer's optimizer sees its ranges) and calibrated (median / 2 std) on the first batch's student
        embeddings.

        Args:
            model: the student SentenceTransformer (None with an explicit ``quantizer``, for tensor-only use).
            teacher: a live :class:`~st_bitnet.teacher.FrozenTeacher`, ``"self"``, or None for precomputed scores.
            precisions: the bit widths distilled (names such as ``"2bit"`` work), each served by the quantizer.
            quantizer: use this quantizer instead of the model's (it is not appended to the model).
            **kwargs: ``temperature``, ``teacher_temperature``, ``kl_direction``, ``in_batch_negatives``,
                ``similarity_fct`` of :class:`SimilarityDistributionDistillationLoss`.

        Example:
            ::

                # instead of MultiPrecisionSimilarityDistillationLoss(student, teacher, precisions=[8, 4, 2, 1]):
                loss = MultiPrecisionLoss(student, SimilarityDistributionDistillationLoss(student, teacher),
                                          precisions=[8, 4, 2, 1], precision_weights=[0.25] * 4)
        """
        _warn_once()
        self_distillation = isinstance(teacher, str)
        if self_distillation and teacher != SELF:
            raise ValueError(f"teacher must be a FrozenTeacher, {SELF!r} or None, got {teacher!r}")
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
        inner = SimilarityDistributionDistillationLoss(model, teacher=None if self_distillation else teacher, **kwargs)
        n = len(precisions)
        super().__init__(model, inner, [resolve_bits(b) for b in precisions], precision_weights=[1.0 / n] * n,
                         quantizer=quantizer)  # fmt: skip
        self.self_distillation = self_distillation

    @property
    def teacher(self):
        return self.loss.teacher

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        """One student pass (and one teacher pass) per column, then every precision on those embeddings."""
        sentence_features = list(sentence_features)
        with quantizer_tied_to_forward(self.quantizer):  # DDP: the ranges count as used in the forward
            student = embed_columns(self.model, sentence_features)
            if self.self_distillation:
                return self.compute_loss_from_embeddings(student, student)  # the target side is detached
            if self.teacher is not None:
                return self.compute_loss_from_embeddings(student, [self.teacher.embed(f) for f in sentence_features])
            if labels is None:
                raise ValueError("no teacher and no precomputed teacher scores in the batch's labels")
            return self.compute_loss_from_labels(student, labels)

    def _calibrate_once(self, student_embeddings: Sequence[Tensor]) -> None:
        if self.quantizer.calibrated:
            return
        self.quantizer.calibrate(torch.cat([s.detach() for s in student_embeddings]).float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process saw its own first batch: take rank 0's ranges so the replicas stay identical
            with torch.no_grad():
                for parameter in self.quantizer.parameters():
                    torch.distributed.broadcast(parameter.data, src=0)

    def compute_loss_over_precisions(
        self, embeddings: Sequence[Tensor], labels: Any, loss_fn: Callable[[list[Tensor], Any, int], Tensor]
    ) -> Tensor:
        self._calibrate_once(embeddings)  # also inside WeightedCombinationLoss, which calls this directly
        return super().compute_loss_over_precisions([e.float() for e in embeddings], labels, loss_fn)

    def compute_loss_from_embeddings(self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        """Mean over the precisions of the similarity KL between the fake-quantized student and the float
        teacher (tensor-only: lists of ``(B, dim)`` columns, query first)."""
        teacher = [t.detach().float() for t in teacher_embeddings]
        return self.compute_loss_over_precisions(
            student_embeddings, None, lambda quantized, _labels, _bits: self.loss.compute_loss_from_embeddings(quantized, teacher)
        )

    def compute_loss_with_quantizer(
        self, student_embeddings: list[Tensor], teacher_embeddings: list[Tensor], quantizer: MultiPrecisionQuantizer
    ) -> Tensor:
        """:meth:`compute_loss_from_embeddings` with ``quantizer`` (it must be this loss's own)."""
        if quantizer is not self.quantizer:
            raise ValueError("compute_loss_with_quantizer: pass this loss's own quantizer (loss.quantizer)")
        return self.compute_loss_from_embeddings(student_embeddings, teacher_embeddings)

    def compute_loss_from_labels(self, student_embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """Precomputed teacher scores: each precision's own-candidate scores against them, averaged."""
        return self.compute_loss_over_precisions(
            student_embeddings, None, lambda quantized, _labels, _bits: self.loss.compute_loss_from_labels(quantized, labels)
        )

    def get_config_dict(self) -> dict[str, Any]:
        config = {**self.loss.get_config_dict(), "precisions": list(self.precisions)}
        if self.self_distillation:
            config.update(teacher=SELF, precomputed_teacher_scores=False)
        return config
