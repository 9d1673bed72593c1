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
    no ``trust_remote_code`` here: this class resolves them to st_bitnet's installed classes (plain
    ``SentenceTransformer`` asks for ``trust_remote_code=True`` before importing any module class outside
    ``sentence_transformers.*``).

    Example:
        ::

            from st_bitnet.multi_precision import MultiPrecisionSentenceTransformer

            model = MultiPrecisionSentenceTransformer("path/to/bitembed-model")
            docs = model.encode(documents, precision="1bit")
            hits = model.encode(["query"], precision="1bit").similarity(docs)
    """

    def _load_module_class_from_ref(self, class_ref: str, *args: Any, **kwargs: Any):
        from ..shipped_modules import installed_module_class

        return installed_module_class(class_ref) or super()._load_module_class_from_ref(class_ref, *args, **kwargs)

    def encode(self, inputs=None, *args, precision: str | int = "float32", **kwargs: Any):
        if is_st_precision(precision):
            return super().encode(inputs, *args, precision=precision, **kwargs)
        if args:
            raise TypeError("Pass encode options by keyword when using a multi-precision precision.")
        return multi_precision_encode(self, inputs, precision=precision, **kwargs)
