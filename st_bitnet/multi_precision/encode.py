"""Encode at any precision: ``encode(model, texts, precision=...)`` and the float view ``embed_at_bits``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .precision import BITS, is_st_precision, resolve_bits
from .quantized_embeddings import QuantizedEmbeddings
from .quantizer import MultiPrecisionQuantizer

# encode() computes the float output itself: these options may only take the value it needs (callers such as
# SentenceTransformer.encode_query pass them explicitly), anything else would change what is quantized.
_FIXED_ENCODE_KWARGS = {
    "precision": ("float32",),
    "convert_to_tensor": (False,),
    "convert_to_numpy": (True,),
    "output_value": ("sentence_embedding",),
}


def find_quantizer(model) -> MultiPrecisionQuantizer | None:
    """The model's :class:`MultiPrecisionQuantizer`, or None if it has none.

    Raises:
        ValueError: If a quantizer is present but is not the last module (a module after it would change the
            embedding its ranges were trained for), or if there are several.
    """
    modules = list(model.children()) if hasattr(model, "children") else []
    positions = [i for i, module in enumerate(modules) if isinstance(module, MultiPrecisionQuantizer)]
    if not positions:
        return None
    if len(positions) > 1:
        raise ValueError(f"The model has {len(positions)} MultiPrecisionQuantizer modules; expected one.")
    if positions[0] != len(modules) - 1:
        raise ValueError(
            "The MultiPrecisionQuantizer must be the model's last module (found modules after it: "
            f"{[type(m).__name__ for m in modules[positions[0] + 1:]]})."
        )
    return modules[positions[0]]


def posthoc_quantizer(
    embeddings: np.ndarray, precisions: tuple[int, ...] = BITS
) -> MultiPrecisionQuantizer:
    """Post-hoc quantizer of a model without a trained one: sentence-transformers' recipe, per dimension.

    Ranges are the min / max of ``embeddings`` (``quantize_embeddings``' ``int8``/``uint8`` calibration), split into
    ``2**b`` equal buckets for 8/4/2 bits; 1 bit is the sign of the value (``binary``/``ubinary``). A near-constant
    dimension keeps its own tiny range, as in sentence-transformers (only an exactly constant one is special-cased).

    Raises:
        ValueError: With fewer than 2 embeddings (no range can be measured).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            "Post-hoc quantization measures per-dimension ranges and needs at least 2 embeddings "
            f"(got shape {embeddings.shape}); pass `calibration_embeddings` or use a model with a trained "
            "MultiPrecisionQuantizer."
        )
    return MultiPrecisionQuantizer.from_embeddings(
        embeddings, precisions=precisions, binary_threshold="zero", method="minmax", degenerate_fraction=0.0
    )


def _float_embeddings(model, sentences, encode_kwargs: dict[str, Any], has_quantizer: bool) -> np.ndarray:
    for key, allowed in _FIXED_ENCODE_KWARGS.items():
        if key in encode_kwargs:
            if encode_kwargs[key] not in allowed:
                raise ValueError(
                    f"`{key}={encode_kwargs[key]!r}` cannot be combined with a multi-precision precision: "
                    f"the codes are computed from the float32 numpy sentence embedding."
                )
            encode_kwargs = {k: v for k, v in encode_kwargs.items() if k != key}
    if has_quantizer and encode_kwargs.get("normalize_embeddings"):
        raise ValueError(
            "normalize_embeddings=True would rescale the embeddings after the MultiPrecisionQuantizer's ranges "
            "were applied; leave it off (use metric='cosine' for normalized scores)."
        )
    embeddings = model.encode(sentences, convert_to_numpy=True, **encode_kwargs)
    return np.atleast_2d(np.asarray(embeddings, dtype=np.float32))


def encode(
    model,
    sentences: str | list[str],
    precision: str | int = "float32",
    quantizer: MultiPrecisionQuantizer | None = None,
    calibration_embeddings: np.ndarray | None = None,
    **encode_kwargs: Any,
) -> QuantizedEmbeddings | np.ndarray:
    """``model.encode`` that also serves the trained low-bit precisions.

    sentence-transformers' own names (``"float32"``, ``"int8"``, ``"uint8"``, ``"binary"``, ``"ubinary"``) are
    forwarded to ``model.encode`` unchanged (post-hoc, recalibrated per call) and return what it returns. The
    multi-precision names (``"16bit"``/``"float16"``, ``"8bit"``, ``"4bit"``, ``"2bit"``, ``"1bit"``, or the ints) return
    :class:`QuantizedEmbeddings` quantized with, in order of preference: ``quantizer``; the model's trained
    :class:`MultiPrecisionQuantizer`; or post-hoc ranges measured on ``calibration_embeddings`` (else on these
    embeddings, as sentence-transformers does).

    Args:
        model: A ``SentenceTransformer`` (any backbone; BitNet or not).
        sentences: Text(s) to encode.
        precision: See above.
        quantizer: An explicit quantizer (e.g. a post-hoc one calibrated once with :func:`posthoc_quantizer`).
        calibration_embeddings: Float embeddings to measure post-hoc ranges on (models without a quantizer).
        **encode_kwargs: Passed to ``model.encode`` (``batch_size``, ``prompt_name``, ...).

    Returns:
        ``np.ndarray`` for sentence-transformers' names, :class:`QuantizedEmbeddings` for the others (a single
        string gives one row).

    Raises:
        ValueError: For an unknown precision, or a quantizer that does not serve it.

    Example:
        ::

            from st_bitnet.multi_precision import encode

            corpus = encode(model, documents, precision="1bit")    # 48 bytes per 384-d vector
            queries = encode(model, ["what is BitNet?"], precision="1bit")
            scores = queries.similarity(corpus)                      # popcount Hamming -> cosine of +-1 vectors
    """
    if is_st_precision(precision):
        return model.encode(sentences, precision=precision, **encode_kwargs)
    bits = resolve_bits(precision)
    trained = find_quantizer(model)
    embeddings = _float_embeddings(model, sentences, encode_kwargs, has_quantizer=trained is not None and quantizer is None)
    quantizer = quantizer or trained
    if quantizer is None and bits != 16:
        quantizer = posthoc_quantizer(embeddings if calibration_embeddings is None else calibration_embeddings)
    if quantizer is None:  # 16 bits needs no ranges
        return QuantizedEmbeddings(embeddings.astype(np.float16), 16, embeddings.shape[1])
    return quantizer.quantize(embeddings, bits)


def embed_at_bits(
    model,
    sentences: list[str],
    bits: int,
    quantizer: MultiPrecisionQuantizer | None = None,
    calibration_embeddings: np.ndarray | None = None,
    **encode_kwargs: Any,
) -> np.ndarray:
    """float32 dequantized embeddings at ``bits`` (16, 8, 4, 2, 1): what a ``bits``-bit index stores, as floats.

    With a trained :class:`MultiPrecisionQuantizer` in the model its saved ranges are used; otherwise post-hoc
    per-dimension quantization calibrated on these embeddings (or ``calibration_embeddings``): min / max ranges
    as sentence-transformers' ``int8`` for 8/4/2 bits, sign (``binary``) dequantized to ``+-1`` for 1 bit, a float16
    round trip for 16 bits. The cosine of the returned vectors ranks exactly like the code-space similarity of
    :func:`encode`'s codes (:func:`similarity_at_bits`).

    Args:
        model: A ``SentenceTransformer``.
        sentences: Texts to embed.
        bits: 16, 8, 4, 2 or 1.
        quantizer: Optional explicit quantizer (overrides the model's).
        calibration_embeddings: Optional float embeddings for post-hoc ranges.
        **encode_kwargs: Passed to ``model.encode``.

    Returns:
        ``(len(sentences), dim)`` float32 array.
    """
    codes = encode(
        model,
        sentences,
        precision=resolve_bits(bits),
        quantizer=quantizer,
        calibration_embeddings=calibration_embeddings,
        **encode_kwargs,
    )
    return codes.dequantize()


def similarity_at_bits(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """Cosine similarity matrix of two sets of :func:`embed_at_bits` outputs (float64, ``(len(a), len(b))``).

    For 1/2/4/8 bits this equals the code-space score (popcount / integer dot) of the same embeddings.
    """
    resolve_bits(bits)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return a @ b.T
