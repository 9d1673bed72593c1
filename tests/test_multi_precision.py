"""Multi-precision codes, quantizer maths, similarity, search and storage (no model weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentence_transformers.util import quantize_embeddings

from st_bitnet.multi_precision import (
    BITS,
    MultiPrecisionIndex,
    MultiPrecisionQuantizer,
    QuantizedEmbeddings,
    format_storage_report,
    hamming_distance,
    pack_codes,
    packed_width,
    posthoc_quantizer,
    resolve_bits,
    semantic_search_multi_precision,
    similarity,
    similarity_at_bits,
    storage_report,
    unpack_codes,
)


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Per-dimension offsets and scales, like a real model's output (not a centred unit Gaussian).
    return (rng.normal(size=(300, 37)) * rng.uniform(0.2, 2.0, 37) + rng.normal(size=37)).astype(np.float32)


@pytest.fixture(scope="module")
def quantizer(embeddings) -> MultiPrecisionQuantizer:
    return MultiPrecisionQuantizer.from_embeddings(embeddings)


# ---- precision names ------------------------------------------------------------------------------------------------
def test_precision_names():
    assert BITS == (16, 8, 4, 2, 1)
    assert [resolve_bits(n) for n in ("16bit", "float16", "8bit", "4bit", "2bit", "1bit")] == [16, 16, 8, 4, 2, 1]
    assert resolve_bits(4) == 4
    with pytest.raises(ValueError, match="Unknown precision"):
        resolve_bits("3bit")
    with pytest.raises(ValueError, match="post-hoc"):
        resolve_bits("int8")  # sentence-transformers' name: never silently mapped to the trained 8-bit
    with pytest.raises(ValueError):
        resolve_bits(3)
    with pytest.raises(ValueError):
        resolve_bits(True)


# ---- packing ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [1, 7, 13, 384])
def test_pack_round_trip(bits, dim):
    rng = np.random.default_rng(bits * 1000 + dim)
    codes = rng.integers(0, 1 << bits, size=(5, dim)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, packed_width(dim, bits)) == (5, -(-dim * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, dim), codes)


def test_pack_layout_matches_packbits_and_high_bits_first():
    codes = np.array([[1, 0, 1, 1, 0, 0, 0, 1, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 1), np.packbits(codes, axis=-1))  # == ST ubinary layout
    np.testing.assert_array_equal(pack_codes(np.array([[0xA, 0x3, 0xF]], np.uint8), 4), [[0xA3, 0xF0]])
    np.testing.assert_array_equal(pack_codes(np.array([[3, 0, 2, 1, 1]], np.uint8), 2), [[0b11001001, 0b01000000]])


def test_pack_rejects_codes_too_wide_and_bad_packed_input():
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(np.array([[4]], np.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(np.zeros((2, 3), np.int8), 4, 6)
    with pytest.raises(ValueError, match="shape"):
        unpack_codes(np.zeros((2, 4), np.uint8), 4, 6)


# ---- quantizer maths ------------------------------------------------------------------------------------------------------
def test_codes_nest_like_matryoshka(embeddings, quantizer):
    codes8 = quantizer.quantize(embeddings, 8)
    for bits in (4, 2, 1):
        direct = quantizer.quantize(embeddings, bits)
        np.testing.assert_array_equal(codes8.to_bits(bits).codes, direct.codes)
        np.testing.assert_array_equal(direct.unpacked(), codes8.unpacked() >> (8 - bits))
    # Codes use every bucket of the range (calibration is not degenerate).
    assert len(np.unique(quantizer.quantize(embeddings, 2).unpacked())) == 4


def test_one_bit_is_sign_around_offset(embeddings, quantizer):
    offset = quantizer.offset.detach().numpy()
    np.testing.assert_array_equal(quantizer.quantize(embeddings, 1).unpacked(), (embeddings >= offset).astype(np.uint8))
    # The median offset balances the bits: about half of each dimension's codes are 1.
    assert np.all(np.abs(quantizer.quantize(embeddings, 1).unpacked().mean(0) - 0.5) < 0.05)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_equals_quantize_dequantize(embeddings, quantizer, bits):
    fake = quantizer.fake_quantize(torch.from_numpy(embeddings), bits).detach().numpy()
    real = quantizer.quantize(embeddings, bits).dequantize()
    np.testing.assert_allclose(fake, real, atol=1e-6 if bits != 16 else 0)
    if bits == 1:
        assert set(np.unique(real)) == {-1.0, 1.0}


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_straight_through_gradients(quantizer, bits):
    x = (quantizer.offset.detach() + quantizer.scale.detach() * torch.tensor([[0.3] * 37, [5.0] * 37])).requires_grad_()
    quantizer.zero_grad()
    quantizer.fake_quantize(x, bits).sum().backward()
    scale = quantizer.scale.detach()
    torch.testing.assert_close(x.grad[0], 1 / scale)  # inside the range: identity in the normalized space
    torch.testing.assert_close(x.grad[1], torch.zeros(37))  # clipped: no gradient
    assert quantizer.offset.grad.abs().sum() > 0 and quantizer.log_scale.grad.abs().sum() > 0


def test_forward_is_passthrough_unless_active_bits_set(embeddings, quantizer):
    x = torch.from_numpy(embeddings[:5])
    assert quantizer({"sentence_embedding": x})["sentence_embedding"] is x
    quantizer.active_bits = 2
    try:
        out = quantizer({"sentence_embedding": x})["sentence_embedding"]
    finally:
        quantizer.active_bits = None
    np.testing.assert_allclose(out.detach().numpy(), quantizer.quantize(embeddings[:5], 2).dequantize(), atol=1e-6)


@pytest.mark.parametrize("method", ["minmax", "std"])
def test_calibration_handles_constant_and_near_constant_dimensions(method):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    x[:, 2] = 0.7
    x[:, 3] = 0.7 + 1e-6 * rng.normal(size=50)  # next to no spread, like a real MiniLM output dimension
    quantizer = MultiPrecisionQuantizer.from_embeddings(x, method=method)
    for bits in (8, 4, 2, 1):
        codes = quantizer.quantize(x, bits).unpacked()
        # The upper-middle bucket at every width (nested), not rounding noise or an edge biasing every dot product.
        assert np.all(codes[:, 2:] == 1 << (bits - 1)), bits
    # Their straight-through gradient is an ordinary one, not 1 / (a range of 1e-6).
    inputs = torch.from_numpy(x).requires_grad_()
    quantizer.fake_quantize(inputs, 2).sum().backward()
    gradient = inputs.grad.abs().max(dim=0).values
    assert gradient[3] <= 10 * gradient[:2].max()
    # The post-hoc baseline keeps sentence-transformers' semantics: the near-constant dimension keeps its own range.
    baseline = posthoc_quantizer(x)
    assert baseline.scale[3].item() == pytest.approx((x[:, 3].max() - x[:, 3].min()) / 2, rel=1e-5)
    assert np.all(baseline.quantize(x, 2).unpacked()[:, 2] == 2)  # an exactly constant one: the middle code
    with pytest.raises(ValueError, match="at least 2"):
        MultiPrecisionQuantizer.from_embeddings(x[:1])


def test_quantize_rejects_bad_input(quantizer, embeddings):
    with pytest.raises(ValueError, match="shape"):
        quantizer.quantize(embeddings[:, :10], 4)
    with pytest.raises(TypeError, match="floating point"):
        quantizer.quantize(embeddings.astype(np.int32), 4)
    with pytest.raises(ValueError, match="NaN"):
        quantizer.quantize(np.full_like(embeddings, np.nan), 4)
    with pytest.raises(ValueError, match="Unknown precision"):
        quantizer.quantize(embeddings, "int3")
    with pytest.raises(ValueError, match="serves"):
        MultiPrecisionQuantizer(37, precisions=(16, 1)).quantize(embeddings, 8)


# ---- post-hoc baseline (sentence-transformers semantics) -------------------------------------------------------------------
def test_posthoc_matches_sentence_transformers(embeddings):
    posthoc = posthoc_quantizer(embeddings)
    # 1 bit: exactly sentence-transformers' ubinary.
    np.testing.assert_array_equal(posthoc.quantize(embeddings, 1).codes, quantize_embeddings(embeddings, "ubinary"))
    # 8 bits: the same min/max ranges; 256 equal buckets instead of 255 steps -> codes differ by at most one.
    ours = posthoc.quantize(embeddings, 8).unpacked().astype(int)
    theirs = quantize_embeddings(embeddings, "uint8").astype(int)
    assert np.all((ours - theirs >= 0) & (ours - theirs <= 1))  # floor(u * 256) vs floor(u * 255)
    assert ours.min() == 0 and ours.max() == 255
    with pytest.raises(ValueError, match="at least 2"):
        posthoc_quantizer(embeddings[:1])


# ---- similarity ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_code_space_similarity_equals_dequantized_cosine(embeddings, quantizer, bits):
    a, b = quantizer.quantize(embeddings[:40], bits), quantizer.quantize(embeddings[40:], bits)
    codes_scores = a.similarity(b)
    float_scores = similarity_at_bits(a.dequantize(), b.dequantize(), bits)
    np.testing.assert_allclose(codes_scores, float_scores, atol=1e-5 if bits == 16 else 1e-12)
    # Same ranking (up to exact ties): the code-space top 5 hold the 5 best dequantized cosines.
    code_top = np.argsort(-codes_scores, axis=1)[:, :5]
    np.testing.assert_allclose(np.take_along_axis(float_scores, code_top, axis=1), -np.sort(-float_scores, axis=1)[:, :5], atol=1e-5)
    dots = similarity(a, b, metric="dot")
    np.testing.assert_allclose(dots, a.dequantize().astype(np.float64) @ b.dequantize().T.astype(np.float64), rtol=1e-5)


def test_hamming_popcount(embeddings, quantizer):
    a, b = quantizer.quantize(embeddings[:10], 1), quantizer.quantize(embeddings[10:30], 1)
    expected = (a.unpacked()[:, None, :] != b.unpacked()[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distance(a, b), expected)
    np.testing.assert_allclose(a.similarity(b), 1 - 2 * expected / 37)
    with pytest.raises(ValueError, match="1-bit"):
        hamming_distance(quantizer.quantize(embeddings[:2], 2), quantizer.quantize(embeddings[:2], 2))


def test_similarity_rejects_mixed_precision_and_raw_arrays(embeddings, quantizer):
    a, b = quantizer.quantize(embeddings[:5], 2), quantizer.quantize(embeddings[:5], 4)
    with pytest.raises(ValueError, match="mixed precisions"):
        a.similarity(b)
    with pytest.raises(TypeError, match="QuantizedEmbeddings"):
        similarity(a, b.codes)
    with pytest.raises(ValueError, match="metric"):
        a.similarity(a, metric="l2")


# ---- QuantizedEmbeddings container ------------------------------------------------------------------------------------------
def test_quantized_embeddings_validation():
    with pytest.raises(TypeError, match="uint8"):
        QuantizedEmbeddings(np.zeros((2, 2), np.int8), 4, 4)
    with pytest.raises(ValueError, match="shape"):
        QuantizedEmbeddings(np.zeros((2, 3), np.uint8), 4, 4)
    with pytest.raises(TypeError, match="float16"):
        QuantizedEmbeddings(np.zeros((2, 4), np.float32), 16, 4)
    with pytest.raises(ValueError, match="Unknown precision"):
        QuantizedEmbeddings(np.zeros((2, 2), np.uint8), "nibble", 4)
    with pytest.raises(ValueError, match="no nested"):
        QuantizedEmbeddings(np.zeros((2, 4), np.float16), 16, 4).to_bits(1)
    with pytest.raises(ValueError, match="raise precision"):
        QuantizedEmbeddings(np.zeros((2, 1), np.uint8), 2, 4).to_bits(4)


@pytest.mark.parametrize("bits", BITS)
def test_save_load_round_trip(tmp_path, embeddings, quantizer, bits):
    codes = quantizer.quantize(embeddings, bits)
    codes.save(tmp_path / "codes.safetensors")
    loaded = QuantizedEmbeddings.load(tmp_path / "codes.safetensors")
    assert (loaded.bits, loaded.dim, loaded.codes.dtype) == (bits, 37, codes.codes.dtype)
    np.testing.assert_array_equal(loaded.codes, codes.codes)
    assert codes.bytes_per_vector == (74 if bits == 16 else packed_width(37, bits))


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.numpy import save_file

    save_file({"codes": np.zeros((2, 2), np.uint8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a QuantizedEmbeddings file"):
        QuantizedEmbeddings.load(tmp_path / "x.safetensors")


# ---- learned rotation ---------------------------------------------------------------------------------------------------
def _rotating_quantizer(embeddings: np.ndarray, seed: int = 0, **kwargs) -> MultiPrecisionQuantizer:
    """A rotating quantizer whose rotation is far from the identity (a random generator), recalibrated after it."""
    quantizer = MultiPrecisionQuantizer.from_embeddings(embeddings, rotation=True, **kwargs)
    with torch.no_grad():
        quantizer.rotation_generator.normal_(generator=torch.Generator().manual_seed(seed))
    return quantizer.calibrate(embeddings)


def test_rotation_starts_as_the_identity(embeddings, quantizer):
    rotating = MultiPrecisionQuantizer.from_embeddings(embeddings, rotation=True)
    x = torch.from_numpy(embeddings)
    for bits in (8, 4, 2, 1):
        np.testing.assert_array_equal(rotating.quantize(embeddings, bits).unpacked(), quantizer.quantize(embeddings, bits).unpacked())
        torch.testing.assert_close(rotating.fake_quantize(x, bits), quantizer.fake_quantize(x, bits), rtol=0, atol=0)


def test_rotation_is_orthogonal_trains_and_keeps_codes_nested(embeddings):
    rotating = _rotating_quantizer(embeddings)
    rotation = rotating.rotation_matrix()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(37), atol=1e-5, rtol=0)
    assert (rotation - torch.eye(37)).abs().max() > 0.5
    # Float cosines are unchanged by the rotation; the codes are taken along the rotated axes.
    x = torch.from_numpy(embeddings)
    torch.testing.assert_close(
        torch.nn.functional.normalize(rotating.rotate(x), dim=-1) @ torch.nn.functional.normalize(rotating.rotate(x), dim=-1).T,
        torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T, atol=1e-5, rtol=0,
    )
    rotated = x.double() @ rotation.detach().double()
    np.testing.assert_array_equal(
        rotating.quantize(embeddings, 1).unpacked(), (rotated.numpy() >= rotating.offset.detach().double().numpy()).astype(np.uint8)
    )
    codes8 = rotating.quantize(embeddings, 8).unpacked()
    for bits in (4, 2, 1):
        np.testing.assert_array_equal(rotating.quantize(embeddings, bits).unpacked(), codes8 >> (8 - bits))
    for bits in (8, 2, 1):
        # Training rotates in float32, quantize() in float64: a value on a bucket edge may land one bucket over.
        difference = np.abs(rotating.fake_quantize(x, bits).detach().numpy() - rotating.quantize(embeddings, bits).dequantize())
        one_bucket = 2.0 if bits == 1 else 2.0 / 2**bits  # 1 bit dequantizes to +-1, the others to midpoints
        assert difference.max() <= one_bucket + 1e-6 and (difference > 1e-5).mean() < 1e-2
    # The straight-through gradient reaches the generator, and a step keeps R orthogonal.
    optimizer = torch.optim.SGD([rotating.rotation_generator], lr=1.0)
    codes = torch.nn.functional.normalize(rotating.fake_quantize(x, 1), dim=-1)
    (codes[:150] * codes[150:]).sum().neg().backward()
    assert rotating.rotation_generator.grad.abs().sum() > 0
    optimizer.step()
    rotation = rotating.rotation_matrix()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(37), atol=1e-5, rtol=0)


def test_rotation_with_zero_threshold_is_sign_of_rotated(embeddings):
    rotating = _rotating_quantizer(embeddings, binary_threshold="zero")
    rotated = embeddings.astype(np.float64) @ rotating.rotation_matrix().detach().double().numpy()
    np.testing.assert_array_equal(rotating.quantize(embeddings, 1).unpacked(), (rotated > 0).astype(np.uint8))
    fake = rotating.fake_quantize(torch.from_numpy(embeddings), 1).detach().numpy()
    np.testing.assert_array_equal(fake > 0, rotated > 0)


def test_rotation_saved_as_one_orthogonal_matrix(tmp_path, embeddings):
    from safetensors.torch import load_file, save_file

    rotating = _rotating_quantizer(embeddings, seed=3)
    rotating.save(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(state) == ["log_scale", "offset", "rotation"]
    loaded = MultiPrecisionQuantizer.load(str(tmp_path))
    assert loaded.rotation and not loaded.rotation_generator.any()  # folded into the base
    for bits in BITS:
        np.testing.assert_array_equal(loaded.quantize(embeddings, bits).codes, rotating.quantize(embeddings, bits).codes)

    save_file({**state, "rotation": state["rotation"] * 1.1}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not orthogonal"):
        MultiPrecisionQuantizer.load(str(tmp_path))
    save_file({**state, "rotation": state["rotation"][:5]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="rotation has shape"):
        MultiPrecisionQuantizer.load(str(tmp_path))
    save_file({k: state[k] for k in ("offset", "log_scale")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lack \['rotation'\]"):
        MultiPrecisionQuantizer.load(str(tmp_path))
    # A file with a rotation under a config without one: refused rather than silently ignored.
    plain = MultiPrecisionQuantizer.from_embeddings(embeddings)
    (tmp_path / "plain").mkdir()
    plain.save(str(tmp_path / "plain"))
    save_file(state, str(tmp_path / "plain" / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        MultiPrecisionQuantizer.load(str(tmp_path / "plain"))


# ---- search -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["faiss", "usearch", "numpy"])
@pytest.mark.parametrize("first_stage_bits", [1, 2])
def test_two_stage_search_with_full_rescoring_is_exact(embeddings, quantizer, backend, first_stage_bits):
    corpus = quantizer.quantize(embeddings, 8)
    queries = quantizer.quantize(embeddings[:12] + 0.1, 8)
    index = MultiPrecisionIndex(corpus, first_stage_bits=first_stage_bits, backend=backend)
    # Enough candidates to cover the whole corpus: the result must equal exhaustive 8-bit search.
    results, timings = index.search(queries, top_k=5, rescore_multiplier=len(embeddings))
    exact = queries.similarity(corpus)
    for row, hits in enumerate(results):
        assert len(hits) == 5
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(exact[row])[::-1][:5], atol=1e-12)
        np.testing.assert_allclose([exact[row, h["corpus_id"]] for h in hits], [h["score"] for h in hits], atol=1e-12)
    assert timings["first_stage_s"] >= 0 and timings["rescore_s"] >= 0


def test_first_stage_only_matches_hamming_ranking(embeddings, quantizer):
    corpus = quantizer.quantize(embeddings, 8)
    queries = quantizer.quantize(embeddings[:4], 8)
    results, _ = MultiPrecisionIndex(corpus, backend="faiss").search(queries, top_k=3, rescore=False)
    distances = hamming_distance(queries.to_bits(1), corpus.to_bits(1))
    for row, hits in enumerate(results):
        assert [1 - 2 * distances[row, h["corpus_id"]] / 37 for h in hits] == pytest.approx([h["score"] for h in hits])
        assert hits[0]["score"] == pytest.approx(1 - 2 * distances[row].min() / 37)


def test_search_round_trip_and_errors(tmp_path, embeddings, quantizer):
    corpus = quantizer.quantize(embeddings, 8)
    queries = quantizer.quantize(embeddings[:6], 8)
    index = MultiPrecisionIndex(corpus, first_stage_bits=1, backend="usearch")
    index.save(tmp_path / "index")
    loaded = MultiPrecisionIndex.load(tmp_path / "index")
    # Full rescoring, so first-stage tie-breaking (usearch is multi-threaded) cannot change the answer.
    assert loaded.search(queries, top_k=4, rescore_multiplier=100)[0] == index.search(queries, top_k=4, rescore_multiplier=100)[0]
    assert loaded.first_stage_bits == 1 and loaded.backend == "usearch"
    assert index.search(queries, top_k=1)[0][0][0]["corpus_id"] == 0  # a corpus vector finds itself
    with pytest.raises(ValueError, match="mixed precisions"):
        index.search(quantizer.quantize(embeddings[:6], 4))
    with pytest.raises(TypeError, match="QuantizedEmbeddings"):
        index.search(queries.codes)
    with pytest.raises(ValueError, match="16-bit store"):
        MultiPrecisionIndex(quantizer.quantize(embeddings, 16))
    with pytest.raises(ValueError, match="first_stage_bits"):
        MultiPrecisionIndex(corpus, first_stage_bits=4)
    with pytest.raises(FileNotFoundError):
        MultiPrecisionIndex.load(tmp_path / "missing")
    # A 16-bit store works with explicit first-stage codes.
    index16 = MultiPrecisionIndex(quantizer.quantize(embeddings, 16), first_stage=quantizer.quantize(embeddings, 1))
    hits = index16.search(quantizer.quantize(embeddings[:2], 16), top_k=1, first_stage_queries=quantizer.quantize(embeddings[:2], 1))[0]
    assert [h[0]["corpus_id"] for h in hits] == [0, 1]


def test_small_corpus_pads_without_duplicates(quantizer, embeddings):
    corpus = quantizer.quantize(embeddings[:3], 8)
    for backend in ("faiss", "usearch", "numpy"):
        results, _ = semantic_search_multi_precision(quantizer.quantize(embeddings[:2], 8), corpus, top_k=10, backend=backend)
        assert all(sorted(h["corpus_id"] for h in hits) == [0, 1, 2] for hits in results)


# ---- storage report ---------------------------------------------------------------------------------------------------------
def test_storage_report():
    rows = {r["precision"]: r for r in storage_report(384, 1000)}
    assert [rows[p]["bytes_per_vector"] for p in ("float32", "16bit", "8bit", "4bit", "2bit", "1bit")] == [1536, 768, 384, 192, 96, 48]
    assert rows["1bit"]["index_bytes"] == 48_000 and rows["1bit"]["compression_vs_float32"] == 32
    assert rows["1bit first stage + 8bit rescore"]["bytes_per_vector"] == 432
    assert "| 2bit | 96 |" in format_storage_report(storage_report(384, 10))
    assert {r["precision"]: r["bytes_per_vector"] for r in storage_report(10, 1)}["1bit"] == 2  # padded byte



@pytest.mark.parametrize("dim", [37, 384])
def test_every_storage_figure_is_the_stored_size(dim):
    """Packed codes, the storage report, the evaluation JSON and the model card all give the bytes really stored."""
    from st_bitnet.evaluation.sweep import storage_bytes_per_vector
    from st_bitnet.model_card import _storage_rows
    from st_bitnet.multi_precision.precision import bytes_per_vector

    assert bytes_per_vector(37, 1) == 5 and bytes_per_vector(37, 2) == 10 and bytes_per_vector(37, 16) == 74
    with pytest.raises(ValueError, match="dim"):
        bytes_per_vector(0, 1)
    rng = np.random.default_rng(0)
    quantizer = MultiPrecisionQuantizer(dim).calibrate(rng.normal(size=(64, dim)).astype(np.float32))
    report = {r["precision"]: r["bytes_per_vector"] for r in storage_report(dim, 1, rescore_bits=None)}
    card = {row["label"]: int(row["bytes"]) for row in _storage_rows(dim)}
    assert card["float32"] == report["float32"] == storage_bytes_per_vector(dim, 32) == 4 * dim
    for bits in BITS:
        stored = quantizer.quantize(rng.normal(size=(3, dim)).astype(np.float32), bits)
        assert stored.bytes_per_vector == bytes_per_vector(dim, bits), bits  # what the codes really take
        assert report[f"{bits}bit"] == storage_bytes_per_vector(dim, bits) == card[f"{bits}-bit"] == stored.bytes_per_vector

def test_cli_storage_report(capsys):
    import argparse

    from st_bitnet.multi_precision.cli import add_subparser

    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers())
    args = parser.parse_args(["storage-report", "--dim", "384", "--n", "1000", "--json"])
    assert args.func(args) == 0
    import json

    rows = {r["precision"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["2bit"]["index_bytes"] == 96_000
