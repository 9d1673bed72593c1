import numpy as np
import pytest
import torch

import st_bitnet
from st_bitnet.calibration import calibrate_norms
from st_bitnet.sentence_transformer import build_sentence_transformer

from conftest import SENTENCES


def _cos(a, b):
    return float((a * b).sum(1).mean())


def test_calibrated_norms_bring_the_converted_model_closer_to_full_precision(backbone_dirs):
    path = str(backbone_dirs["bert"])
    teacher = build_sentence_transformer(path, convert_model=False)
    reference = teacher.encode(SENTENCES)
    torch.manual_seed(0)
    at_ones = build_sentence_transformer(path)
    calibrated = build_sentence_transformer(path)
    assert calibrate_norms(calibrated, SENTENCES) == sum(1 for m in calibrated.modules() if isinstance(m, st_bitnet.BitLinear))
    weights = [m.rms_norm.weight for m in calibrated.modules() if isinstance(m, st_bitnet.BitLinear)]
    assert any(not torch.allclose(w, torch.ones_like(w)) for w in weights)  # LayerNorm outputs already have RMS 1
    assert _cos(calibrated.encode(SENTENCES), reference) > _cos(at_ones.encode(SENTENCES), reference)


def test_calibration_errors(backbone_dirs):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]))
    with pytest.raises(ValueError, match="at least one"):
        calibrate_norms(model, [])
    st_bitnet.pack(model)
    with pytest.raises(ValueError, match="before packing"):
        calibrate_norms(model, SENTENCES)
    plain = build_sentence_transformer(str(backbone_dirs["qwen3"]), st_bitnet.BitNetConversionConfig(norm="none"))
    with pytest.raises(ValueError, match="no BitLinear with a norm"):
        calibrate_norms(plain, SENTENCES)
    converted_backbone = build_sentence_transformer(str(backbone_dirs["qwen3"]))[0].model
    with pytest.raises(TypeError, match="expects a SentenceTransformer"):
        calibrate_norms(converted_backbone, SENTENCES)  # a bare transformers model has no encode()
