from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from .attention_relation_distillation import AttentionRelationDistillationLoss
from .embedding_mse_distillation import EmbeddingMSEDistillationLoss
from .hidden_state_capture import HiddenStateCapture
from .hidden_state_distillation import HiddenStateDistillationLoss
from .multi_precision_loss import MultiPrecisionLoss, quantize_labels, quantizer_tied_to_forward, uses_gradient_cache
from .qkv_capture import QKVCapture
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss
from .traits import multi_precision_wrappable, needs_teacher, why_not_multi_precision_wrappable


def _inner(loss: nn.Module) -> nn.Module:
    """The loss a :class:`MultiPrecisionLoss` applies at every precision (else the loss itself)."""
    return loss.loss if isinstance(loss, MultiPrecisionLoss) else loss


class WeightedCombinationLoss(nn.Module):
    multi_precision_wrappable = False
    not_multi_precision_wrappable_because = (
        "it returns one value per component: put the MultiPrecisionLoss inside the combination instead, e.g. "
        "WeightedCombinationLoss(model, {'contrastive': MultiPrecisionLoss(model, MultipleNegativesRankingLoss(model)), "
        "'similarity_kd': ...}); the student and the teacher then still run once per batch"
    )

    def __init__(self, model, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        """
        A weighted sum of losses that share **one** student forward pass (and one teacher forward pass) per
        input column, returning every weighted component separately so the trainer logs each of them.

        Supported components: any loss with ``compute_loss_from_embeddings(embeddings, labels)`` (e.g.
        sentence-transformers' ``MultipleNegativesRankingLoss``, ``CoSENTLoss``),
        :class:`SimilarityDistributionDistillationLoss` (and its subclasses), :class:`AttentionRelationDistillationLoss`,
        and :class:`MultiPrecisionLoss` wrapping any of these but the attention loss: its inner loss is applied to
        the shared float embeddings fake-quantized at each precision (the teacher's embeddings stay float, except
        for :class:`EmbeddingMSEDistillationLoss`, which compares coordinates and so sees them mapped into each
        precision's space), weighted and summed into one logged component.
        The teacher is the one the distillation components hold (they must hold the same one). Cached
        (GradCache) losses run their own mini-batched forward passes and cannot share one: use them alone.

        The forward returns ``{name: weight * component}``; ``SentenceTransformerTrainer`` sums the values into
        the training loss and logs each key next to ``loss``.

        Args:
            model: the student SentenceTransformer.
            losses: ``{name: loss}``; names become the logged keys.
            weights: ``{name: weight}``; missing names weigh 1.0.

        Example:
            ::

                from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
                from st_bitnet.losses import (AttentionRelationDistillationLoss,
                                              SimilarityDistributionDistillationLoss, WeightedCombinationLoss)
                teacher = FrozenTeacher(teacher_path, student=student)
                loss = WeightedCombinationLoss(student, {
                    "contrastive": MultipleNegativesRankingLoss(student),
                    "similarity_kd": SimilarityDistributionDistillationLoss(student, teacher),
                    "attention_kd": AttentionRelationDistillationLoss(student, teacher),
                }, weights={"contrastive": 1.0, "similarity_kd": 1.0, "attention_kd": 5.0})

                # multi-precision outputs (the student's last module is a MultiPrecisionQuantizer):
                loss = WeightedCombinationLoss(student, {
                    "contrastive": MultiPrecisionLoss(student, MultipleNegativesRankingLoss(student)),
                    "similarity_kd": MultiPrecisionLoss(student, SimilarityDistributionDistillationLoss(student, teacher)),
                })
        """
        super().__init__()
        if not losses:
            raise ValueError("WeightedCombinationLoss needs at least one component loss")
        self.model = model
        self.losses = nn.ModuleDict(dict(losses))
        weights = dict(weights or {})
        unknown = set(weights) - set(self.losses)
        if unknown:
            raise ValueError(f"weights given for unknown components {sorted(unknown)}; components: {list(self.losses)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.losses}
        teachers = []
        for name, loss in self.losses.items():
            inner = _inner(loss)
            if uses_gradient_cache(inner) or uses_gradient_cache(loss):
                raise ValueError(f"component {name!r} ({type(inner).__name__}) runs its own cached forward passes: use it alone")
            if inner is not loss and not multi_precision_wrappable(inner):  # MultiPrecisionLoss checks it too
                raise ValueError(
                    f"component {name!r}: MultiPrecisionLoss cannot apply {type(inner).__name__} per precision: "
                    f"{why_not_multi_precision_wrappable(inner)}; add it as its own component"
                )
            if needs_teacher(inner):
                if inner.teacher is not None:
                    teachers.append(inner.teacher)
            elif not hasattr(inner, "compute_loss_from_embeddings"):
                raise ValueError(f"component {name!r} ({type(inner).__name__}) has no compute_loss_from_embeddings")
        if any(t is not teachers[0] for t in teachers[1:]):
            raise ValueError("all distillation components must share the same FrozenTeacher object")
        self.teacher = teachers[0] if teachers else None
        attention = [loss for loss in self.losses.values() if isinstance(loss, AttentionRelationDistillationLoss)]
        if len(attention) > 1:
            raise ValueError("use a single AttentionRelationDistillationLoss (list several layer pairs in it instead)")
        self.attention_loss = attention[0] if attention else None
        hidden = [loss for loss in self.losses.values() if isinstance(loss, HiddenStateDistillationLoss)]
        if len(hidden) > 1:
            raise ValueError("use a single HiddenStateDistillationLoss (list several layers in it instead)")
        self.hidden_state_loss = hidden[0] if hidden else None

    def _needs_live_teacher_embeddings(self) -> bool:
        return any(
            isinstance(_inner(l), SimilarityDistributionDistillationLoss) and _inner(l).teacher is not None
            for l in self.losses.values()
        )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        with ExitStack() as stack:
            for quantizer in self._quantizers():  # DDP: the ranges count as used in the forward
                stack.enter_context(quantizer_tied_to_forward(quantizer))
            student_embeddings, teacher_embeddings, attention_terms = self._forward_columns(sentence_features)

        components = {}
        for name, loss in self.losses.items():
            if isinstance(loss, AttentionRelationDistillationLoss):
                value = torch.stack(attention_terms["attention"]).mean()
            elif isinstance(loss, HiddenStateDistillationLoss):
                value = torch.stack(attention_terms["hidden"]).mean()
            elif isinstance(loss, MultiPrecisionLoss):
                value = self._multi_precision_value(name, loss, student_embeddings, teacher_embeddings, labels)
            else:
                value = self._output_value(name, loss, student_embeddings, teacher_embeddings, labels)
            components[name] = self.weights[name] * value
        return components

    def _quantizers(self) -> list[nn.Module]:
        """The output quantizers the components fake-quantize with (one object, in practice)."""
        found = {}
        for loss in self.losses.values():
            quantizer = getattr(loss, "quantizer", None)
            if isinstance(quantizer, nn.Module):
                found[id(quantizer)] = quantizer
        return list(found.values())

    def _forward_columns(self, sentence_features: list[dict[str, Tensor]]):
        """One student (and, when needed, one teacher) forward per column; the attention-relation and hidden-state
        terms per column when those components are present (captured by hooks during the same passes)."""
        attention, hidden = self.attention_loss, self.hidden_state_loss
        captures = {}
        if attention is not None:
            captures["attention"] = (QKVCapture(self.model, [s for s, _ in attention.layer_pairs]),
                                     QKVCapture(self.teacher.model, [t for _, t in attention.layer_pairs]))
        if hidden is not None:
            captures["hidden"] = (HiddenStateCapture(self.model, hidden.student_layers),
                                  HiddenStateCapture(self.teacher.model, sorted(set(hidden.teacher_layers))))
        terms = {name: [] for name in captures}
        live_teacher = bool(captures) or self._needs_live_teacher_embeddings()
        student_embeddings, teacher_embeddings = [], []
        with ExitStack() as stack:
            for s_cap, t_cap in captures.values():
                stack.enter_context(s_cap)
                stack.enter_context(t_cap)
            for features in sentence_features:
                student_embeddings.append(self.model(dict(features))["sentence_embedding"])
                if live_teacher:
                    teacher_embeddings.append(self.teacher.embed(features))
                mask = features["attention_mask"]
                if attention is not None:
                    s_cap, t_cap = captures["attention"]
                    terms["attention"].append(attention.compute_loss_from_projections(s_cap.pop(), t_cap.pop(), mask))
                if hidden is not None:
                    s_cap, t_cap = captures["hidden"]
                    terms["hidden"].append(hidden.compute_loss_from_hidden_states(s_cap.pop(), t_cap.pop(), mask))
        return student_embeddings, teacher_embeddings, terms

    @staticmethod
    def _output_value(name: str, loss: nn.Module, student_embeddings, teacher_embeddings, labels) -> Tensor:
        """One component that reads the output embeddings (float, or fake-quantized by a MultiPrecisionLoss)."""
        if isinstance(loss, SimilarityDistributionDistillationLoss):
            if loss.teacher is not None:
                return loss.compute_loss_from_embeddings(student_embeddings, teacher_embeddings)
            if labels is None:
                raise ValueError(f"component {name!r} has no teacher and the batch has no precomputed teacher scores")
            return loss.compute_loss_from_labels(student_embeddings, labels)
        return loss.compute_loss_from_embeddings(student_embeddings, labels)

    def _multi_precision_value(self, name, loss: MultiPrecisionLoss, student_embeddings, teacher_embeddings, labels):
        inner, quantizer = loss.loss, loss.quantizer
        map_teacher = isinstance(inner, EmbeddingMSEDistillationLoss)  # compares coordinates, not similarities

        def at_bits(quantized: list[Tensor], bit_labels, bits: int) -> Tensor:
            if getattr(loss, "self_distillation", False):  # target: the student's own float output, detached
                return inner.compute_loss_from_embeddings(quantized, [s.detach() for s in student_embeddings])
            teacher = teacher_embeddings
            if map_teacher:
                teacher = [quantize_labels(t, quantizer, bits, quantizer.embedding_dimension) for t in teacher]
            return self._output_value(name, inner, quantized, teacher, bit_labels)

        return loss.compute_loss_over_precisions(student_embeddings, labels, at_bits)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "losses": {
                name: {"type": type(loss).__name__, **(loss.get_config_dict() if hasattr(loss, "get_config_dict") else {})}
                for name, loss in self.losses.items()
            },
        }
