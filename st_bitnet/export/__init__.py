"""Export of packed BitEmbed models to other runtimes: bitnet.cpp (I2_S GGUF)."""

from .gguf_export import export_gguf
from .i2s import GGML_TYPE_I2_S, LLAMA_FTYPE_MOSTLY_I2_S, gguf_knows_i2_s, pack_i2_s, read_i2_s_tensor, unpack_i2_s

__all__ = [
    "GGML_TYPE_I2_S",
    "LLAMA_FTYPE_MOSTLY_I2_S",
    "export_gguf",
    "gguf_knows_i2_s",
    "pack_i2_s",
    "read_i2_s_tensor",
    "unpack_i2_s",
]
