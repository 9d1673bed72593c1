"""Block-wise reconstruction losses: their maths on tensors, and a warm start that trains with each of them."""

from __future__ import annotations

import pytest
import torch

from st_bitnet.training.blockwise import (
    BlockwiseConfig,
    blockwise_warm_start,
    channel_normalized_error,
    relative_error,
    relative_plus_channel_normalized_error,
)


def _batch(g, massive: float):
    # 2 sentences x 5 tokens x 8 channels; channel 0 is a large constant (a "massive activation")
    target = torch.randn(2, 5, 8, generator=g)
    target[..., 0] = massive
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return target, mask


def test_channel_normalized_error_formula():
    g = torch.Generator().manual_seed(0)
    target, mask = _batch(g, 3.0)
    output = target + 0.1 * torch.randn(target.shape, generator=g)
    real = target[mask.bool()]  # (7, 8)
    scale = real.var(dim=0, unbiased=False) + 0.01 * real.pow(2).mean(dim=0)
    want = (((output - target)[mask.bool()] ** 2) / scale).mean()
    assert torch.allclose(channel_normalized_error(output, target, mask), want, rtol=1e-5)
    assert channel_normalized_error(target, target, mask) == 0
    # padded tokens count for nothing
    output[1, 4] += 100.0
    assert torch.allclose(channel_normalized_error(output, target, mask), want, rtol=1e-5)


def test_a_massive_constant_channel_dominates_the_relative_error_only():
    g = torch.Generator().manual_seed(1)
    target, mask = _batch(g, 1000.0)
    fits_massive_only = target.clone()
    fits_massive_only[..., 1:] = 0.0  # every sentence-dependent channel wrong
    fits_rest_only = target.clone()
    fits_rest_only[..., 0] *= 0.99  # 1% off on the constant channel, the rest exact
    # the relative error prefers the output that gets the constant channel right and nothing else ...
    assert relative_error(fits_massive_only, target, mask) < relative_error(fits_rest_only, target, mask)
    # ... the channel-normalized error prefers the one that gets the informative channels right
    assert channel_normalized_error(fits_rest_only, target, mask) < channel_normalized_error(fits_massive_only, target, mask)
    # the constant channel is measured against a tenth of its size: 1% off costs (0.01)^2 / 0.01 = 0.01 there
    assert torch.allclose(channel_normalized_error(fits_rest_only, target, mask), torch.tensor(0.01 / 8), rtol=1e-4)


def test_the_sum_keeps_both_preferences():
    g = torch.Generator().manual_seed(2)
    target, mask = _batch(g, 1000.0)
    output = target + 0.1 * torch.randn(target.shape, generator=g)
    want = relative_error(output, target, mask) + channel_normalized_error(output, target, mask)
    assert torch.allclose(relative_plus_channel_normalized_error(output, target, mask), want)
    assert relative_plus_channel_normalized_error(target, target, mask) == 0
    scale_lost = target.clone()
    scale_lost[..., 0] *= 0.5  # the massive channel at half its size, the rest exact: the relative term sees it
    assert relative_plus_channel_normalized_error(scale_lost, target, mask) > channel_normalized_error(scale_lost, target, mask) + 0.2


def test_loss_mode_is_validated():
    with pytest.raises(ValueError, match="warm_start.loss"):
        BlockwiseConfig(loss="mse")


@pytest.mark.parametrize("loss", ["relative", "channel_normalized", "relative_plus_channel_normalized"])
def test_warm_start_lowers_the_chosen_loss(tiny_model_dir, loss):
    import st_bitnet
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(tiny_model_dir, device="cpu")
    student = st_bitnet.convert(SentenceTransformer(tiny_model_dir, device="cpu"), st_bitnet.BitNetConversionConfig(norm="none"))
    texts = [f"sentence {i} about topic {i % 5} and number {i * 7}" for i in range(48)]
    config = BlockwiseConfig(texts=48, steps_per_block=25, batch_size=8, learning_rate=2e-3, held_out_batches=1, loss=loss)
    report = blockwise_warm_start(student, teacher, texts, config, seed=0)
    assert len(report) >= 1
    key = "relative_error" if loss == "relative" else "loss"
    for entry in report:
        assert entry[f"{key}_after"] < entry[f"{key}_before"], entry
    if loss != "relative":
        assert all(e["loss"] == loss and "relative_error_after" in e for e in report)
