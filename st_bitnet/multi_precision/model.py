"""``MultiPrecisionSentenceTransformer``: a ``SentenceTransformer`` whose ``encode`` also takes the trained precisions."""

from __future__ import annotations

from typing import Any

from sentence_transformers import SentenceTransformer

from .encode import encode as multi_precision_encode
from .precision import is_st_precision


class MultiPrecisionSentenceTransformer(SentenceTransformer):
    """``SentenceTransformer`` with ``encode(..., precision="16bit" | "8bit" | "4bit" | "2bit" | "1bit")``.

    sentence-transformers' own precision names (``"float32"``, ``"int8"``, ``"uint8"``, ``"binary"``, ``"ubinary"``)
    behave exactly as in ``SentenceTransformer.encode``; the multi-precision names return
    :class:`~st_bitnet.multi_precision.QuantizedEmbeddings` (see :func:`st_bitnet.multi_precision.encode`).
    ``encode_query`` / ``encode_document`` go through the same ``encode``.

    Loading a saved model with st_bitnet modules (``MultiPrecisionQuantizer``, ``QuantizationAwarePooling``) needs
    ``trust_remote_code=True``: sentence-transformers 6 asks for it before importing any module class outside
    ``sentence_transformers.*``; with st_bitnet installed the class is imported from the package, no code is
    downloaded.

    Example:
        ::

            from st_bitnet.multi_precision import MultiPrecisionSentenceTransformer

            model = MultiPrecisionSentenceTransformer("path/to/bitembed-model", trust_remote_code=True)
            docs = model.encode(documents, precision="1bit")
            hits = model.encode(["query"], precision="1bit").similarity(docs)
    """

    def encode(self, inputs=None, *args, precision: str | int = "float32", **kwargs: Any):
        if is_st_precision(precision):
            return super().encode(inputs, *args, precision=precision, **kwargs)
        if args:
            raise TypeError("Pass encode options by keyword when using a multi-precision precision.")
        return multi_precision_encode(self, inputs, precision=precision, **kwargs)
