"""Calibration of the RMSNorms that conversion puts inside BitLinear layers.

A norm initialised to ones rescales every token to unit RMS, which changes the function of a pretrained
backbone (BERT's biased projections and residual branches see inputs 5-20x smaller or larger than they were
trained on). Fitting each norm's per-channel weight by least squares on a few real sentences (``w_c = E[x_c n_c] /
E[n_c^2]`` with ``n = x / rms(x)``) makes ``norm(x) ~= x`` on typical tokens, so the converted model starts
where the full-precision one was. Measured effect on all-MiniLM-L6-v2: the README's conversion table.
"""

from __future__ import annotations

import torch

from .bitlinear import BitLinear
from .introspection import backbones, is_sentence_transformer


@torch.no_grad()
def calibrate_norms(model, sentences: list[str], batch_size: int | None = None) -> int:
    """Set every latent BitLinear norm's weight to the mean RMS of its input on ``sentences`` (in place).

    Layers are calibrated in forward order within one pass over the first batch, so each layer sees inputs
    produced by already-calibrated upstream layers. Padding tokens are excluded.

    Args:
        model: a SentenceTransformer with latent BitLinear layers from :func:`st_bitnet.convert`.
        sentences: a few dozen representative texts.
        batch_size: encode batch size (default: all sentences in one batch, the one used for calibration).

    Returns:
        The number of norms calibrated.

    Example::

        st_bitnet.convert(model)
        st_bitnet.calibrate_norms(model, train_sentences[:64])
    """
    if not sentences:
        raise ValueError("calibrate_norms needs at least one sentence")
    if not is_sentence_transformer(model):
        raise TypeError(f"calibrate_norms expects a SentenceTransformer, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, BitLinear) and m.rms_norm is not None]
    if not layers:
        raise ValueError("no BitLinear with a norm to calibrate: convert the model with norm='per_projection' or 'subln'")
    if any(m.is_packed for m in layers):
        raise ValueError("calibrate_norms runs before packing (the norm weights are part of the packed model)")
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    done: set[int] = set()

    def capture_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        mask_holder["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def calibrate(module: BitLinear, args):
        if id(module) in done:
            return
        x = args[0].float()
        mask = mask_holder["mask"]
        if mask is not None and mask.shape == x.shape[:-1]:
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1])
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.rms_norm.variance_epsilon)
        # per-channel least squares: weight_c = argmin E[(w_c * normed_c - x_c)^2]
        weight = (x * normed).sum(0) / normed.pow(2).sum(0).clamp(min=1e-12)
        module.rms_norm.weight.copy_(weight.to(module.rms_norm.weight.dtype))
        done.add(id(module))

    handles = [b.register_forward_pre_hook(capture_mask, with_kwargs=True) for b in backbones(model)]
    handles += [m.register_forward_pre_hook(calibrate) for m in layers]
    try:
        model.encode(list(sentences), batch_size=batch_size or len(sentences), convert_to_numpy=True)
    finally:
        for h in handles:
            h.remove()
    return len(done)
