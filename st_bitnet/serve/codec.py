"""``OutputCodec``: the precisions the server returns, calibrated once, and their JSON / base64 forms.

Per vector, as a JSON list (``encoding_format="float"``) or base64 of the little-endian bytes (``"base64"``):

- ``float32`` (default): ``dim`` floats, the model's output (base64: float32 bytes, as OpenAI).
- ``float16`` (alias ``16bit``): ``dim`` floats rounded to half precision (base64: float16 bytes).
- ``int8`` / ``uint8``: ``dim`` integers, sentence-transformers' min/max buckets (one byte each).
- ``binary`` / ``ubinary``: ``ceil(dim / 8)`` integers, sentence-transformers' packed signs (one byte each).
- ``8bit`` / ``4bit`` / ``2bit`` / ``1bit``: ``packed_width(dim, bits)`` bytes, st_bitnet's packed nested codes
  (:class:`~st_bitnet.multi_precision.QuantizedEmbeddings` layout).

The ``*bit`` codes come from the model's trained :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer` when
it has one, otherwise from a post-hoc quantizer (:func:`~st_bitnet.multi_precision.posthoc_quantizer`) fitted
once on calibration texts; ``int8``/``uint8`` use ranges of the same calibration embeddings. Nothing is
recalibrated per request, so a text's codes never depend on what else is in the request or the batch.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import numpy as np

from st_bitnet.multi_precision import (
    MultiPrecisionQuantizer,
    find_quantizer,
    posthoc_quantizer,
)
from st_bitnet.multi_precision.precision import LOW_BITS, PRECISION_BITS, PRECISION_NAMES, ST_PRECISIONS

FLOAT_PRECISIONS: tuple[str, ...] = ("float32", "float16")
"""Precisions returned as floats (the only ones ``dimensions`` may shorten)."""

_ALIASES = {"16bit": "float16"}

CODE_PRECISIONS: tuple[str, ...] = tuple(PRECISION_NAMES[bits] for bits in LOW_BITS)
"""st_bitnet's packed multi-precision codes (``8bit`` ... ``1bit``)."""

SERVED_PRECISIONS: tuple[str, ...] = (*FLOAT_PRECISIONS, *ST_PRECISIONS[1:], *CODE_PRECISIONS)
"""Every precision name the server knows (a model's quantizer may serve only some of the ``*bit`` ones)."""


@dataclass(frozen=True)
class OutputCodec:
    """Turns float embeddings into the requested precision with ranges fixed at startup.

    Args:
        quantizer: Quantizer of the ``*bit`` precisions (trained, or post-hoc from the calibration embeddings).
        calibration_embeddings: ``(n, dim)`` float32 embeddings of the calibration texts (``int8``/``uint8`` ranges).
        quantizer_source: ``"trained"`` (the model's own) or ``"calibrated"`` (post-hoc, at startup).

    Example:
        ::

            codec = OutputCodec.for_model(model, DEFAULT_CALIBRATION_TEXTS)
            rows = codec.convert(model.encode(["hello"]), "1bit")     # (1, dim / 8) uint8 packed signs
            payload = codec.serialize(rows, "base64")
    """

    quantizer: MultiPrecisionQuantizer
    calibration_embeddings: np.ndarray
    quantizer_source: Literal["trained", "calibrated"]

    @classmethod
    def for_model(cls, model, calibration_texts, *, batch_size: int = 32) -> OutputCodec:
        """Encode ``calibration_texts`` once and build the codec of ``model``.

        Raises:
            ValueError: With fewer than 2 calibration texts.
        """
        texts = list(calibration_texts)
        if len(texts) < 2:
            raise ValueError(f"calibration needs at least 2 texts, got {len(texts)}")
        embeddings = np.asarray(
            model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False),
            dtype=np.float32,
        )
        trained = find_quantizer(model)
        if trained is not None:
            return cls(trained, embeddings, "trained")
        return cls(posthoc_quantizer(embeddings), embeddings, "calibrated")

    @property
    def dim(self) -> int:
        return int(self.calibration_embeddings.shape[1])

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precision names this model serves."""
        bits = tuple(PRECISION_NAMES[b] for b in self.quantizer.precisions if b != 16)
        return tuple(p for p in SERVED_PRECISIONS if p not in CODE_PRECISIONS or p in bits)

    def canonical(self, precision: str) -> str:
        """The served name of ``precision`` (``"16bit"`` -> ``"float16"``).

        Raises:
            ValueError: If this model does not serve it, naming what it serves.
        """
        if isinstance(precision, str):
            name = _ALIASES.get(precision.strip().lower(), precision.strip().lower())
            if name in self.precisions:
                return name
            if name in SERVED_PRECISIONS:
                raise ValueError(
                    f"precision {precision!r} is not served by this model: its quantizer serves "
                    f"{list(self.quantizer.precisions)} bits; choose one of {list(self.precisions)}"
                )
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(self.precisions)}")

    def check_dimensions(self, precision: str, dimensions: int | None) -> None:
        """Raise ``ValueError`` unless ``dimensions`` (OpenAI's field) applies to ``precision`` for this model."""
        if dimensions is None:
            return
        if self.canonical(precision) not in FLOAT_PRECISIONS:
            raise ValueError(
                f"dimensions applies to float outputs only ({list(FLOAT_PRECISIONS)}), not to {precision!r}: "
                "the codes are calibrated on the full vector"
            )
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.dim:
            raise ValueError(f"dimensions must be an integer between 1 and {self.dim} for this model, got {dimensions!r}")

    def convert(self, embeddings: np.ndarray, precision: str, dimensions: int | None = None) -> np.ndarray:
        """Rows of ``embeddings`` at ``precision``.

        Args:
            embeddings: ``(n, dim)`` float32 model outputs.
            precision: A name of :attr:`precisions` (or an alias).
            dimensions: Keep only the first ``dimensions`` values and rescale to unit length, as OpenAI's
                ``dimensions`` does; float precisions only (codes are calibrated on the full vector).

        Returns:
            ``(n, width)`` array: float32 / float16, int8 / uint8 values, or uint8 packed codes.

        Raises:
            ValueError: For an unknown precision or a ``dimensions`` that does not apply.
        """
        from sentence_transformers.util.quantization import quantize_embeddings

        precision = self.canonical(precision)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        self.check_dimensions(precision, dimensions)
        if dimensions is not None:
            if dimensions < self.dim:
                embeddings = embeddings[:, :dimensions]
                norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
                embeddings = embeddings / np.maximum(norms, np.float32(1e-12))
        if precision == "float32":
            return np.ascontiguousarray(embeddings)
        if precision == "float16":
            return embeddings.astype(np.float16)
        if precision in ST_PRECISIONS:
            # sentence-transformers' own quantization, but with ranges of the fixed calibration set
            return quantize_embeddings(embeddings, precision, calibration_embeddings=self.calibration_embeddings)
        return self.quantizer.quantize(embeddings, PRECISION_BITS[precision]).codes

    @staticmethod
    def serialize(rows: np.ndarray, encoding_format: Literal["float", "base64"]) -> list:
        """One JSON value per row: a list of numbers, or base64 of the row's little-endian bytes."""
        if encoding_format == "float":
            return rows.tolist()
        if encoding_format != "base64":
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
        little_endian = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
