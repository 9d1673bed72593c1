"""bitnet.cpp's I2_S tensor layout: 2-bit ternary codes plus one float32 scale per tensor.

Layout (x86 build of bitnet.cpp, ``QK_I2_S = 128``), as written by Microsoft's
``utils/convert-bitnet-embedding-to-gguf.py`` and read by ``ggml_vec_dot_i2_i8_s`` / ``dequantize_row_i2_s``
(``src/ggml-bitnet-mad.cpp`` in microsoft/BitNet):

- the ``(M, K)`` weight (``M`` output rows, ``K`` inputs, row-major) is flattened and cut into 128-value blocks;
- each block becomes 32 bytes; byte ``p`` of a block holds values ``p``, ``32 + p``, ``64 + p``, ``96 + p`` of the
  block in bits 7-6, 5-4, 3-2, 1-0;
- codes: ``0 -> -1``, ``1 -> 0``, ``2 -> +1``;
- after the ``M * K / 4`` code bytes comes a 32-byte tail whose first 4 bytes are the float32 scale
  (``dequantized weight = code_value * scale``, i.e. ``mean|W|`` = ``1 / weight_scale`` of a st_bitnet BitLinear);
  a tensor takes ``M * K / 4 + 32`` bytes;
- GGML type id ``GGML_TYPE_I2_S = 36`` (bitnet.cpp's ``ggml.h``), file type ``LLAMA_FTYPE_MOSTLY_I2_S = 40``.

The kernel walks each row in whole 128-value blocks, so ``K`` must be a multiple of 128.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

GGML_TYPE_I2_S = 36
LLAMA_FTYPE_MOSTLY_I2_S = 40
I2_S_BLOCK = 128
I2_S_TAIL_BYTES = 32


def i2_s_nbytes(n_elements: int) -> int:
    """Bytes of an I2_S tensor of ``n_elements`` values (codes + the 32-byte scale tail)."""
    return n_elements // 4 + I2_S_TAIL_BYTES


def pack_i2_s(ternary: np.ndarray, scale: float) -> np.ndarray:
    """Pack an ``(M, K)`` ternary matrix (values in {-1, 0, 1}) and its dequantization scale into I2_S bytes.

    Args:
        ternary: integer array of shape ``(M, K)``, ``K % 128 == 0``.
        scale: float multiplier of the ternary values (``mean|W|``).

    Returns:
        ``uint8`` array of ``M * K / 4 + 32`` bytes.
    """
    ternary = np.asarray(ternary)
    if ternary.ndim != 2:
        raise ValueError(f"pack_i2_s expects a 2-D (out, in) matrix, got shape {ternary.shape}")
    if ternary.shape[1] % I2_S_BLOCK:
        raise ValueError(
            f"I2_S needs in_features % {I2_S_BLOCK} == 0 (bitnet.cpp's kernel walks rows in {I2_S_BLOCK}-value "
            f"blocks); got in_features={ternary.shape[1]}"
        )
    if ternary.size and (ternary.min() < -1 or ternary.max() > 1):
        raise ValueError("pack_i2_s expects values in {-1, 0, 1}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"I2_S scale must be a positive finite float, got {scale}")
    codes = (ternary.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    out = np.zeros(i2_s_nbytes(ternary.size), dtype=np.uint8)
    out[: ternary.size // 4] = packed.reshape(-1)
    out[ternary.size // 4 : ternary.size // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return out


def unpack_i2_s(data: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Inverse of :func:`pack_i2_s`: I2_S bytes -> ``(int8 (M, K) ternary matrix, float scale)``."""
    rows, cols = shape
    n = rows * cols
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < n // 4 + 4:
        raise ValueError(f"I2_S data has {data.size} bytes, expected at least {n // 4 + 4} for shape {shape}")
    packed = data[: n // 4].reshape(-1, 32)
    codes = np.stack([(packed >> shift) & 3 for shift in (6, 4, 2, 0)], axis=1)  # (blocks, 4, 32)
    if (codes == 3).any():
        raise ValueError("I2_S data holds the unused code 3 (corrupt tensor?)")
    ternary = codes.reshape(rows, cols).astype(np.int8) - 1
    scale = float(data[n // 4 : n // 4 + 4].view(np.float32)[0])
    return ternary, scale


@contextlib.contextmanager
def gguf_knows_i2_s() -> Iterator[object]:
    """Teach the ``gguf`` package (which ships no I2_S) the type id 36 while inside the block.

    Yields the ``GGMLQuantizationType`` member for I2_S, usable as ``raw_dtype`` with ``GGUFWriter`` and recognised
    by ``GGUFReader`` (which then exposes the ``M*K/4`` code bytes as ``tensor.data``; the scale is in the tail
    right after them, see :func:`read_i2_s_tensor`). If ``gguf`` already has type 36 it is used unchanged.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    existing = GGMLQuantizationType._value2member_map_.get(GGML_TYPE_I2_S)
    if existing is not None:
        yield existing
        return
    member = int.__new__(GGMLQuantizationType, GGML_TYPE_I2_S)
    member._name_ = "I2_S"
    member._value_ = GGML_TYPE_I2_S
    GGMLQuantizationType._value2member_map_[GGML_TYPE_I2_S] = member
    GGML_QUANT_SIZES[member] = (4, 1)  # 4 values per byte; the 32-byte scale tail is outside ggml's block maths
    try:
        yield member
    finally:
        GGMLQuantizationType._value2member_map_.pop(GGML_TYPE_I2_S, None)
        GGML_QUANT_SIZES.pop(member, None)


def read_i2_s_tensor(reader, tensor) -> tuple[np.ndarray, float]:
    """``(ternary int8 (M, K), scale)`` of an I2_S tensor from a ``gguf.GGUFReader`` opened inside :func:`gguf_knows_i2_s`."""
    cols, rows = (int(d) for d in tensor.shape)  # GGUF dims are innermost-first: (K, M)
    n = rows * cols
    raw = np.asarray(reader.data[tensor.data_offset : tensor.data_offset + i2_s_nbytes(n)], dtype=np.uint8)
    return unpack_i2_s(raw, (rows, cols))
