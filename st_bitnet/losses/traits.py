"""What a loss class needs and allows, declared by the class itself and read by the recipe checks and the wrappers.

A loss class (or instance) may set:

* ``needs_teacher`` (default False): it distills from a teacher model (live, or through precomputed scores), so a
  recipe naming it needs a ``teacher`` section.
* ``accepts_teacher_embeddings`` (default False): it reads the teacher's embeddings precomputed into the labels
  (:func:`st_bitnet.teacher.precompute_teacher_embeddings`) in place of a live teacher.
* ``labels_in_output_space`` (default True): embedding-shaped ``labels`` are targets in the output's coordinates (as
  sentence-transformers' ``MSELoss`` reads teacher embeddings), so :class:`~st_bitnet.losses.MultiPrecisionLoss` maps
  them into each precision's space; False when the loss only compares them by similarity (they stay float).
* ``multi_precision_wrappable`` (default True): :class:`~st_bitnet.losses.MultiPrecisionLoss` may apply it at every
  precision; a class that sets it False says why in ``not_multi_precision_wrappable_because``.

sentence-transformers' losses set none of these and get the defaults (no teacher, wrappable).

Example::

    from st_bitnet.losses import AttentionRelationDistillationLoss, traits
    traits.needs_teacher(AttentionRelationDistillationLoss)             # True
    traits.multi_precision_wrappable(AttentionRelationDistillationLoss)  # False
"""

from __future__ import annotations

from typing import Any


def needs_teacher(loss: Any) -> bool:
    """Whether the loss class (or instance) ``loss`` distills from a teacher model."""
    return bool(getattr(loss, "needs_teacher", False))


def accepts_teacher_embeddings(loss: Any) -> bool:
    """Whether the loss class (or instance) ``loss`` can distill from precomputed teacher embeddings (labels)."""
    return bool(getattr(loss, "accepts_teacher_embeddings", False))


def labels_in_output_space(loss: Any) -> bool:
    """Whether embedding-shaped labels of the loss class (or instance) ``loss`` are coordinates of its output."""
    return bool(getattr(loss, "labels_in_output_space", True))


def multi_precision_wrappable(loss: Any) -> bool:
    """Whether :class:`~st_bitnet.losses.MultiPrecisionLoss` may apply the loss class (or instance) ``loss`` at
    every precision."""
    return bool(getattr(loss, "multi_precision_wrappable", True))


def why_not_multi_precision_wrappable(loss: Any) -> str:
    """The reason the loss class (or instance) ``loss`` gives for not being wrappable (empty when it is)."""
    if multi_precision_wrappable(loss):
        return ""
    return getattr(loss, "not_multi_precision_wrappable_because", "it cannot be applied per precision")
