"""With st_bitnet imported, stock loading calls load BitNet folders right or raise: never silently wrong numbers."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoModelForCausalLM

import st_bitnet
from st_bitnet import BitLinear
from st_bitnet.load_guard import BitNetCheckpointError
from st_bitnet.microsoft import CHECKPOINT_FORMAT, load_microsoft_model
from st_bitnet.sentence_transformer import build_sentence_transformer, save_pretrained

from conftest import SENTENCES
from test_microsoft_format import write_microsoft_checkpoint


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_bitnet_embedding_folder_through_stock_calls_matches_st_bitnet_load(tmp_path, capfd, arch):
    folder = tmp_path / "ms"
    write_microsoft_checkpoint(folder, arch)
    capfd.readouterr()
    expected = st_bitnet.load(str(folder)).encode(SENTENCES)
    out, err = capfd.readouterr()
    assert "UNEXPECTED" not in out + err and "LOAD REPORT" not in out + err  # no stock first pass

    stock = SentenceTransformer(str(folder))
    assert stock[1].pooling_mode == "lasttoken" and type(stock[2]).__name__ == "Normalize"
    assert np.array_equal(stock.encode(SENTENCES), expected)

    model = AutoModel.from_pretrained(str(folder))
    assert model.st_bitnet_checkpoint_format == CHECKPOINT_FORMAT
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert layers and all(m.is_packed and m.rms_norm is not None for m in layers)
    assert _state_equal(model, load_microsoft_model(folder))
    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert info["unexpected_keys"] == [] and info["missing_keys"] == []


def test_bitnet_embedding_from_the_hub_cache(tmp_path):
    """A Hub id resolves through the cache (offline here) and loads as W1.58A8, not the stock way."""
    snapshot = tmp_path / "hub" / "models--someone--bitnet-embedding-tiny" / "snapshots" / ("a" * 40)
    write_microsoft_checkpoint(snapshot, "qwen3")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    model = AutoModel.from_pretrained("someone/bitnet-embedding-tiny", cache_dir=str(tmp_path / "hub"),
                                      local_files_only=True)
    assert getattr(model, "st_bitnet_checkpoint_format", None) == CHECKPOINT_FORMAT
    assert _state_equal(model, load_microsoft_model(snapshot))


def test_bitnet_embedding_refuses_heads_it_has_no_weights_for(tmp_path):
    write_microsoft_checkpoint(tmp_path / "ms", "qwen3")
    with pytest.raises(BitNetCheckpointError, match=r"st_bitnet\.load"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "ms"))


def test_rms_norm_named_latent_norms_without_quantization_config_load_as_bitnet(tmp_path):
    """``*_proj.rms_norm.weight`` on float weights in a plain config: the same layout under st_bitnet's norm name."""
    folder = tmp_path / "ms"
    write_microsoft_checkpoint(folder, "qwen3")
    state = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace(".norm.weight", ".rms_norm.weight") if "_proj.norm" in k else k: v for k, v in state.items()}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModel.from_pretrained(str(folder))
    assert all(m.rms_norm is not None for m in model.modules() if isinstance(m, BitLinear))
    original = tmp_path / "original"
    write_microsoft_checkpoint(original, "qwen3")
    assert _state_equal(model, load_microsoft_model(original))


@pytest.fixture
def saved_qwen3(backbone_dirs, tmp_path):
    return save_pretrained(build_sentence_transformer(str(backbone_dirs["qwen3"])), tmp_path / "saved")


def _edit(folder, state_edit=None, config_edit=None):
    if state_edit is not None:
        state = load_file(str(folder / "model.safetensors"))
        state_edit(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))


def test_norms_the_config_contradicts_raise(saved_qwen3):
    def no_norms_declared(config):
        config["quantization_config"]["use_rms_norm"] = False

    _edit(saved_qwen3, config_edit=no_norms_declared)
    with pytest.raises(BitNetCheckpointError, match="does not declare"):
        SentenceTransformer(str(saved_qwen3))


def test_packed_weights_without_quantization_config_raise(saved_qwen3):
    _edit(saved_qwen3, config_edit=lambda config: config.pop("quantization_config"))
    with pytest.raises(BitNetCheckpointError, match="no quantization_config"):
        AutoModel.from_pretrained(str(saved_qwen3))


def test_config_with_fewer_layers_than_the_weights_raises(saved_qwen3):
    def one_layer(config):
        config["num_hidden_layers"] = 1
        config.pop("layer_types", None)

    _edit(saved_qwen3, config_edit=one_layer)
    with pytest.raises(BitNetCheckpointError, match=r"no place for \(layers\.1\..*fewer layers"):
        SentenceTransformer(str(saved_qwen3))


def test_nan_weight_scale_raises(saved_qwen3):
    key = "layers.0.self_attn.q_proj.weight_scale"
    _edit(saved_qwen3, state_edit=lambda state: state.__setitem__(key, torch.tensor([float("nan")])))
    with pytest.raises(BitNetCheckpointError, match=r"q_proj\.weight_scale is \[nan\]"):
        SentenceTransformer(str(saved_qwen3))


def test_missing_packed_weight_raises(saved_qwen3):
    _edit(saved_qwen3, state_edit=lambda state: state.pop("layers.0.mlp.up_proj.weight"))
    with pytest.raises(BitNetCheckpointError, match=r"missing from the checkpoint.*layers\.0\.mlp\.up_proj\.weight"):
        SentenceTransformer(str(saved_qwen3))


def test_missing_weight_in_bitembed_folder_raises(backbone_dirs, tmp_path):
    from st_bitnet import BitNetConversionConfig

    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), BitNetConversionConfig(norm="subln"))
    folder = save_pretrained(model, tmp_path / "saved")
    _edit(folder, state_edit=lambda state: state.pop("model.layers.1.self_attn.o_proj.weight_scale"))
    with pytest.raises(BitNetCheckpointError, match=r"missing.*o_proj\.weight_scale"):
        SentenceTransformer(str(folder))


def test_intact_folders_still_load(saved_qwen3, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved_qwen3, copy)
    assert SentenceTransformer(str(copy)).encode(SENTENCES).shape == (len(SENTENCES), 64)


def test_checks_also_guard_transformers_own_bitnet_layers(saved_qwen3):
    """With ST_BITNET_TRANSFORMERS_HOOK=0 transformers builds its own BitLinear; the checks still run."""
    from conftest import run_python

    key = "layers.1.mlp.down_proj.weight_scale"
    _edit(saved_qwen3, state_edit=lambda state: state.__setitem__(key, torch.tensor([float("inf")])))
    code = f"""
import os
os.environ["ST_BITNET_TRANSFORMERS_HOOK"] = "0"
import st_bitnet
from transformers import AutoModel
from st_bitnet.load_guard import BitNetCheckpointError
try:
    model = AutoModel.from_pretrained({str(saved_qwen3)!r})
except BitNetCheckpointError as err:
    print("RAISED", err)
else:
    print("LOADED", type(model.layers[1].mlp.down_proj).__module__)
"""
    out = run_python(code)
    assert "RAISED" in out and "down_proj.weight_scale is [inf]" in out


def test_bitnet_embedding_folder_with_modules_json(tmp_path):
    """A Hub-style repo with its own sentence-transformers modules: the Transformer module loads W1.58A8."""
    folder = tmp_path / "ms"
    write_microsoft_checkpoint(folder, "qwen3")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": "lasttoken"}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sentence_transformer.modules.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.sentence_transformer.modules.Normalize"},
    ]))
    stock = SentenceTransformer(str(folder))
    assert getattr(stock[0].model, "st_bitnet_checkpoint_format", None) == CHECKPOINT_FORMAT
    assert np.array_equal(stock.encode(SENTENCES), st_bitnet.load(str(folder)).encode(SENTENCES))


def test_default_pipeline_patch_when_st_bitnet_is_imported_first(tmp_path):
    """``import st_bitnet`` before sentence-transformers: the patch lands when sentence-transformers is imported."""
    from conftest import run_python

    folder = tmp_path / "ms"
    write_microsoft_checkpoint(folder, "qwen3")
    code = f"""
import st_bitnet
assert "sentence_transformers" not in sys.modules  # import st_bitnet stays light
from sentence_transformers import SentenceTransformer
print([type(m).__name__ for m in SentenceTransformer({str(folder)!r})], flush=True)
"""
    assert run_python(code).strip().endswith("['Transformer', 'Pooling', 'Normalize']")
