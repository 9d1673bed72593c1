"""Nested integer codes and their bit packing.

A value ``z`` in the quantizer's normalized space ``[-1, 1)`` gets the ``b``-bit code
``c_b = floor((z + 1) / 2 * 2**b)`` clipped to ``[0, 2**b - 1]``. Because the grid is the same for every width,
the codes nest exactly: ``c_4 == c_8 >> 4``, ``c_2 == c_8 >> 6``, ``c_1 == c_8 >> 7`` (``c_1 = z >= 0``, the sign), as
in Matryoshka Quantization. One stored 8-bit index therefore serves every lower precision.

A code dequantizes to the midpoint of its bucket, written with the odd "centered" integer
``m = 2 c + 1 - 2**b``: ``z_hat = m / 2**b``. The 1-bit code dequantizes to ``+-1`` (its sign).
Dot products of centered integers are exact integer dot products, so code-space similarity ranks exactly like
the cosine of the dequantized vectors.
"""

from __future__ import annotations

import numpy as np

from .precision import LOW_BITS, bytes_per_vector


def _check_bits(bits: int) -> None:
    if bits not in LOW_BITS:
        raise ValueError(f"Integer codes exist for bit widths {LOW_BITS}, got {bits!r}.")


def packed_width(dim: int, bits: int) -> int:
    """Bytes per vector of ``dim`` codes of ``bits`` bits each (the last byte zero-padded)."""
    _check_bits(bits)
    return bytes_per_vector(dim, bits)


def codes_from_normalized(z: np.ndarray, bits: int) -> np.ndarray:
    """``b``-bit codes (``np.uint8``, one per dimension, unpacked) of values in the normalized space ``[-1, 1)``."""
    _check_bits(bits)
    levels = 1 << bits
    z = np.asarray(z, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ValueError("Embeddings contain NaN or infinite values; they cannot be quantized.")
    return np.clip(np.floor((z + 1.0) * (levels / 2.0)), 0, levels - 1).astype(np.uint8)


def reduce_codes(codes: np.ndarray, from_bits: int, to_bits: int) -> np.ndarray:
    """The ``to_bits`` codes nested in unpacked ``from_bits`` codes: their top bits."""
    _check_bits(from_bits)
    _check_bits(to_bits)
    if to_bits > from_bits:
        raise ValueError(f"Cannot raise precision from {from_bits} to {to_bits} bits: the low bits are not stored.")
    return (np.asarray(codes, dtype=np.uint8) >> (from_bits - to_bits)).astype(np.uint8)


def centered_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The odd centered integers ``2 c + 1 - 2**b`` of unpacked codes (``+-1`` for 1 bit), as ``np.int16``."""
    _check_bits(bits)
    return (2 * codes.astype(np.int16) + 1 - (1 << bits)).astype(np.int16)


def dequantize_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unpacked codes back to float32 bucket midpoints in ``[-1, 1]`` (``+-1`` signs for 1 bit)."""
    centered = centered_codes(codes, bits).astype(np.float32)
    return centered if bits == 1 else centered / float(1 << bits)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unpacked ``(n, dim)`` codes into ``(n, packed_width(dim, bits))`` bytes, first dimension in the high bits.

    8-bit codes are returned as they are; 1-bit codes are laid out exactly as ``np.packbits`` (and
    sentence-transformers' ``ubinary``, FAISS binary indexes, usearch ``b1``) lay them out.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"Expected a 2-D (n, dim) array of codes, got shape {codes.shape}.")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"Codes do not fit in {bits} bits (max {int(codes.max())}).")
    codes = codes.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(codes)
    if bits == 1:
        return np.packbits(codes, axis=-1)
    per_byte = 8 // bits
    n, dim = codes.shape
    padded = np.zeros((n, -(-dim // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :dim] = codes
    grouped = padded.reshape(n, -1, per_byte)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[:, :, slot] << (8 - bits * (slot + 1))
    return packed


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``(n, packed_width(dim, bits))`` bytes to ``(n, dim)`` codes."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"Packed codes must be np.uint8, got {packed.dtype}.")
    if packed.ndim != 2 or packed.shape[1] != packed_width(dim, bits):
        raise ValueError(
            f"Packed {bits}-bit codes of dimension {dim} must have shape (n, {packed_width(dim, bits)}), "
            f"got {packed.shape}."
        )
    if bits == 8:
        return packed
    if bits == 1:
        return np.unpackbits(packed, axis=-1, count=dim)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (8 - bits * (slot + 1))) & mask for slot in range(per_byte)]
    return np.stack(slots, axis=-1).reshape(packed.shape[0], -1)[:, :dim].astype(np.uint8)
