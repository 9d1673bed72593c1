"""``QuantizedEmbeddings``: packed multi-precision codes that know their bit width, with save / load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .packing import centered_codes, dequantize_codes, pack_codes, packed_width, reduce_codes, unpack_codes
from .precision import PRECISION_NAMES, resolve_bits
from .similarity import code_similarity, hamming_matrix

FORMAT_NAME = "st_bitnet.quantized_embeddings"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class QuantizedEmbeddings:
    """A batch of embeddings stored at one precision.

    ``codes`` holds ``np.float16`` values for 16 bits, else ``np.uint8`` bytes packed as in
    :func:`st_bitnet.multi_precision.packing.pack_codes` (8-bit: one code per byte; 4/2/1-bit: two / four / eight
    codes per byte). Low-bit codes live in the quantizer's normalized space and dequantize to bucket midpoints
    (``+-1`` for 1 bit); 16-bit values are the model's float output rounded to half precision.

    Args:
        codes: ``(n, bytes_per_vector)`` packed codes (``np.uint8``) or ``(n, dim)`` ``np.float16`` values.
        bits: 16, 8, 4, 2 or 1.
        dim: The embedding dimension (needed to unpack: the last byte may be padding).
        calibration: Fingerprint of the quantizer ranges that produced low-bit codes
            (:meth:`MultiPrecisionQuantizer.fingerprint`), None when unknown or for 16 bits. Codes compare only
            under the same ranges; :class:`MultiPrecisionIndex` refuses queries calibrated differently.

    Example:
        ::

            from st_bitnet.multi_precision import encode, QuantizedEmbeddings

            corpus = encode(model, documents, precision="8bit")
            corpus.save("corpus_8bit.safetensors")
            corpus = QuantizedEmbeddings.load("corpus_8bit.safetensors")
            first_stage = corpus.to_bits(1)   # the nested 1-bit codes, no re-encoding
            scores = encode(model, queries, precision="8bit").similarity(corpus)
    """

    codes: np.ndarray
    bits: int
    dim: int
    calibration: str | None = None

    def __post_init__(self) -> None:
        bits = resolve_bits(self.bits)
        object.__setattr__(self, "bits", bits)
        if not isinstance(self.dim, (int, np.integer)) or int(self.dim) <= 0:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}.")
        object.__setattr__(self, "dim", int(self.dim))
        codes = self.codes
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"codes must be a numpy array, got {type(codes).__name__}.")
        expected_dtype = np.float16 if bits == 16 else np.uint8
        if codes.dtype != expected_dtype:
            raise TypeError(f"{bits}-bit codes must have dtype {np.dtype(expected_dtype).name}, got {codes.dtype}.")
        width = self.dim if bits == 16 else packed_width(self.dim, bits)
        if codes.ndim != 2 or codes.shape[1] != width:
            raise ValueError(
                f"{bits}-bit codes of dimension {self.dim} must have shape (n, {width}), got {codes.shape}."
            )

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: np.ndarray, bits: int, calibration: str | None = None) -> QuantizedEmbeddings:
        """Pack unpacked ``(n, dim)`` integer codes (or wrap ``(n, dim)`` float values for 16 bits)."""
        bits = resolve_bits(bits)
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"Expected a 2-D (n, dim) array, got shape {codes.shape}.")
        if bits == 16:
            return cls(codes.astype(np.float16), 16, codes.shape[1])
        return cls(pack_codes(codes, bits), bits, codes.shape[1], calibration)

    # ---- views ---------------------------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The canonical precision name, e.g. ``"2bit"``."""
        return PRECISION_NAMES[self.bits]

    @property
    def bytes_per_vector(self) -> int:
        return int(self.codes.shape[1] * self.codes.itemsize)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, rows) -> QuantizedEmbeddings:
        codes = self.codes[rows]
        if codes.ndim == 1:
            codes = codes[None, :]
        return QuantizedEmbeddings(np.ascontiguousarray(codes), self.bits, self.dim, self.calibration)

    def __repr__(self) -> str:
        return f"QuantizedEmbeddings(n={len(self)}, dim={self.dim}, precision={self.precision!r}, nbytes={self.nbytes})"

    def unpacked(self) -> np.ndarray:
        """``(n, dim)`` integer codes (``np.uint8``); not defined for 16 bits."""
        if self.bits == 16:
            raise ValueError("16-bit embeddings are float16 values, not integer codes.")
        return unpack_codes(self.codes, self.bits, self.dim)

    def centered(self) -> np.ndarray:
        """``(n, dim)`` odd centered integers ``2c + 1 - 2**bits`` (``+-1`` for 1 bit); their dot is the code-space score."""
        return centered_codes(self.unpacked(), self.bits)

    def dequantize(self) -> np.ndarray:
        """``(n, dim)`` float32 vectors whose cosine ranks exactly like :meth:`similarity`."""
        if self.bits == 16:
            return self.codes.astype(np.float32)
        return dequantize_codes(self.unpacked(), self.bits)

    def to_bits(self, bits: int | str) -> QuantizedEmbeddings:
        """The nested lower-precision codes (the top bits of these codes), without re-encoding.

        Raises:
            ValueError: From 16 bits (float values carry no nested codes: encode at the lower precision instead)
                or towards more bits than stored.
        """
        bits = resolve_bits(bits)
        if bits == self.bits:
            return self
        if self.bits == 16:
            raise ValueError(
                "16-bit embeddings are float values with no nested integer codes; encode at the lower precision "
                "(the quantizer's ranges are needed) instead of reducing them."
            )
        return QuantizedEmbeddings.from_codes(reduce_codes(self.unpacked(), self.bits, bits), bits, self.calibration)

    # ---- scoring -------------------------------------------------------------------------------------------------
    def similarity(self, other: QuantizedEmbeddings, metric: str = "cosine") -> np.ndarray:
        """``(len(self), len(other))`` code-space scores; see :func:`similarity`."""
        return similarity(self, other, metric=metric)

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the codes to a ``.safetensors`` file (no pickle), with bits / dim in its metadata."""
        from safetensors.numpy import save_file

        metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "bits": str(self.bits), "dim": str(self.dim)}
        if self.calibration is not None:
            metadata["calibration"] = self.calibration
        save_file({"codes": np.ascontiguousarray(self.codes)}, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantizedEmbeddings:
        """Read codes written by :meth:`save`; checks the format, bit width, dtype and shape."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise ValueError(
                    f"{os.fspath(path)} is not a QuantizedEmbeddings file (metadata {json.dumps(metadata)[:200]})."
                )
            if int(metadata.get("version", "0")) > FORMAT_VERSION:
                raise ValueError(f"{os.fspath(path)} was written by a newer st_bitnet (format {metadata['version']}).")
            codes = handle.get_tensor("codes")
        return cls(codes, int(metadata["bits"]), int(metadata["dim"]), metadata.get("calibration"))


def as_quantized(value, name: str = "embeddings") -> QuantizedEmbeddings:
    """Check that ``value`` is a :class:`QuantizedEmbeddings`, with an error that says what to pass instead."""
    if isinstance(value, QuantizedEmbeddings):
        return value
    kind = f"np.ndarray of dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
    raise TypeError(
        f"{name} must be QuantizedEmbeddings (from st_bitnet.multi_precision.encode or QuantizedEmbeddings.from_codes / "
        f".load), got {kind}. Raw packed bytes do not say their bit width: wrap them with "
        f"QuantizedEmbeddings(codes, bits=..., dim=...)."
    )


def _check_compatible(a: QuantizedEmbeddings, b: QuantizedEmbeddings) -> None:
    if a.bits != b.bits:
        raise ValueError(
            f"Cannot compare {a.precision} with {b.precision} embeddings: mixed precisions in one search. "
            f"Encode both sides at one precision, or reduce the wider nested codes with .to_bits({min(a.bits, b.bits)})."
        )
    if a.dim != b.dim:
        raise ValueError(f"Dimension mismatch: {a.dim} vs {b.dim}.")


def hamming_distance(a: QuantizedEmbeddings, b: QuantizedEmbeddings) -> np.ndarray:
    """``(len(a), len(b))`` Hamming distances (``np.int32``) between 1-bit codes, by XOR + popcount."""
    a, b = as_quantized(a, "a"), as_quantized(b, "b")
    _check_compatible(a, b)
    if a.bits != 1:
        raise ValueError(f"Hamming distance is defined for 1-bit codes, got {a.precision}.")
    return hamming_matrix(a.codes, b.codes)


def similarity(a: QuantizedEmbeddings, b: QuantizedEmbeddings, metric: str = "cosine") -> np.ndarray:
    """``(len(a), len(b))`` float64 scores computed on the codes (the cosine or dot of the dequantized vectors).

    Args:
        a: Query-side embeddings.
        b: Corpus-side embeddings, same precision and dimension as ``a``.
        metric: ``"cosine"`` (default) or ``"dot"`` (dot of the dequantized vectors).

    Raises:
        TypeError: If either side is not :class:`QuantizedEmbeddings`.
        ValueError: On mixed precisions, mismatched dimensions or an unknown metric.

    Example::

        scores = similarity(encode(model, queries, precision="1bit"), encode(model, docs, precision="1bit"))
    """
    a, b = as_quantized(a, "a"), as_quantized(b, "b")
    _check_compatible(a, b)
    return code_similarity(a.codes, b.codes, a.bits, a.dim, metric)
