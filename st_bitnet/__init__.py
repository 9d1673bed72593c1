"""st_bitnet: BitNet (W1.58A8) text embedders for sentence-transformers.

Importing this package registers st_bitnet's transformers classes (model type ``bitembed``), routes
transformers' ``bitnet`` checkpoints to st_bitnet's BitLinear (same numbers, faster kernels) and guards stock
loading (:mod:`st_bitnet.load_guard`: Microsoft's bitnet-embedding folders load as W1.58A8, corrupt BitNet folders
raise). It never
initialises CUDA nor imports Triton itself (transformers may import Triton when it is installed): GPU
kernels load on first use on a CUDA tensor, the CPU kernel compiles on first use.
"""

from .bitlinear import BitLinear, BitRMSNorm, pack_ternary, unpack_ternary, ternary_linear_reference
from .calibration import calibrate_norms
from .config import BitNetConversionConfig
from .convert import convert, pack
from .hf_integration import register as _register_with_transformers
from .sentence_transformer import build_sentence_transformer, load, save_pretrained
from .version import __version__

_register_with_transformers()
# Always on: BitNet folders load right through stock calls (AutoModel / SentenceTransformer) or fail loudly.
from .load_guard import install as _install_load_guard  # noqa: E402

_install_load_guard()

# Packed BitLinear layers run st_bitnet's kernels (CPU C kernel built at first use, Triton on CUDA at first
# CUDA call; nothing is compiled or initialised here). ST_BITNET_KERNEL=reference forces the reference.
from .ops import register_kernels as _register_kernels

_register_kernels()


__all__ = [
    "BitLinear",
    "BitRMSNorm",
    "BitNetConversionConfig",
    "build_sentence_transformer",
    "calibrate_norms",
    "convert",
    "load",
    "save_pretrained",
    "pack",
    "pack_ternary",
    "unpack_ternary",
    "ternary_linear_reference",
]
