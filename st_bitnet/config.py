"""Configuration of a BitNet conversion (torchao style: one config object with a version field)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .bitlinear import NORM_PLACEMENTS

CONFIG_VERSION = 1


@dataclass
class BitNetConversionConfig:
    """How :func:`st_bitnet.convert` turns a backbone into a W1.58A8 encoder.

    Args:
        norm: where BitLinear layers get their own RMSNorm. ``"per_projection"`` (default): every converted
            projection normalizes its input, as in Microsoft's bitnet-embedding checkpoints.
            ``"subln"``: only the projections fed by attention / FFN internals (``o_proj``, ``down_proj``
            and their encoder equivalents), as in BitDistill's SubLN. ``"none"``: no extra norms.
        bidirectional: ``True`` makes a decoder attend in both directions, ``False`` forces causal,
            ``None`` keeps the backbone's attention.
        rms_norm_eps: epsilon of the added norms; ``None`` takes the backbone's ``rms_norm_eps`` /
            ``layer_norm_eps`` (else 1e-6).
        modules_to_not_convert: qualified-name suffixes of linear layers to keep in full precision, on top
            of the filter function.
        version: format version of this config; loading a newer version fails loudly.

    Example::

        from st_bitnet import BitNetConversionConfig, convert
        model = convert("Qwen/Qwen3-0.6B", BitNetConversionConfig(bidirectional=True))
    """

    norm: str = "per_projection"
    bidirectional: bool | None = None
    rms_norm_eps: float | None = None
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm must be one of {NORM_PLACEMENTS}, got {self.norm!r}")
        if self.bidirectional not in (None, True, False):
            raise ValueError(f"bidirectional must be True, False or None, got {self.bidirectional!r}")
        if self.rms_norm_eps is not None and not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if isinstance(self.modules_to_not_convert, str):
            raise TypeError("modules_to_not_convert must be a list of names, not a string")
        self.modules_to_not_convert = tuple(self.modules_to_not_convert)
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"this BitNetConversionConfig has version {self.version}, newer than this st_bitnet understands "
                f"({CONFIG_VERSION}); upgrade st_bitnet"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BitNetConversionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BitNetConversionConfig keys: {sorted(unknown)}")
        return cls(**d)
