from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .hidden_state_capture import HiddenStateCapture, find_transformer_blocks, resolve_layers


def uniform_layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """Teacher block matched to each student block: the same index for equal depths, else evenly spaced
    (student block ``i`` reads teacher block ``round((i + 1) * T / S) - 1``, so the last blocks always pair)."""
    return [round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)]


class HiddenStateDistillationLoss(nn.Module):
    needs_teacher = True
    multi_precision_wrappable = False
    not_multi_precision_wrappable_because = "it does not read the output embedding"

    def __init__(self, model, teacher, layers: list[int] | None = None, normalize: bool = True) -> None:
        """
        Intermediate-layer distillation: the student's token hidden states after each chosen transformer block
        are trained to match the frozen full-precision teacher's after the matching block (TinyBERT's
        hidden-state loss), on the same token ids.

        Per block, the loss is the masked squared error over real tokens, ``sum |h_s - h_t|^2 / sum |h_t|^2`` with
        ``normalize=True`` (each block's error relative to the teacher's energy there, so blocks with large
        activations do not dominate and the loss reads as a fraction: 0.01 = 1% relative error), or the plain
        mean squared error per element with ``normalize=False``; blocks are averaged. Every block gets its own
        dense target, so a ternary student whose error compounds through depth is corrected where the error
        arises, which makes far better use of a small training budget than an output-only loss.

        Args:
            model: the student SentenceTransformer.
            teacher: a :class:`~st_bitnet.teacher.FrozenTeacher` with the same tokenizer (token positions
                must line up).
            layers: student block indices to distill (negative counts from the end); None: every block. The
                teacher block of each is the same index for equal depths, else evenly spaced
                (:func:`uniform_layer_map`).
            normalize: divide each block's squared error by the teacher's squared norm there.

        References:
            - TinyBERT: Distilling BERT for Natural Language Understanding, https://arxiv.org/abs/1909.10351
            - BitDistill, https://arxiv.org/abs/2510.13998

        Requirements:
            1. a live teacher of the same architecture family (same tokenizer; hidden sizes equal)

        Inputs:
            +-----------------------------------+--------+
            | Texts                             | Labels |
            +===================================+========+
            | any number of text columns        | none   |
            +-----------------------------------+--------+

        Example:
            ::

                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                import st_bitnet
                from st_bitnet.losses import HiddenStateDistillationLoss
                from st_bitnet.teacher import FrozenTeacher

                student = st_bitnet.convert(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"))
                teacher = FrozenTeacher("sentence-transformers/all-MiniLM-L6-v2", student=student)
                loss = HiddenStateDistillationLoss(student, teacher)
                trainer = SentenceTransformerTrainer(model=student, train_dataset=texts, loss=loss)
        """
        super().__init__()
        if teacher is None:
            raise ValueError("HiddenStateDistillationLoss needs a live teacher (teacher=FrozenTeacher(...))")
        self.model = model
        self.teacher = teacher
        self.normalize = bool(normalize)
        student_depth = len(find_transformer_blocks(model))
        teacher_depth = len(find_transformer_blocks(teacher.model))
        self.student_layers = resolve_layers(layers, student_depth)
        mapping = uniform_layer_map(student_depth, teacher_depth)
        self.teacher_layers = [mapping[i] for i in self.student_layers]

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.student_layers, self.teacher_layers))

    def compute_loss_from_hidden_states(
        self, student: dict[int, Tensor], teacher: dict[int, Tensor], attention_mask: Tensor
    ) -> Tensor:
        """The loss from captured states: ``student[i]`` / ``teacher[j]`` of shape ``(batch, seq, hidden)`` for every
        pair ``(i, j)`` of :attr:`layer_pairs`; ``attention_mask`` ``(batch, seq)`` marks real tokens."""
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        terms = []
        for s_layer, t_layer in self.layer_pairs:
            s, t = student[s_layer].float(), teacher[t_layer].float().detach()
            if s.shape != t.shape:
                raise ValueError(
                    f"student block {s_layer} gives hidden states of shape {tuple(s.shape)}, teacher block {t_layer} "
                    f"{tuple(t.shape)}: hidden-state distillation needs equal widths"
                )
            error = ((s - t) ** 2 * mask).sum()
            if self.normalize:
                terms.append(error / (t**2 * mask).sum().clamp(min=1e-12))
            else:
                terms.append(error / (mask.sum() * s.shape[-1]).clamp(min=1.0))
        return torch.stack(terms).mean()

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        terms = []
        s_cap = HiddenStateCapture(self.model, self.student_layers)
        t_cap = HiddenStateCapture(self.teacher.model, sorted(set(self.teacher_layers)))
        with s_cap, t_cap:
            for features in sentence_features:
                self.model(dict(features))
                self.teacher(features)
                terms.append(self.compute_loss_from_hidden_states(s_cap.pop(), t_cap.pop(), features["attention_mask"]))
        return torch.stack(terms).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"layer_pairs": self.layer_pairs, "normalize": self.normalize}

    @property
    def citation(self) -> str:
        return """
@inproceedings{jiao2020tinybert,
    title={TinyBERT: Distilling BERT for Natural Language Understanding},
    author={Jiao, Xiaoqi and Yin, Yichun and Shang, Lifeng and Jiang, Xin and Chen, Xiao and Li, Linlin and Wang, Fang and Liu, Qun},
    booktitle={Findings of EMNLP},
    year={2020}
}
"""
