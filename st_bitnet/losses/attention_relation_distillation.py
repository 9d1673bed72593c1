from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..introspection import unwrap
from ..teacher import check_same_tokenizer
from .qkv_capture import RELATIONS, QKVCapture, num_attention_layers


def _config_of(model) -> Any:
    for module in unwrap(model).modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            return config
    return None


class AttentionRelationDistillationLoss(nn.Module):
    needs_teacher = True
    multi_precision_wrappable = False
    not_multi_precision_wrappable_because = "it does not read the output embedding"

    def __init__(
        self,
        model,
        teacher,
        layers: Sequence[int] | Sequence[Sequence[int]] | None = None,
        num_relation_heads: int | None = None,
        relations: Sequence[str] = RELATIONS,
        relation_weights: Sequence[float] | None = None,
        check_tokenizer: bool = True,
    ) -> None:
        """
        MiniLMv2 attention-relation distillation. For each chosen (student layer, teacher layer) pair and each
        of the query, key and value projections, the projection output ``X`` (``(B, L, D)``) is split into
        ``num_relation_heads`` relation heads ``X_r`` (``(B, L, D / R)``) and turned into a token-to-token
        relation ``softmax(X_r X_r^T / sqrt(D / R))`` (padding keys masked). The loss is
        ``KL(teacher relation || student relation)``, averaged over batch, relation heads and real
        (non-padding) query tokens, summed over Q-Q, K-K and V-V (optionally weighted) and averaged over the
        layer pairs.

        Relations are computed from the q/k/v linear layers' outputs, captured with forward hooks, so the
        student keeps using SDPA / flash attention: no attention probabilities are materialised inside the
        model. Because the relation is ``L x L`` whatever ``D`` is, teacher and student may differ in hidden
        size, in head count and in depth; grouped-query attention is handled the same way (K and V simply
        have a smaller ``D``, split into the same ``R`` relation heads). ``R`` must divide every projection
        width involved.

        Args:
            model: the student SentenceTransformer.
            teacher: a :class:`~st_bitnet.teacher.FrozenTeacher` sharing the student's tokenizer.
            layers: which layers to distill. ``None``: the last layer of each (MiniLMv2's choice for small
                students). A list of ints: student layers, each mapped to the teacher layer at the same
                relative depth. A list of ``[student_layer, teacher_layer]`` pairs: explicit. Negative
                indices count from the end.
            num_relation_heads: ``R``; defaults to the student's ``num_attention_heads``.
            relations: any of ``"query"``, ``"key"``, ``"value"``.
            relation_weights: one weight per relation (default 1 each, as in MiniLMv2).
            check_tokenizer: refuse a teacher whose tokenizer differs (token positions must line up).

        References:
            - MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained
              Transformers, https://arxiv.org/abs/2012.15828
            - BitDistill, https://arxiv.org/abs/2510.13998 (uses it to recover 1.58-bit models)

        Requirements:
            1. a teacher with the same tokenizer and separate q/k/v projections (no fused QKV)

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | any number of text columns                      | any    |
            +-------------------------------------------------+--------+

        Example:
            ::

                from st_bitnet.losses import AttentionRelationDistillationLoss
                loss = AttentionRelationDistillationLoss(student, teacher=FrozenTeacher(teacher_path, student=student),
                                                         layers=[-1], num_relation_heads=12)
        """
        super().__init__()
        if teacher is None:
            raise ValueError("AttentionRelationDistillationLoss needs a teacher (FrozenTeacher); none was given")
        self.model = model
        self.teacher = teacher
        if check_tokenizer:
            check_same_tokenizer(model, teacher.model)
        relations = tuple(relations)
        unknown = set(relations) - set(RELATIONS)
        if not relations or unknown:
            raise ValueError(f"relations must be a non-empty subset of {RELATIONS}, got {relations}")
        self.relations = relations
        self.relation_weights = tuple(float(w) for w in (relation_weights or [1.0] * len(relations)))
        if len(self.relation_weights) != len(relations):
            raise ValueError("relation_weights needs one weight per relation")
        if num_relation_heads is None:
            config = _config_of(model)
            num_relation_heads = getattr(config, "num_attention_heads", None)
            if num_relation_heads is None:
                raise ValueError("could not read num_attention_heads from the student: pass num_relation_heads")
        if num_relation_heads < 1:
            raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
        self.num_relation_heads = int(num_relation_heads)
        self.layer_pairs = self.resolve_layers(layers, num_attention_layers(model), num_attention_layers(teacher.model))

    @staticmethod
    def resolve_layers(layers, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
        """Normalise ``layers`` into non-negative ``(student_layer, teacher_layer)`` pairs."""

        def index(layer: int, depth: int, who: str) -> int:
            i = layer + depth if layer < 0 else layer
            if not 0 <= i < depth:
                raise ValueError(f"{who} layer {layer} is out of range (the {who} has {depth} attention layers)")
            return i

        if layers is None:
            layers = [-1]
        pairs = []
        for item in layers:
            if isinstance(item, (list, tuple)):
                if len(item) != 2:
                    raise ValueError(f"a layer pair must be [student_layer, teacher_layer], got {item}")
                pairs.append((index(item[0], student_depth, "student"), index(item[1], teacher_depth, "teacher")))
            else:
                s = index(int(item), student_depth, "student")
                # Same relative depth: the student's last layer maps to the teacher's last layer.
                t = round((s + 1) * teacher_depth / student_depth) - 1
                pairs.append((s, max(0, min(teacher_depth - 1, t))))
        if not pairs:
            raise ValueError("layers must name at least one layer")
        return pairs

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        losses = []
        student_layers = [s for s, _ in self.layer_pairs]
        teacher_layers = [t for _, t in self.layer_pairs]
        with QKVCapture(self.model, student_layers) as s_cap, QKVCapture(self.teacher.model, teacher_layers) as t_cap:
            for features in sentence_features:
                self.model(dict(features))
                self.teacher(features)
                losses.append(self.compute_loss_from_projections(s_cap.pop(), t_cap.pop(), features["attention_mask"]))
        return torch.stack(losses).mean()

    def compute_loss_from_projections(
        self,
        student: dict[int, dict[str, Tensor]],
        teacher: dict[int, dict[str, Tensor]],
        attention_mask: Tensor | None,
    ) -> Tensor:
        """The loss from captured projections ``{layer: {"query"|"key"|"value": (B, L, D)}}`` of both models."""
        per_layer = []
        for s_layer, t_layer in self.layer_pairs:
            total = 0.0
            for relation, weight in zip(self.relations, self.relation_weights):
                s_x = student[s_layer][relation]
                t_x = teacher[t_layer][relation].detach().to(s_x.device)
                total = total + weight * self.relation_kl(s_x, t_x, attention_mask, self.num_relation_heads)
            per_layer.append(total)
        return torch.stack(per_layer).mean()

    @staticmethod
    def relation_log_probs(x: Tensor, num_heads: int, attention_mask: Tensor | None) -> Tensor:
        """``log softmax(X_r X_r^T / sqrt(d_r))`` per relation head: ``(B, L, D)`` -> ``(B, R, L, L)``."""
        batch, length, width = x.shape
        if width % num_heads:
            raise ValueError(f"{num_heads} relation heads do not divide a projection of width {width}")
        head_dim = width // num_heads
        heads = x.float().view(batch, length, num_heads, head_dim).transpose(1, 2)
        scores = heads @ heads.transpose(-1, -2) / head_dim**0.5
        if attention_mask is not None:
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    @classmethod
    def relation_kl(cls, student_x: Tensor, teacher_x: Tensor, attention_mask: Tensor | None, num_heads: int) -> Tensor:
        """``KL(teacher relation || student relation)`` averaged over batch, heads and real query tokens."""
        if student_x.shape[:2] != teacher_x.shape[:2]:
            raise ValueError(
                f"student and teacher sequences differ in shape ({tuple(student_x.shape[:2])} vs "
                f"{tuple(teacher_x.shape[:2])}): they must see the same token ids"
            )
        s_log = cls.relation_log_probs(student_x, num_heads, attention_mask)
        t_log = cls.relation_log_probs(teacher_x, num_heads, attention_mask)
        kl = F.kl_div(s_log, t_log, log_target=True, reduction="none")
        if attention_mask is None:
            return kl.sum(-1).mean()
        keep = attention_mask.to(device=kl.device, dtype=kl.dtype)
        # Padding keys carry ~0 probability on both sides; zero them exactly so they add nothing.
        kl = (kl * keep[:, None, None, :]).sum(-1)  # (B, R, L)
        rows = keep[:, None, :].expand_as(kl)
        return (kl * rows).sum() / rows.sum().clamp(min=1)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "num_relation_heads": self.num_relation_heads,
            "relations": list(self.relations),
            "relation_weights": list(self.relation_weights),
        }

    @property
    def citation(self) -> str:
        return """
@misc{wang2021minilmv2,
    title={MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers},
    author={Wenhui Wang and Hangbo Bao and Shaohan Huang and Li Dong and Furu Wei},
    year={2021},
    eprint={2012.15828},
    archivePrefix={arXiv},
}
"""
