"""Multi-precision outputs of BITEMBED: one model, 16/8/4/2/1-bit embeddings.

- :class:`MultiPrecisionQuantizer`: trained per-dimension ranges, nested codes, STE (a sentence-transformers module).
- :class:`QuantizationAwarePooling`: pooling + a learned normalization that suits the quantizer.
- :func:`encode` / :func:`embed_at_bits`: encode at ``"16bit"``, ``"8bit"``, ``"4bit"``, ``"2bit"``, ``"1bit"``.
- :class:`QuantizedEmbeddings`: packed codes with popcount / integer-dot similarity and safetensors save / load.
- :class:`MultiPrecisionIndex`: 1-bit (or 2-bit) first stage + exact 8/16-bit rescoring (FAISS / usearch / numpy).
- :func:`storage_report`: bytes per vector and index sizes.
- :class:`MultiPrecisionSentenceTransformer`: ``model.encode(texts, precision="2bit")``.

Reload a saved model: ``st_bitnet.load(path)`` (no ``trust_remote_code``: st_bitnet's installed classes), or
``SentenceTransformer(path, trust_remote_code=True)`` / ``MultiPrecisionSentenceTransformer(path,
trust_remote_code=True)``, which also works without st_bitnet for folders written by ``st_bitnet.save_pretrained``
(they ship the module code, :mod:`st_bitnet.shipped_modules`).
"""

from .encode import embed_at_bits, encode, find_quantizer, posthoc_quantizer, similarity_at_bits
from .pooling import QuantizationAwarePooling
from .model import MultiPrecisionSentenceTransformer
from .packing import pack_codes, packed_width, unpack_codes
from .precision import BITS, PRECISION_BITS, PRECISION_NAMES, ST_PRECISIONS, resolve_bits
from .quantized_embeddings import QuantizedEmbeddings, hamming_distance, similarity
from .quantizer import MultiPrecisionQuantizer
from .search import MultiPrecisionIndex, semantic_search_multi_precision
from .storage import bytes_per_vector, format_storage_report, storage_report

__all__ = [
    "BITS",
    "PRECISION_BITS",
    "PRECISION_NAMES",
    "QuantizationAwarePooling",
    "ST_PRECISIONS",
    "MultiPrecisionIndex",
    "MultiPrecisionQuantizer",
    "MultiPrecisionSentenceTransformer",
    "QuantizedEmbeddings",
    "bytes_per_vector",
    "embed_at_bits",
    "encode",
    "find_quantizer",
    "format_storage_report",
    "hamming_distance",
    "pack_codes",
    "packed_width",
    "posthoc_quantizer",
    "resolve_bits",
    "similarity",
    "semantic_search_multi_precision",
    "similarity_at_bits",
    "storage_report",
    "unpack_codes",
]
