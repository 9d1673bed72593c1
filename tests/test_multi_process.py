"""Multi-process encoding (sentence-transformers' pool pickles the model) works on BitNet models loaded from disk."""

import pickle

import numpy as np
from sentence_transformers import SentenceTransformer

from st_bitnet.sentence_transformer import build_sentence_transformer, save_pretrained

from conftest import SENTENCES


def test_loaded_model_pickles_and_encodes_in_a_two_process_pool(backbone_dirs, tmp_path):
    folder = save_pretrained(build_sentence_transformer(str(backbone_dirs["qwen3"])), tmp_path / "saved")
    model = SentenceTransformer(str(folder), device="cpu")
    assert model[0].model.hf_quantizer is not None  # loaded through st_bitnet's bitnet quantizer
    pickle.dumps(model)  # what the pool sends to its workers
    single = model.encode(SENTENCES, batch_size=1)
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        multi = model.encode(SENTENCES, pool=pool, batch_size=1, chunk_size=2)
    finally:
        model.stop_multi_process_pool(pool)
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-6)
