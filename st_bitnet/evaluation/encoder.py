"""An mteb encoder that serves a model's embeddings at one output precision, encoding each text only once.

A precision sweep evaluates the same texts at 16/8/4/2/1 bits. Running the network once per precision would
cost 5x the time for identical float outputs, so :class:`EmbeddingCache` encodes every (prompt type, text)
once in float32, and :class:`PrecisionEncoder` derives each precision from those cached floats through
``st_bitnet.multi_precision.embed_at_bits`` (trained ranges when the model has them, post-hoc otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# The float reference (the teacher's or the student's unquantized output) is float32.
from ..multi_precision.precision import FLOAT32_BITS as FULL_PRECISION_BITS


class EmbeddingCache:
    """Encodes each (prompt type, text) once in float32 and serves it from memory afterwards.

    Args:
        model: a SentenceTransformer (anything with ``encode``; ``encode_query`` / ``encode_document`` are used
            for query / document prompt types when present, so the model's own prompts apply).
        batch_size: encode batch size.
        show_progress_bar: show sentence-transformers' progress bar for batches of new texts.

    Example::

        cache = EmbeddingCache(model)
        floats = cache.get(["a sentence", "another"])      # encodes
        floats = cache.get(["a sentence"])                 # served from memory
    """

    def __init__(self, model: Any, batch_size: int = 32, show_progress_bar: bool = True) -> None:
        self.model = model
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self._store: dict[tuple[str | None, str], np.ndarray] = {}
        self.encoded_count = 0  # texts actually run through the model (tests check the "once" promise)

    def _encode_function(self, prompt_type: str | None) -> Callable[..., Any]:
        if prompt_type == "query" and hasattr(self.model, "encode_query"):
            return self.model.encode_query
        if prompt_type == "document" and hasattr(self.model, "encode_document"):
            return self.model.encode_document
        return self.model.encode

    def get(self, texts: Sequence[str], prompt_type: str | None = None) -> np.ndarray:
        """Float32 embeddings of ``texts`` (shape ``(len(texts), dim)``), encoding only unseen texts."""
        missing = list(dict.fromkeys(t for t in texts if (prompt_type, t) not in self._store))
        if missing:
            encoded = self._encode_function(prompt_type)(
                missing,
                batch_size=self.batch_size,
                show_progress_bar=self.show_progress_bar and len(missing) > self.batch_size,
                convert_to_numpy=True,
            )
            encoded = np.asarray(encoded, dtype=np.float32)
            for text, vector in zip(missing, encoded):
                self._store[(prompt_type, text)] = vector
            self.encoded_count += len(missing)
        if not texts:
            return np.zeros((0, self.dimension or 0), dtype=np.float32)
        return np.stack([self._store[(prompt_type, t)] for t in texts])

    @property
    def dimension(self) -> int | None:
        for vector in self._store.values():
            return int(vector.shape[-1])
        getter = getattr(self.model, "get_embedding_dimension", None) or getattr(
            self.model, "get_sentence_embedding_dimension", None)  # the name before sentence-transformers 6
        return getter() if callable(getter) else None


@contextlib.contextmanager
def _serve_from(model: Any, embeddings: np.ndarray) -> Iterator[None]:
    """Temporarily make ``model.encode*`` return precomputed float embeddings (instance attributes shadow methods)."""

    def cached_encode(sentences, *args, **kwargs):
        if len(sentences) != len(embeddings):
            raise RuntimeError(
                "embed_at_bits asked for a different number of sentences than were cached "
                f"({len(sentences)} vs {len(embeddings)})."
            )
        if kwargs.get("convert_to_tensor"):
            import torch

            return torch.from_numpy(embeddings.copy())
        return embeddings.copy()

    names = ("encode", "encode_query", "encode_document")
    saved = {name: model.__dict__[name] for name in names if name in model.__dict__}
    try:
        for name in names:
            object.__setattr__(model, name, cached_encode)
        yield
    finally:
        for name in names:
            model.__dict__.pop(name, None)
        for name, value in saved.items():
            object.__setattr__(model, name, value)


def quantize_from_float(
    model: Any, texts: Sequence[str], embeddings: np.ndarray, bits: int, quantizer: Any | None = None
) -> np.ndarray:
    """Embeddings of ``texts`` at ``bits`` per dimension, derived from their float32 ``embeddings``.

    Calls ``st_bitnet.multi_precision.embed_at_bits`` (so its semantics apply unchanged: the model's trained
    ranges, else ``quantizer``, else post-hoc ranges of this batch) with the model's encode calls served from
    ``embeddings``, so the network does not run again. ``bits == 32`` returns the float embeddings unchanged.

    Args:
        model: the SentenceTransformer the embeddings came from.
        texts: the texts (same order as ``embeddings``).
        embeddings: ``(len(texts), dim)`` float32 embeddings.
        bits: 16, 8, 4, 2, 1, or 32.
        quantizer: optional explicit ``MultiPrecisionQuantizer`` (e.g. post-hoc ranges calibrated once).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if bits == FULL_PRECISION_BITS:
        return embeddings
    from st_bitnet.multi_precision import embed_at_bits

    with _serve_from(model, embeddings):
        quantized = embed_at_bits(model, list(texts), bits, quantizer=quantizer)
    quantized = np.asarray(quantized, dtype=np.float32)
    if quantized.shape != embeddings.shape:
        raise RuntimeError(f"embed_at_bits returned shape {quantized.shape}, expected {embeddings.shape}.")
    return quantized


def calibration_quantizer(model: Any, cache: EmbeddingCache, calibration_texts: Sequence[str] | None) -> Any | None:
    """The quantizer a sweep uses for ``model``: None if it has a trained ``MultiPrecisionQuantizer`` (embed_at_bits
    then uses it), else post-hoc ranges calibrated once on ``calibration_texts`` (None without texts: each encode
    call is then calibrated on its own batch, as sentence-transformers' ``quantize_embeddings`` does)."""
    from st_bitnet.multi_precision import find_quantizer, posthoc_quantizer

    if find_quantizer(model) is not None or not calibration_texts:
        return None
    return posthoc_quantizer(cache.get(list(calibration_texts)))


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _make_mteb_model_meta(name: str, embed_dim: int | None):
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta.create_empty(
        overwrites=dict(name=name, embed_dim=embed_dim, similarity_fn_name=ScoringFunction.COSINE)
    )


def _abs_encoder_base():
    from mteb.models.abs_encoder import AbsEncoder

    return AbsEncoder


class PrecisionEncoder(_abs_encoder_base()):
    """mteb encoder (``EncoderProtocol``) that returns a model's embeddings at ``bits`` per dimension.

    Similarity is cosine on the dequantized float32 vectors, the quantity a low-bit index approximates. Vectors are
    returned L2-normalised, so scale-sensitive evaluators (mteb's regularised logistic regression) compare
    precisions rather than the scale each precision's dequantized codes happen to have.

    Args:
        cache: the :class:`EmbeddingCache` of the model (shared across precisions).
        bits: output precision (16, 8, 4, 2, 1), or 32 for the unquantized float output.
        name: model name reported in mteb metadata.
        quantizer: explicit quantizer for models without trained ranges (see :func:`calibration_quantizer`).

    Example::

        cache = EmbeddingCache(model)
        encoder = PrecisionEncoder(cache, bits=4, name="my-bitembed")
        task.evaluate(encoder, split="dev", encode_kwargs={"batch_size": 32})
    """

    def __init__(
        self, cache: EmbeddingCache, bits: int, name: str = "st_bitnet-model", quantizer: Any | None = None
    ) -> None:
        self.cache = cache
        self.model = cache.model
        self.bits = bits
        self.quantizer = quantizer
        self.model_prompts = None
        self.mteb_model_meta = _make_mteb_model_meta(f"{name}@{bits}bit", cache.dimension)

    def encode(
        self,
        inputs,
        *,
        task_metadata=None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type=None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = None if prompt_type is None else getattr(prompt_type, "value", str(prompt_type))
        floats = self.cache.get(texts, prompt)
        vectors = quantize_from_float(self.model, texts, floats, self.bits, quantizer=self.quantizer)
        # Dequantized codes live on a per-precision scale (unit vectors at 16 bit, ~7x at 8 bit, ~20x at 1 bit).
        # Cosine scores ignore it, but mteb's logistic-regression classifier is regularised (C=1) and would score
        # the scale, not the precision: compare every precision on unit vectors.
        return normalize_rows(vectors)
