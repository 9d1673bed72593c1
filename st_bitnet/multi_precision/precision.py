"""Precision names of the multi-precision output and how they map to bit widths.

sentence-transformers' own names keep their meaning (post-hoc quantization, recalibrated per call):
``float32``, ``int8``, ``uint8``, ``binary``, ``ubinary``. The trained (or calibrated) low-bit outputs of
BITEMBED get their own names so the two can never be confused:

=============================  ====  ==========================================================
name (aliases)                 bits  stored as
=============================  ====  ==========================================================
``"16bit"`` (``"float16"``)    16    ``np.float16``, one value per dimension (passthrough)
``"8bit"``                     8     ``np.uint8``, one code per dimension
``"4bit"``                     4     ``np.uint8``, two codes per byte (first dimension in the high bits)
``"2bit"``                     2     ``np.uint8``, four codes per byte
``"1bit"``                     1     ``np.uint8``, eight signs per byte (``np.packbits`` order, same as ``ubinary``)
=============================  ====  ==========================================================

The integers ``16, 8, 4, 2, 1`` are accepted wherever a name is. :func:`bytes_per_vector` is the storage of one
vector at each width: codes carry no per-vector scale (the quantizer's ranges are per dimension and stored once
with the model), so a vector is its packed bits rounded up to whole bytes.
"""

from __future__ import annotations

import operator

BITS: tuple[int, ...] = (16, 8, 4, 2, 1)
"""Every bit width a multi-precision output serves, widest first."""

LOW_BITS: tuple[int, ...] = (8, 4, 2, 1)
"""The bit widths stored as integer codes (everything but the 16-bit passthrough)."""

ST_PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")
"""sentence-transformers' own ``precision`` names (post-hoc :func:`quantize_embeddings`), kept as they are."""

PRECISION_BITS: dict[str, int] = {
    "16bit": 16,
    "float16": 16,
    "8bit": 8,
    "4bit": 4,
    "2bit": 2,
    "1bit": 1,
}
"""The trained multi-precision names (and aliases) and their bit widths."""

PRECISION_NAMES: dict[int, str] = {16: "16bit", 8: "8bit", 4: "4bit", 2: "2bit", 1: "1bit"}
"""The canonical name of each bit width."""

FLOAT32_BITS = 32
"""The unquantized float output, the reference every storage ratio is taken against."""


def bytes_per_vector(dim: int, bits: int | str) -> int:
    """Bytes one ``dim``-dimensional vector takes at ``bits`` per dimension, as stored.

    float32 (``32`` / ``"float32"``) is ``4 * dim``, 16 bits ``2 * dim`` (float16 values); 8/4/2/1-bit codes are
    packed ``8 // bits`` per byte with the last byte zero-padded: ``ceil(dim * bits / 8)``. No per-vector scale is
    stored (ranges are per dimension, held by the model's quantizer).

    Raises:
        ValueError: For a non-positive ``dim`` or an unknown precision.

    Example::

        bytes_per_vector(384, 1)   # 48
        bytes_per_vector(37, 1)    # 5 (37 bits, padded to whole bytes)
    """
    try:
        dim = operator.index(dim)  # ints and numpy integers
    except TypeError:
        raise ValueError(f"dim must be a positive int, got {dim!r}.") from None
    if dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    if bits == FLOAT32_BITS or bits == "float32":
        return 4 * dim
    bits = resolve_bits(bits)
    return -(-dim * bits // 8)


def resolve_bits(precision: str | int) -> int:
    """The bit width of a multi-precision name (or of an int bit width).

    Args:
        precision: ``"16bit"``/``"float16"``, ``"8bit"``, ``"4bit"``, ``"2bit"``, ``"1bit"`` or one of ``16, 8, 4, 2, 1``.

    Raises:
        ValueError: For anything else, naming the accepted values (sentence-transformers' own names included,
            with a hint that they belong to ``SentenceTransformer.encode``).
    """
    if isinstance(precision, bool):  # bool is an int subclass: True must not mean 1 bit
        raise ValueError(f"Unknown precision {precision!r}.")
    if isinstance(precision, int):
        if precision in BITS:
            return precision
        raise ValueError(f"Unsupported bit width {precision}; supported: {BITS}.")
    if isinstance(precision, str):
        key = precision.strip().lower()
        if key in PRECISION_BITS:
            return PRECISION_BITS[key]
        if key in ST_PRECISIONS:
            raise ValueError(
                f"{precision!r} is a sentence-transformers post-hoc precision, not a trained multi-precision one; "
                f"pass it to `encode` (which forwards it to SentenceTransformer.encode) or use one of "
                f"{sorted(PRECISION_BITS)}."
            )
    raise ValueError(
        f"Unknown precision {precision!r}. Trained multi-precision names: {sorted(PRECISION_BITS)} "
        f"(or bit widths {BITS}); sentence-transformers names: {list(ST_PRECISIONS)}."
    )


def is_st_precision(precision: str | int) -> bool:
    """Whether ``precision`` is one of sentence-transformers' own names (handled by ``SentenceTransformer.encode``)."""
    return isinstance(precision, str) and precision in ST_PRECISIONS
