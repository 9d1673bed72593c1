"""Weight layouts understood by the ``st_bitnet::ternary_linear`` op, in pure PyTorch.

Every layout holds the same ternary matrix ``W_q`` (``N x K``, values in {-1, 0, 1}); kernels pick the
one they read fastest and the reference decodes any of them back to ``int8 (N, K)``:

* ``"int8"``: ``int8 (N, K)``, ``W_q`` itself (GPU large-batch path: tensor-core int8 GEMM).
* ``"packed2"``: ``uint8 (ceil(N/4), K)``, the on-disk layout of packed BitLinear layers
  (transformers' ``pack_weights``: byte row ``r`` holds output rows ``r + i * ceil(N/4)`` in bits
  ``2i..2i+1`` as ``w + 1``). GPU small-batch path.
* ``"tile16"``: ``uint8 (ceil(N/16), ceil(K/16), 64)``, the CPU kernel's layout (see
  ``ternary_linear_cpu.c``): byte ``o*4 + kk`` of block ``[b, g]`` holds, in bits ``2s..2s+1``,
  ``w + 1`` of output ``16b + o`` at input ``16g + 4s + kk``. Padding rows/columns hold code 1 (w = 0).

The CPU kernel's AMX path reads one more form, built from the ternary matrix at load (not an op layout):

* ``amx64``: ``int8 (ceil(N/16), ceil(K/64), 16, 64)``, one AMX B tile per block ``[b, g]``: row ``r``, byte
  ``4*o + i`` holds ``w`` of output ``16b + o`` at input ``64g + 4r + i``; padding holds 0.
"""

from __future__ import annotations

import torch

from ..bitlinear import pack_ternary, unpack_ternary

LAYOUTS = ("int8", "packed2", "tile16")
TILE_N = 16
TILE_K = 16
AMX_TILE_K = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_weight_shape(layout: str, out_features: int, in_features: int) -> tuple[int, ...]:
    """Shape a ``layout`` weight must have for an ``in_features -> out_features`` linear."""
    if layout == "int8":
        return (out_features, in_features)
    if layout == "packed2":
        return (_ceil_div(out_features, 4), in_features)
    if layout == "tile16":
        return (_ceil_div(out_features, TILE_N), _ceil_div(in_features, TILE_K), 64)
    raise ValueError(f"unknown ternary weight layout {layout!r}; expected one of {LAYOUTS}")


def expected_weight_dtype(layout: str) -> torch.dtype:
    return torch.int8 if layout == "int8" else torch.uint8


def has_invalid_codes(weight: torch.Tensor) -> bool:
    """True if a 2-bit layout holds the code 3 anywhere (both bits of a pair set: corrupt data)."""
    if weight.numel() == 0:
        return False
    w = weight.view(torch.uint8) if weight.dtype != torch.uint8 else weight
    return bool(((w & (w >> 1)) & 0x55).any())


def pack_tile16(w_q: torch.Tensor) -> torch.Tensor:
    """``int8 (N, K)`` ternary weights -> the CPU kernel's ``tile16`` layout (a fresh contiguous tensor)."""
    if w_q.dim() != 2:
        raise ValueError(f"pack_tile16 expects a 2-D (out_features, in_features) tensor, got {tuple(w_q.shape)}")
    n, k = w_q.shape
    nb, kg = _ceil_div(n, TILE_N), _ceil_div(k, TILE_K)
    codes = torch.ones(nb * TILE_N, kg * TILE_K, dtype=torch.uint8, device=w_q.device)
    codes[:n, :k] = (w_q.to(torch.int16) + 1).to(torch.uint8)
    # [b, o, g, s, kk] -> [b, g, s, o, kk]
    c = codes.view(nb, TILE_N, kg, 4, 4).permute(0, 2, 3, 1, 4)
    out = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)  # [b, g, o, kk]
    return out.reshape(nb, kg, 64).contiguous()


def unpack_tile16(blob: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_tile16`: ``tile16`` blob -> ``int8 (N, K)`` in {-1, 0, 1}."""
    nb, kg, _ = blob.shape
    parts = torch.stack([(blob >> (2 * s)) & 3 for s in range(4)], dim=2)  # [b, g, s, 64]
    parts = parts.view(nb, kg, 4, TILE_N, 4).permute(0, 3, 1, 2, 4)  # [b, o, g, s, kk]
    codes = parts.reshape(nb * TILE_N, kg * TILE_K)[:out_features, :in_features]
    return codes.to(torch.int8) - 1


def pack_amx64(w_q: torch.Tensor) -> torch.Tensor:
    """``int8 (N, K)`` ternary weights -> the AMX path's ``amx64`` tiles (a fresh contiguous ``int8`` tensor)."""
    if w_q.dim() != 2:
        raise ValueError(f"pack_amx64 expects a 2-D (out_features, in_features) tensor, got {tuple(w_q.shape)}")
    n, k = w_q.shape
    nb, kb = _ceil_div(n, TILE_N), _ceil_div(k, AMX_TILE_K)
    padded = torch.zeros(nb * TILE_N, kb * AMX_TILE_K, dtype=torch.int8, device=w_q.device)
    padded[:n, :k] = w_q
    # [b, o, g, r, i] -> [b, g, r, o, i]
    return padded.view(nb, TILE_N, kb, 16, 4).permute(0, 2, 3, 1, 4).reshape(nb, kb, 16, 64).contiguous()


def unpack_amx64(blob: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_amx64`: ``amx64`` tiles -> ``int8 (N, K)``."""
    nb, kb = blob.shape[:2]
    full = blob.view(nb, kb, 16, TILE_N, 4).permute(0, 3, 1, 2, 4).reshape(nb * TILE_N, kb * AMX_TILE_K)
    return full[:out_features, :in_features].contiguous()


def to_layout(w_q: torch.Tensor, layout: str) -> torch.Tensor:
    """``int8 (N, K)`` ternary weights -> ``layout``."""
    if layout == "int8":
        return w_q.to(torch.int8).contiguous()
    if layout == "packed2":
        return pack_ternary(w_q)
    if layout == "tile16":
        return pack_tile16(w_q)
    raise ValueError(f"unknown ternary weight layout {layout!r}; expected one of {LAYOUTS}")


def decode_weight(weight: torch.Tensor, layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """Any layout -> ``int8 (N, K)`` ternary weights; raises ``ValueError`` on corrupt 2-bit codes."""
    if layout == "int8":
        return weight
    if has_invalid_codes(weight):
        raise ValueError(f"{layout} ternary weight holds the invalid 2-bit code 3 (corrupt checkpoint?)")
    if layout == "packed2":
        return unpack_ternary(weight, out_features)
    if layout == "tile16":
        return unpack_tile16(weight, out_features, in_features)
    raise ValueError(f"unknown ternary weight layout {layout!r}; expected one of {LAYOUTS}")
