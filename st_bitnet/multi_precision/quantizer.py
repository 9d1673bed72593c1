"""``MultiPrecisionQuantizer``: the trained output quantizer of BITEMBED (16/8/4/2/1-bit from one model)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from sentence_transformers.sentence_transformer.modules import Module

from .module_io import SafetensorsModuleIO
from .packing import codes_from_normalized
from .precision import BITS, resolve_bits
from .quantized_embeddings import QuantizedEmbeddings

BinaryThreshold = Literal["offset", "zero"]
CalibrationMethod = Literal["std", "minmax"]
# Calibration: a dimension whose range is below this fraction of the median range is treated as constant.
DEGENERATE_RANGE_FRACTION = 1e-3
# A saved rotation must be orthogonal to this tolerance (float32 storage of a trained rotation is ~1e-6 off).
ORTHOGONALITY_TOLERANCE = 1e-3


class MultiPrecisionQuantizer(SafetensorsModuleIO, Module):
    """Learned per-dimension quantizer of the sentence embedding, serving 16/8/4/2/1-bit outputs from one model.

    Each dimension ``i`` has an ``offset`` and a positive ``scale`` (stored as ``log_scale``). The embedding ``x`` is
    normalized to ``z = (x - offset) / scale``; ``[-1, 1)`` is split into ``2**b`` equal buckets, so the ``b``-bit code
    is ``floor((z + 1) / 2 * 2**b)`` and the codes nest (the 4-bit code is the top half of the 8-bit code, the 1-bit
    code is its top bit = the sign of ``z``), as in Matryoshka Quantization. 16 bits is a passthrough of ``x``
    (rounded to float16 when stored).

    With ``rotation=True`` the quantizer also learns an orthogonal map ``R`` applied before the offset and scale:
    ``z = (x R - offset) / scale`` at every low precision (so the codes still nest). An orthogonal map leaves every
    float cosine unchanged, but it chooses *which* directions the per-dimension codes, and above all the 1-bit signs,
    are taken along: a per-dimension threshold is all a plain sign code can learn, a rotation can align the code
    axes with the similarity structure. ``R = base @ (I + S)^-1 (I - S)`` with ``S = G - G^T`` (``G`` the strictly
    upper triangle of ``rotation_generator``; the Cayley transform of a skew-symmetric matrix is orthogonal), so it
    stays orthogonal during training; it starts as the identity (the quantizer then behaves exactly as without a
    rotation) and is saved as one ``(dim, dim)`` matrix. The losses compute ``R`` once per forward
    (:meth:`rotation_fixed`), not once per precision.

    In the pipeline the module is a passthrough, so ``model.encode`` returns the float output as before. During
    training :class:`~st_bitnet.losses.MultiPrecisionLoss` asks :meth:`fake_quantize` for every precision: the
    forward value is the dequantized code, the gradient is the straight-through estimator (identity inside the
    range, zero outside), so ``offset``, ``scale`` and the backbone all learn. The ranges are saved with the model
    (``model.safetensors`` of this module) and never re-fit per call.

    Args:
        embedding_dimension: Dimension of the sentence embedding.
        precisions: The bit widths this quantizer serves (any of 16, 8, 4, 2, 1).
        binary_threshold: ``"offset"`` (the 1-bit code is the sign of ``x - offset``: nested, trained) or ``"zero"``
            (the sign of ``x``, as sentence-transformers' ``binary``; used by post-hoc quantization).
        calibrated: Whether :meth:`calibrate` has set the ranges (saved so a reloaded model knows).
        rotation: Learn an orthogonal map before the per-dimension quantizer (adds ``dim**2`` parameters; give its
            ``rotation_generator`` the quantizer's learning rate). With ``binary_threshold="zero"`` the 1-bit code
            is then the sign of ``x R``.

    References:
        - Nair et al., "Matryoshka Quantization", 2025: https://huggingface.co/papers/2502.06786
        - Gong & Lazebnik, "Iterative Quantization" (a rotation before the sign), CVPR 2011
        - Lezcano-Casado & Martinez-Rubio, "Cheap Orthogonal Constraints in Neural Networks" (orthogonal maps as
          the Cayley / exponential image of a skew-symmetric parameter, around a base), ICML 2019:
          https://arxiv.org/abs/1901.08428
        - Bengio et al., straight-through estimator, 2013: https://arxiv.org/abs/1308.3432

    Example:
        ::

            from sentence_transformers import SentenceTransformer
            from st_bitnet.multi_precision import MultiPrecisionQuantizer, encode

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            quantizer = MultiPrecisionQuantizer.from_embeddings(model.encode(calibration_sentences))
            model.append(quantizer)
            codes = encode(model, ["A sentence"], precision="2bit")  # QuantizedEmbeddings, 96 bytes/vector
    """

    config_keys = ["embedding_dimension", "precisions", "binary_threshold", "calibrated", "rotation"]

    def __init__(
        self,
        embedding_dimension: int,
        precisions: tuple[int, ...] | list[int] = BITS,
        binary_threshold: BinaryThreshold = "offset",
        calibrated: bool = False,
        rotation: bool = False,
    ) -> None:
        super().__init__()
        if int(embedding_dimension) <= 0:
            raise ValueError(f"embedding_dimension must be positive, got {embedding_dimension}.")
        if binary_threshold not in ("offset", "zero"):
            raise ValueError(f"binary_threshold must be 'offset' or 'zero', got {binary_threshold!r}.")
        precisions = tuple(sorted({resolve_bits(p) for p in precisions}, reverse=True))
        if not precisions:
            raise ValueError("precisions must name at least one bit width.")
        self.embedding_dimension = int(embedding_dimension)
        self.precisions = list(precisions)
        self.binary_threshold = binary_threshold
        self.calibrated = bool(calibrated)
        self.offset = nn.Parameter(torch.zeros(self.embedding_dimension))
        self.log_scale = nn.Parameter(torch.zeros(self.embedding_dimension))
        self.rotation = bool(rotation)
        if self.rotation:
            dim = self.embedding_dimension
            # R = rotation_base @ cayley(skew(rotation_generator)): orthogonal whatever the optimizer does.
            self.rotation_generator = nn.Parameter(torch.zeros(dim, dim))
            self.rotation_base = nn.Buffer(torch.eye(dim))
        self._fixed_rotation: Tensor | None = None  # set inside rotation_fixed()
        # Runtime knob, not saved: when set, forward emits the fake-quantized embedding at this width (e.g. to run
        # a sentence-transformers evaluator at 2 bits during training). None = passthrough (the default).
        self.active_bits: int | None = None

    # ---- maths (tensor only) -------------------------------------------------------------------------------------
    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    @property
    def nested(self) -> bool:
        """Whether the 1-bit code is the top bit of the 8-bit code (``binary_threshold == "offset"``)."""
        return self.binary_threshold == "offset"

    def rotation_matrix(self) -> Tensor | None:
        """The orthogonal ``(dim, dim)`` map ``R`` applied before quantization (``x R``), or None without one."""
        if not self.rotation:
            return None
        if self._fixed_rotation is not None:
            return self._fixed_rotation
        generator = self.rotation_generator
        if not (torch.is_grad_enabled() and generator.requires_grad) and not generator.any():
            return self.rotation_base  # a loaded (folded) rotation: nothing to solve at inference
        upper = generator.triu(1)
        skew = upper - upper.T
        identity = torch.eye(self.embedding_dimension, dtype=skew.dtype, device=skew.device)
        return self.rotation_base @ torch.linalg.solve(identity + skew, identity - skew)

    @contextmanager
    def rotation_fixed(self) -> Iterator[None]:
        """Within the block every use of ``R`` shares one computation (and one autograd graph): a loss forward
        fake-quantizes several columns at several precisions with the same ``R``. Re-entrant; no-op without a
        rotation."""
        if not self.rotation or self._fixed_rotation is not None:
            yield
            return
        self._fixed_rotation = self.rotation_matrix()
        try:
            yield
        finally:
            self._fixed_rotation = None

    def rotate(self, embeddings: Tensor) -> Tensor:
        """``x R`` (the identity without a rotation)."""
        rotation = self.rotation_matrix()
        return embeddings if rotation is None else embeddings @ rotation.to(embeddings.dtype)

    def normalize(self, embeddings: Tensor) -> Tensor:
        """``z = (x R - offset) / scale``: the space where the bucket grid is ``[-1, 1)``."""
        return self._scale_rotated(self.rotate(embeddings))

    def _scale_rotated(self, rotated: Tensor) -> Tensor:
        return (rotated - self.offset.to(rotated.dtype)) / self.scale.to(rotated.dtype)

    def binary_positive(self, embeddings: Tensor) -> Tensor:
        """Where the 1-bit code is 1: ``z >= 0`` (threshold ``"offset"``) or ``x R > 0`` (``"zero"``). No gradient."""
        rotated = self.rotate(embeddings)
        return self._binary_rule(rotated, self._scale_rotated(rotated))

    def _binary_rule(self, rotated, normalized):
        """The 1-bit rule on ``x R`` and ``z`` (tensors or numpy arrays): one place for training and inference."""
        return rotated > 0 if self.binary_threshold == "zero" else normalized >= 0

    def fake_quantize(self, embeddings: Tensor, bits: int) -> Tensor:
        """Dequantized ``bits``-bit embeddings with straight-through gradients (differentiable).

        Args:
            embeddings: ``(batch, dim)`` float embeddings (the module's input).
            bits: 16 (float16 round trip), 8, 4, 2 (bucket midpoints in the normalized space) or 1 (``+-1`` signs).

        Returns:
            ``(batch, dim)`` tensor equal in value to :meth:`quantize` followed by dequantization.
        """
        bits = resolve_bits(bits)
        if bits == 16:
            return embeddings + (embeddings.to(torch.float16).to(embeddings.dtype) - embeddings).detach()
        rotated = self.rotate(embeddings)
        z = self._scale_rotated(rotated)
        clipped = z.clamp(-1.0, 1.0)
        if bits == 1:
            signs = torch.where(self._binary_rule(rotated, z), 1.0, -1.0).to(z.dtype)
            return clipped + (signs - clipped).detach()
        levels = float(1 << bits)
        codes = torch.floor((clipped + 1.0) * (levels / 2.0)).clamp(0.0, levels - 1.0)
        midpoints = (2.0 * codes + 1.0) / levels - 1.0
        return clipped + (midpoints - clipped).detach()

    def forward(self, features: dict[str, Tensor | Any], **kwargs) -> dict[str, Tensor | Any]:
        if self.active_bits is not None:
            features["sentence_embedding"] = self.fake_quantize(features["sentence_embedding"], self.active_bits)
        return features

    # ---- calibration ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self,
        embeddings: np.ndarray | Tensor,
        method: CalibrationMethod = "std",
        std_multiplier: float = 2.0,
        degenerate_fraction: float = DEGENERATE_RANGE_FRACTION,
    ) -> MultiPrecisionQuantizer:
        """Set ``offset`` / ``scale`` from representative embeddings (the starting point of training). With a
        rotation, the statistics are those of the rotated embeddings ``x R``.

        Args:
            embeddings: ``(n, dim)`` float embeddings of calibration texts (a few hundred or more).
            method: ``"std"``: offset = per-dimension median (balanced 1-bit codes), scale = ``std_multiplier`` x std
                (clips outliers, good for 2 and 4 bits). ``"minmax"``: the per-dimension min/max range of
                sentence-transformers' ``int8`` quantization (offset = midrange, scale = half range).
            std_multiplier: Half-width of the range in standard deviations for ``method="std"``.
            degenerate_fraction: A dimension whose range is under this fraction of the median range carries no
                information: it gets the median range and a fixed middle code (0 keeps every measured range, as
                sentence-transformers does; an exactly constant dimension always gets the middle code).

        Returns:
            ``self``, calibrated.
        """
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not isinstance(embeddings, Tensor) else embeddings)
        x = x.detach().to(torch.float64).cpu()
        if x.ndim != 2 or x.shape[1] != self.embedding_dimension:
            raise ValueError(f"Calibration embeddings must have shape (n, {self.embedding_dimension}), got {tuple(x.shape)}.")
        if x.shape[0] < 2:
            raise ValueError("Calibration needs at least 2 embeddings (ideally hundreds).")
        rotation = self.rotation_matrix()
        if rotation is not None:
            x = x @ rotation.detach().to(torch.float64).cpu()
        if method == "std":
            offset = x.median(dim=0).values
            half_range = std_multiplier * x.std(dim=0)
        elif method == "minmax":
            low, high = x.min(dim=0).values, x.max(dim=0).values
            offset, half_range = (low + high) / 2, (high - low) / 2
        else:
            raise ValueError(f"Unknown calibration method {method!r}; expected 'std' or 'minmax'.")
        # A dimension with next to no spread carries no information (all-MiniLM-L6-v2's output has one: std 1e-5,
        # the others ~1). Its own range would make its codes rounding noise and its straight-through gradient
        # 1 / range (~1e6 x the others', enough to dominate gradient clipping). Give it the typical range and put
        # it just above its offset, so every width codes it in the upper-middle bucket (nested; the smallest
        # constant term in every dot product) and its gradient is an ordinary one.
        typical = half_range.quantile(0.5)  # interpolated: with few dimensions the lower median may be degenerate
        typical = typical if typical > 1e-12 else torch.ones_like(typical)
        degenerate = (half_range < degenerate_fraction * typical) | (half_range <= 1e-12)
        half_range = torch.where(degenerate, typical, half_range)
        offset = torch.where(degenerate, offset - typical / 256, offset)  # z = +1/256: inside [0, 1/128)
        self.offset.copy_(offset.to(self.offset.dtype))
        self.log_scale.copy_(half_range.log().to(self.log_scale.dtype))
        self.calibrated = True
        return self

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray | Tensor,
        precisions: tuple[int, ...] | list[int] = BITS,
        binary_threshold: BinaryThreshold = "offset",
        method: CalibrationMethod = "std",
        std_multiplier: float = 2.0,
        rotation: bool = False,
        degenerate_fraction: float = DEGENERATE_RANGE_FRACTION,
    ) -> MultiPrecisionQuantizer:
        """A new quantizer calibrated on ``embeddings`` (see :meth:`calibrate`); ``rotation`` as in the constructor
        (it starts as the identity)."""
        embeddings = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, Tensor) else embeddings)
        if embeddings.ndim != 2:
            raise ValueError(f"Calibration embeddings must be 2-D (n, dim), got shape {embeddings.shape}.")
        quantizer = cls(embeddings.shape[1], precisions=precisions, binary_threshold=binary_threshold, rotation=rotation)
        return quantizer.calibrate(
            embeddings, method=method, std_multiplier=std_multiplier, degenerate_fraction=degenerate_fraction
        )

    # ---- inference -----------------------------------------------------------------------------------------------
    def quantize(self, embeddings: np.ndarray | Tensor, bits: int | str) -> QuantizedEmbeddings:
        """Packed codes of float embeddings (the module's input) at ``bits`` with the stored ranges.

        Raises:
            ValueError: If ``bits`` is not one this quantizer serves, or the shape / values are wrong.
        """
        bits = resolve_bits(bits)
        if bits not in self.precisions:
            raise ValueError(f"This quantizer serves {self.precisions} bits, not {bits}.")
        if isinstance(embeddings, Tensor):
            embeddings = embeddings.detach().float().cpu().numpy()
        x = np.asarray(embeddings)
        if x.dtype.kind != "f":
            raise TypeError(f"Embeddings to quantize must be floating point, got {x.dtype}.")
        if x.ndim != 2 or x.shape[1] != self.embedding_dimension:
            raise ValueError(f"Embeddings must have shape (n, {self.embedding_dimension}), got {x.shape}.")
        if bits == 16:
            return QuantizedEmbeddings(x.astype(np.float16), 16, self.embedding_dimension)
        with torch.no_grad():
            offset = self.offset.detach().double().cpu().numpy()
            scale = self.scale.detach().double().cpu().numpy()
            rotation = self.rotation_matrix()
        x = x.astype(np.float64)
        if rotation is not None:
            x = x @ rotation.detach().double().cpu().numpy()
        z = (x - offset) / scale
        fingerprint = self.fingerprint()
        if bits == 1:
            return QuantizedEmbeddings.from_codes(self._binary_rule(x, z).astype(np.uint8), 1, fingerprint)
        return QuantizedEmbeddings.from_codes(codes_from_normalized(z, bits), bits, fingerprint)

    def fingerprint(self) -> str:
        """A short hash of what the codes depend on (ranges, rotation, 1-bit rule): codes quantized by two
        quantizers are comparable only when their fingerprints are equal."""
        import hashlib

        digest = hashlib.sha256(self.binary_threshold.encode())
        with torch.no_grad():
            tensors = [self.offset, self.log_scale] + ([self.rotation_matrix()] if self.rotation else [])
            for tensor in tensors:
                digest.update(tensor.detach().double().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    # ---- persistence ---------------------------------------------------------------------------------------------
    # Saved by SafetensorsModuleIO: always safetensors, never pickled. The file holds ``offset`` and ``log_scale``
    # and, with a rotation, the orthogonal matrix itself as ``rotation`` (base and generator folded into one).
    def saved_state(self) -> dict[str, Tensor]:
        state = {"offset": self.offset, "log_scale": self.log_scale}
        if self.rotation:
            with torch.no_grad():
                state["rotation"] = self.rotation_matrix().detach()
        return state

    def load_saved_state(self, state: dict[str, Tensor], source: str) -> None:
        expected = {"offset", "log_scale"} | ({"rotation"} if self.rotation else set())
        missing = expected - set(state)
        if missing:
            raise ValueError(f"MultiPrecisionQuantizer weights in {source} lack {sorted(missing)}.")
        unexpected = set(state) - expected
        if unexpected:
            raise ValueError(
                f"MultiPrecisionQuantizer weights in {source} have unexpected {sorted(unexpected)} "
                f"(its config says rotation={self.rotation})."
            )
        dim = self.embedding_dimension
        for name in ("offset", "log_scale"):
            if tuple(state[name].shape) != (dim,):
                raise ValueError(f"MultiPrecisionQuantizer {name} has shape {tuple(state[name].shape)}, expected ({dim},).")
        with torch.no_grad():
            self.offset.copy_(state["offset"])
            self.log_scale.copy_(state["log_scale"])
            if self.rotation:
                rotation = state["rotation"]
                if tuple(rotation.shape) != (dim, dim):
                    raise ValueError(f"MultiPrecisionQuantizer rotation has shape {tuple(rotation.shape)}, expected ({dim}, {dim}).")
                error = (rotation.double() @ rotation.double().T - torch.eye(dim, dtype=torch.float64)).abs().max().item()
                if not error <= ORTHOGONALITY_TOLERANCE:
                    raise ValueError(f"MultiPrecisionQuantizer rotation in {source} is not orthogonal (max |R R^T - I| = {error:.2e}).")
                self.rotation_base.copy_(rotation)
                self.rotation_generator.zero_()
