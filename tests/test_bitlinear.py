import pytest
import torch

from st_bitnet.bitlinear import (
    BitLinear,
    pack_ternary,
    quantize_activations_int8,
    quantize_weight_ternary,
    ternary_linear_reference,
    unpack_ternary,
)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (4, 7), (5, 3), (13, 17), (64, 33), (127, 2)])
def test_pack_round_trip_odd_sizes(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    w = torch.randint(-1, 2, (n, k), generator=g).to(torch.int8)
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 3) // 4, k)
    assert torch.equal(unpack_ternary(packed, n), w)


def test_pack_matches_transformers_layout():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w = torch.randint(-1, 2, (16, 9), generator=torch.Generator().manual_seed(0))
    ours = pack_ternary(w)
    assert torch.equal(ours, pack_weights(w.clone()))
    assert torch.equal(unpack_weights(ours, torch.float32).to(torch.int8), w.to(torch.int8))


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="rows"):
        unpack_ternary(torch.zeros(3, 4, dtype=torch.uint8), out_features=4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_ternary(torch.zeros(1, 4, dtype=torch.int8), out_features=4)
    with pytest.raises(ValueError, match="invalid 2-bit code"):
        unpack_ternary(torch.full((1, 4), 0xFF, dtype=torch.uint8), out_features=4)
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_ternary(torch.full((2, 2), 2))


def test_quantizers_follow_the_formulas():
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0]])
    w_q, scale = quantize_weight_ternary(w)
    assert torch.allclose(scale, torch.tensor([1 / 0.65]))
    assert w_q.tolist() == [[1, 0, 0, 1]]
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    x_q, x_scale = quantize_activations_int8(x)
    assert x_q.tolist()[0] == [64, -127, 32]  # 63.5 rounds half to even -> 64; 31.75 -> 32
    assert x_q.tolist()[1] == [0, 0, 0] and torch.isfinite(x_scale).all()


def test_reference_is_integer_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    w_q = torch.randint(-1, 2, (7, 300), generator=g).to(torch.int8)
    scale = torch.tensor([3.0])
    y = ternary_linear_reference(x, w_q, scale)
    x_q, x_scale = quantize_activations_int8(x)
    acc = (x_q.long() @ w_q.long().T).float()  # int64 ground truth
    assert torch.equal(y, acc / (scale * x_scale))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use_norm", [False, True])
def test_qat_forward_equals_packed_reference(bias, use_norm):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20, bias=bias)
    latent = BitLinear.from_linear(lin, use_rms_norm=use_norm)
    if use_norm:
        latent.rms_norm.weight.data.uniform_(0.5, 1.5)
    packed = BitLinear.from_linear(lin, use_rms_norm=use_norm)
    packed.load_state_dict(latent.state_dict())
    packed.pack_()
    assert packed.is_packed and not latent.is_packed
    x = torch.randn(2, 6, 48)
    assert torch.equal(latent(x), packed(x))
    # and equal to the reference applied by hand on the normalized input
    xn = latent.rms_norm(x) if use_norm else x
    w_q, s = quantize_weight_ternary(lin.weight)
    assert torch.equal(packed(x), ternary_linear_reference(xn, w_q, s, lin.bias))


def test_ste_gradients_flow_to_weights_inputs_and_norm():
    torch.manual_seed(0)
    layer = BitLinear(32, 16, bias=True)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for t in (layer.weight.grad, layer.bias.grad, layer.rms_norm.weight.grad, x.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def test_packed_layer_rejects_wrong_input_width():
    layer = BitLinear(8, 4).pack_()
    with pytest.raises(ValueError, match="last dimension 8"):
        layer(torch.randn(2, 9))


def test_bf16_input_keeps_dtype():
    layer = BitLinear(16, 8, use_rms_norm=False).pack_()
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 8)


def test_reference_ignores_an_ambient_autocast():
    # a packed model called inside a bf16 training loop (or a user's autocast) keeps the exact integer product
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 257, generator=g)
    w_q = torch.randint(-1, 2, (33, 257), generator=g).to(torch.int8)
    scale, bias = torch.tensor([1.7]), torch.randn(33, generator=g)
    want = ternary_linear_reference(x, w_q, scale, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ternary_linear_reference(x, w_q, scale, bias)
    assert got.dtype == torch.float32 and torch.equal(got, want)
