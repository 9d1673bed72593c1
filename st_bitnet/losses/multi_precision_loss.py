"""``MultiPrecisionLoss``: train one embedding model for 16/8/4/2/1-bit outputs, in the style of ``MatryoshkaLoss``."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from st_bitnet.multi_precision.encode import find_quantizer
from st_bitnet.multi_precision.precision import BITS, resolve_bits
from st_bitnet.multi_precision.quantizer import MultiPrecisionQuantizer

from .traits import labels_in_output_space, multi_precision_wrappable, why_not_multi_precision_wrappable

try:  # sentence-transformers >= 6.0
    from sentence_transformers.base.losses.gradcache import uses_gradient_cache
except ImportError:  # pragma: no cover - older releases mark cached losses by name only
    def uses_gradient_cache(loss: Any) -> bool:
        return getattr(loss, "uses_gradient_cache", False)


def quantize_labels(labels: Any, quantizer: MultiPrecisionQuantizer, bits: int, embedding_dimension: int) -> Any:
    """Map embedding-shaped labels (distillation targets) into the space of the ``bits``-bit output.

    Low-bit outputs live in the quantizer's normalized space, so a teacher embedding is compared there too:
    ``clamp((y R - offset) / scale, -1, 1)`` for 8/4/2 bits and the sign for 1 bit. Other labels pass through.
    """
    if bits == 16 or not isinstance(labels, Tensor) or labels.ndim not in (2, 3) or labels.size(-1) != embedding_dimension:
        return labels
    with torch.no_grad():
        labels_float = labels.to(quantizer.offset.dtype)
        if bits == 1:
            return torch.where(quantizer.binary_positive(labels_float), 1.0, -1.0).to(labels.dtype)
        return quantizer.normalize(labels_float).clamp(-1.0, 1.0).to(labels.dtype)


@contextmanager
def quantizer_tied_to_forward(quantizer: MultiPrecisionQuantizer) -> Iterator[None]:
    """While active, every model forward ties the quantizer's ranges into its output with a zero-valued term.

    The losses fake-quantize the float output *after* the model's forward, so under ``DistributedDataParallel``
    (which searches each forward's output graph for the parameters it used) the ranges look unused, are marked
    ready early, and their gradient then arrives a second time ("Expected to mark a variable ready only once").
    ``x + 0 * (offset.sum() + log_scale.sum() + ...)`` (every quantizer parameter, the rotation's too) leaves every
    value and gradient as it was and makes them part of the forward. The hook runs inside the model (the quantizer
    is its last module), so inside DDP's forward. The block also fixes the rotation for its duration (one ``R`` per
    loss forward).
    """

    def tie(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, dict) and isinstance(output.get("sentence_embedding"), Tensor):
            zero = sum(parameter.sum() for parameter in module.parameters()) * 0.0
            output["sentence_embedding"] = output["sentence_embedding"] + zero.to(output["sentence_embedding"].dtype)
        return output

    handle = quantizer.register_forward_hook(tie)
    try:
        with quantizer.rotation_fixed():  # one R per loss forward, shared by every column and precision
            yield
    finally:
        handle.remove()


class _QuantizingForward:
    """Caches the model's float output on the first precision and re-quantizes it for every other precision.

    Applied to ``SentenceTransformer.forward`` for the duration of one :meth:`MultiPrecisionLoss.forward`, so the
    backbone runs once per batch however many precisions are trained.
    """

    def __init__(self, fn, quantizer: MultiPrecisionQuantizer) -> None:
        self.fn = fn
        self.quantizer = quantizer
        self.bits: int | None = None
        self.cache: list[dict[str, Tensor]] = []
        self.filling = True
        self.index = 0

    def set_bits(self, bits: int, first: bool) -> None:
        self.bits = bits
        self.filling = first
        self.index = 0

    def __call__(self, features: dict[str, Tensor], *args, **kwargs) -> dict[str, Tensor]:
        if self.filling:
            output = self.fn(features, *args, **kwargs)
            self.cache.append(output)
        else:
            output = self.cache[self.index]
        self.index += 1
        # A shallow copy: the cached float embedding must survive for the next precision.
        quantized = dict(output)
        quantized["sentence_embedding"] = self.quantizer.fake_quantize(output["sentence_embedding"], self.bits)
        return quantized


class _QuantizingCalculateLoss:
    """For gradient-caching losses (``CachedMultipleNegativesRankingLoss`` ...): quantize the cached reps per precision."""

    def __init__(self, fn, quantizer: MultiPrecisionQuantizer, owner: MultiPrecisionLoss) -> None:
        self.fn = fn
        self.quantizer = quantizer
        self.owner = owner

    def __call__(self, reps: list[list[Tensor]], *args, **kwargs) -> Tensor:
        loss = 0.0
        for bits, weight in self.owner._sample_precisions():
            with self.quantizer.rotation_fixed():  # one R (and one graph) per precision, freed by its backward
                quantized = [[self.quantizer.fake_quantize(r, bits) for r in minibatch] for minibatch in reps]
            if torch.is_grad_enabled():
                # Detach so the inner loss's mini-batch backward passes leave the quantization graph intact,
                # then continue the backward pass through it (weighted) ourselves, in one call.
                leaves = [[r.detach().requires_grad_() for r in minibatch] for minibatch in quantized]
                loss = loss + weight * self.fn(leaves, *args, **kwargs)
                pairs = [
                    (q, weight * leaf.grad)
                    for q_minibatch, l_minibatch in zip(quantized, leaves)
                    for q, leaf in zip(q_minibatch, l_minibatch)
                    if leaf.grad is not None
                ]
                if pairs:
                    torch.autograd.backward([q for q, _ in pairs], [g for _, g in pairs])
            else:
                loss = loss + weight * self.fn(quantized, *args, **kwargs)
        return loss


class MultiPrecisionLoss(nn.Module):
    multi_precision_wrappable = False
    not_multi_precision_wrappable_because = "it already trains the low-bit outputs: wrap the loss once"

    def __init__(
        self,
        model,
        loss: nn.Module,
        precisions: Sequence[int | str] = BITS,
        precision_weights: Sequence[float] | None = None,
        n_precisions_per_step: int = -1,
        quantizer: MultiPrecisionQuantizer | None = None,
    ) -> None:
        """
        Wraps any sentence-transformers loss and sums it over output precisions, so one model serves 16, 8, 4, 2 and
        1-bit embeddings. The backbone runs once per batch; each precision re-quantizes the same float embedding
        with the model's :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer` (straight-through gradients),
        exactly like ``MatryoshkaLoss`` re-truncates one forward pass per dimension.

        Args:
            model: A ``SentenceTransformer`` whose last module is a ``MultiPrecisionQuantizer``.
            loss: The loss to apply at every precision, e.g. ``MultipleNegativesRankingLoss``, ``CoSENTLoss``,
                ``MSELoss`` (embedding-shaped labels are mapped into each precision's space), or a cached loss.
            precisions: Bit widths (or names such as ``"2bit"``) to train; each must be served by the quantizer.
            precision_weights: One weight per precision (default 1 each).
            n_precisions_per_step: If > 0, train a random subset of this many precisions per step.
            quantizer: Fake-quantize with this quantizer instead of the model's last module (``model`` may then be
                None, for the tensor-only ``compute_loss_*`` methods).

        References:
            - Nair et al., "Matryoshka Quantization", 2025: https://huggingface.co/papers/2502.06786
            - Kusupati et al., "Matryoshka Representation Learning", 2022: https://huggingface.co/papers/2205.13147

        Inputs:
            +-----------------------------+--------+
            | Inputs                      | Labels |
            +=============================+========+
            | any (those of ``loss``)     | any    |
            +-----------------------------+--------+

        Example:
            ::

                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
                from st_bitnet.losses import MultiPrecisionLoss
                from st_bitnet.multi_precision import MultiPrecisionQuantizer

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                model.append(MultiPrecisionQuantizer.from_embeddings(model.encode(calibration_texts)))
                loss = MultiPrecisionLoss(model, MultipleNegativesRankingLoss(model), precisions=[16, 8, 4, 2, 1])
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        if isinstance(loss, dict):
            raise ValueError("MultiPrecisionLoss wraps one loss, not a dict of them: put it inside a WeightedCombinationLoss")
        if not multi_precision_wrappable(loss):
            raise ValueError(
                f"MultiPrecisionLoss cannot wrap a {type(loss).__name__}: {why_not_multi_precision_wrappable(loss)}"
            )
        quantizer = quantizer if quantizer is not None else find_quantizer(model) if model is not None else None
        if quantizer is None:
            raise ValueError(
                "MultiPrecisionLoss needs a MultiPrecisionQuantizer as the model's last module: "
                "model.append(MultiPrecisionQuantizer.from_embeddings(model.encode(calibration_texts)))."
            )
        if not precisions:
            raise ValueError("precisions must name at least one bit width.")
        bits = [resolve_bits(p) for p in precisions]
        if len(set(bits)) != len(bits):
            raise ValueError(f"Duplicate precisions in {list(precisions)}.")
        unserved = [b for b in bits if b not in quantizer.precisions]
        if unserved:
            raise ValueError(f"The model's quantizer serves {quantizer.precisions} bits, not {unserved}.")
        if precision_weights is None:
            precision_weights = [1.0] * len(bits)
        elif len(precision_weights) != len(bits):
            raise ValueError("precision_weights must have one weight per precision.")
        if any(w < 0 for w in precision_weights):
            raise ValueError("precision_weights must be non-negative.")
        order = sorted(range(len(bits)), key=lambda i: -bits[i])  # widest first, like MatryoshkaLoss' dims
        self.model = model
        self.loss = loss
        self.quantizer = quantizer
        self.precisions: tuple[int, ...] = tuple(bits[i] for i in order)
        self.precision_weights: tuple[float, ...] = tuple(float(precision_weights[i]) for i in order)
        self.n_precisions_per_step = n_precisions_per_step
        self.uses_gradient_cache = uses_gradient_cache(loss)
        if self.uses_gradient_cache:
            loss.calculate_loss = _QuantizingCalculateLoss(loss.calculate_loss, quantizer, self)

    def _sample_precisions(self) -> list[tuple[int, float]]:
        pairs = list(zip(self.precisions, self.precision_weights))
        if 0 < self.n_precisions_per_step < len(pairs):
            chosen = sorted(random.sample(range(len(pairs)), self.n_precisions_per_step))
            pairs = [pairs[i] for i in chosen]
        return pairs

    @staticmethod
    def combine(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        """The weighted sum of per-precision losses (tensor only)."""
        if len(losses) != len(weights) or not losses:
            raise ValueError("Need one weight per loss and at least one loss.")
        return sum(w * l for w, l in zip(weights, losses))

    def compute_loss_over_precisions(
        self,
        embeddings: Sequence[Tensor],
        labels: Any,
        loss_fn: Callable[[list[Tensor], Any, int], Tensor],
    ) -> Tensor:
        """The weighted sum over (sampled) precisions of ``loss_fn(fake_quantized_columns, labels_at_bits, bits)``.

        Tensor-only: ``embeddings`` are the float output columns (one forward pass, shared by every precision);
        embedding-shaped ``labels`` are mapped into each precision's space (:func:`quantize_labels`) unless the inner
        loss compares them by similarity only (``labels_in_output_space = False``, :mod:`~st_bitnet.losses.traits`).
        :class:`~st_bitnet.losses.WeightedCombinationLoss` calls it with its own per-component dispatch, so a
        teacher-driven inner loss reuses the combination's single teacher pass.
        """
        losses, weights = [], []
        with self.quantizer.rotation_fixed():
            for bits, weight in self._sample_precisions():
                quantized = [self.quantizer.fake_quantize(e, bits) for e in embeddings]
                losses.append(loss_fn(quantized, self._labels_at(labels, bits), bits))
                weights.append(weight)
        return self.combine(losses, weights)

    def _labels_at(self, labels: Any, bits: int) -> Any:
        """``labels`` as the inner loss reads them at ``bits``: mapped into the precision's space when the inner loss
        takes embedding-shaped labels as output coordinates (:func:`quantize_labels`), unchanged otherwise."""
        if not labels_in_output_space(self.loss):
            return labels
        return quantize_labels(labels, self.quantizer, bits, self.quantizer.embedding_dimension)

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Any) -> Tensor:
        """For inner losses with ``compute_loss_from_embeddings`` (``MultipleNegativesRankingLoss``, ``CoSENTLoss``...):
        the multi-precision loss of already computed float embeddings (tensor-only)."""
        inner = getattr(self.loss, "compute_loss_from_embeddings", None)
        if inner is None:
            raise ValueError(f"the inner loss {type(self.loss).__name__} has no compute_loss_from_embeddings")
        return self.compute_loss_over_precisions(embeddings, labels, lambda quantized, bit_labels, _: inner(quantized, bit_labels))

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if self.uses_gradient_cache:
            return self.loss(sentence_features, labels)
        sentence_features = list(sentence_features)
        teacher = getattr(self.loss, "teacher", None)
        if hasattr(teacher, "embed") and labels_in_output_space(self.loss) and hasattr(self.loss, "compute_loss_from_labels"):
            # a live teacher whose embeddings are coordinate targets (embedding MSE): embedded once, then mapped into
            # each precision's space like precomputed teacher embeddings (raw float targets would be the wrong space)
            with torch.no_grad():
                targets = torch.stack([teacher.embed(features) for features in sentence_features], dim=1)
            with quantizer_tied_to_forward(self.quantizer):
                student = [self.model(dict(features))["sentence_embedding"] for features in sentence_features]
            inner = self.loss.compute_loss_from_labels
            return self.compute_loss_over_precisions(student, targets, lambda quantized, bit_labels, _: inner(quantized, bit_labels))
        original_forward = self.model.forward
        decorated = _QuantizingForward(original_forward, self.quantizer)
        losses, weights = [], []
        try:
            self.model.forward = decorated
            with quantizer_tied_to_forward(self.quantizer):
                for i, (bits, weight) in enumerate(self._sample_precisions()):
                    decorated.set_bits(bits, first=i == 0)
                    losses.append(self.loss(sentence_features, self._labels_at(labels, bits)))
                    weights.append(weight)
        finally:
            self.model.forward = original_forward
        return self.combine(losses, weights)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.__class__.__name__,
            "precisions": self.precisions,
            "precision_weights": self.precision_weights,
            "n_precisions_per_step": self.n_precisions_per_step,
        }

    @property
    def citation(self) -> str:
        return """
@misc{nair2025matryoshkaquantization,
    title={Matryoshka Quantization},
    author={Pranav Nair and Puranjay Datta and Jeff Dean and Prateek Jain and Aditya Kusupati},
    year={2025},
    eprint={2502.06786},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
