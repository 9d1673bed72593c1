"""st_bitnet: BitNet (W1.58A8) text embedders for sentence-transformers.

Importing this package registers st_bitnet's transformers classes (model type ``bitembed``) and routes
transformers' ``bitnet`` checkpoints to st_bitnet's BitLinear (same numbers, faster kernels). It never
initialises CUDA nor imports Triton: GPU kernels load on first use on a CUDA tensor.
"""

from .bitlinear import BitLinear, BitRMSNorm, pack_ternary, unpack_ternary, ternary_linear_reference
from .config import BitNetConversionConfig
from .convert import convert, pack
from .hf_integration import register as _register_with_transformers
from .sentence_transformer import build_sentence_transformer, load, save_pretrained

_register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "BitLinear",
    "BitRMSNorm",
    "BitNetConversionConfig",
    "build_sentence_transformer",
    "convert",
    "load",
    "save_pretrained",
    "pack",
    "pack_ternary",
    "unpack_ternary",
    "ternary_linear_reference",
]
