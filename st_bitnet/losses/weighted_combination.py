from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .attention_relation_distillation import AttentionRelationDistillationLoss
from .qkv_capture import QKVCapture
from .similarity_distribution_distillation import SimilarityDistributionDistillationLoss


class WeightedCombinationLoss(nn.Module):
    def __init__(self, model, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        """
        A weighted sum of losses that share **one** student forward pass (and one teacher forward pass) per
        input column, returning every weighted component separately so the trainer logs each of them.

        Supported components: any loss with ``compute_loss_from_embeddings(embeddings, labels)`` (e.g.
        sentence-transformers' ``MultipleNegativesRankingLoss``, ``CoSENTLoss``),
        :class:`SimilarityDistributionDistillationLoss` and :class:`AttentionRelationDistillationLoss`.
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
            if type(loss).__name__.startswith("Cached"):
                raise ValueError(f"component {name!r} ({type(loss).__name__}) runs its own cached forward passes: use it alone")
            if isinstance(loss, (SimilarityDistributionDistillationLoss, AttentionRelationDistillationLoss)):
                if loss.teacher is not None:
                    teachers.append(loss.teacher)
            elif not hasattr(loss, "compute_loss_from_embeddings"):
                raise ValueError(f"component {name!r} ({type(loss).__name__}) has no compute_loss_from_embeddings")
        if any(t is not teachers[0] for t in teachers[1:]):
            raise ValueError("all distillation components must share the same FrozenTeacher object")
        self.teacher = teachers[0] if teachers else None
        attention = [loss for loss in self.losses.values() if isinstance(loss, AttentionRelationDistillationLoss)]
        if len(attention) > 1:
            raise ValueError("use a single AttentionRelationDistillationLoss (list several layer pairs in it instead)")
        self.attention_loss = attention[0] if attention else None

    def _needs_live_teacher_embeddings(self) -> bool:
        return any(isinstance(l, SimilarityDistributionDistillationLoss) and l.teacher is not None for l in self.losses.values())

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        attention = self.attention_loss
        student_embeddings, teacher_embeddings, attention_terms = [], [], []
        if attention is not None:
            s_cap = QKVCapture(self.model, [s for s, _ in attention.layer_pairs])
            t_cap = QKVCapture(self.teacher.model, [t for _, t in attention.layer_pairs])
            with s_cap, t_cap:
                for features in sentence_features:
                    student_embeddings.append(self.model(dict(features))["sentence_embedding"])
                    teacher_embeddings.append(self.teacher.embed(features))
                    attention_terms.append(
                        attention.compute_loss_from_projections(s_cap.pop(), t_cap.pop(), features["attention_mask"])
                    )
        else:
            for features in sentence_features:
                student_embeddings.append(self.model(dict(features))["sentence_embedding"])
                if self._needs_live_teacher_embeddings():
                    teacher_embeddings.append(self.teacher.embed(features))

        components = {}
        for name, loss in self.losses.items():
            if isinstance(loss, AttentionRelationDistillationLoss):
                value = torch.stack(attention_terms).mean()
            elif isinstance(loss, SimilarityDistributionDistillationLoss):
                if loss.teacher is not None:
                    value = loss.compute_loss_from_embeddings(student_embeddings, teacher_embeddings)
                elif labels is None:
                    raise ValueError(f"component {name!r} has no teacher and the batch has no precomputed teacher scores")
                else:
                    value = loss.compute_loss_from_labels(student_embeddings, labels)
            else:
                value = loss.compute_loss_from_embeddings(student_embeddings, labels)
            components[name] = self.weights[name] * value
        return components

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "losses": {
                name: {"type": type(loss).__name__, **(loss.get_config_dict() if hasattr(loss, "get_config_dict") else {})}
                for name, loss in self.losses.items()
            },
        }
