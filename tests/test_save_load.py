"""Saved BitNet embedders reload exactly, in fresh processes, with and without st_bitnet."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sentence_transformers import SentenceTransformer

import st_bitnet
from st_bitnet import BitNetConversionConfig
from st_bitnet.sentence_transformer import build_sentence_transformer, load, needs_trust_remote_code, save_pretrained

from conftest import SENTENCES, run_python

ENCODE = """
import numpy as np
from sentence_transformers import SentenceTransformer
m = SentenceTransformer({path!r}, trust_remote_code={trc})
np.save({out!r}, m.encode({sentences!r}, convert_to_numpy=True))
print(sorted({{type(x).__module__ for x in m.modules() if type(x).__name__ == 'BitLinear'}}))  # who runs the layers
"""


def linear_bits_per_weight(folder, include_norms: bool = False) -> float:
    """Stored bits of the converted projections' weights (packed ternary + scale) per weight.

    With ``include_norms`` the per-projection norms and biases count too (tiny test models have so few
    weights per norm that those dominate; real-size models are checked with them in test_real_models.py).
    """
    config = json.loads((folder / "config.json").read_text())
    names = config["st_bitnet"]["converted_modules"]
    prefix = "model." if config["model_type"] == "bitembed" else ""
    bits, weights = 0, 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in names:
            for key in keys:
                if key.startswith(prefix + name + "."):
                    if not include_norms and key.endswith(("norm.weight", ".bias")):
                        continue
                    t = f.get_tensor(key)
                    bits += t.numel() * t.element_size() * 8
                    if key == prefix + name + ".weight":
                        weights += t.shape[0] * 4 * t.shape[1]
    return bits / weights


@pytest.mark.parametrize(
    "arch,config",
    [
        ("qwen3", BitNetConversionConfig()),  # stock transformers `bitnet` format
        ("gemma3_text", BitNetConversionConfig(bidirectional=True)),  # stock, via Gemma3's own switch
        ("bert", BitNetConversionConfig()),  # an encoder in stock format
        ("qwen3", BitNetConversionConfig(norm="subln", bidirectional=True)),  # st_bitnet's bitembed class
    ],
    ids=["qwen3-stock", "gemma3-bidir-stock", "bert-stock", "qwen3-subln-bitembed"],
)
def test_save_reload_fresh_process_with_and_without_st_bitnet(backbone_dirs, tmp_path, arch, config):
    model = build_sentence_transformer(str(backbone_dirs[arch]), config)
    before = model.encode(SENTENCES, convert_to_numpy=True)
    out = save_pretrained(model, tmp_path / "saved")
    after_pack = model.encode(SENTENCES, convert_to_numpy=True)
    assert np.array_equal(before, after_pack)  # packing changes nothing
    assert linear_bits_per_weight(out) <= 2.1

    # (a) fresh process with st_bitnet: identical embeddings
    code = "import st_bitnet\n" + ENCODE.format(path=str(out), trc=False, out=str(tmp_path / "a.npy"), sentences=SENTENCES)
    assert run_python(code).strip() == "['st_bitnet.bitlinear']"  # st_bitnet's layers (and kernels) run it
    assert np.array_equal(np.load(tmp_path / "a.npy"), before)
    # (b) fresh process where st_bitnet cannot be imported: stock libraries (+ shipped code for bitembed)
    trc = needs_trust_remote_code(out)
    assert trc == (arch == "qwen3" and config.norm == "subln")
    modules = run_python(ENCODE.format(path=str(out), trc=trc, out=str(tmp_path / "b.npy"), sentences=SENTENCES), hide_st_bitnet=True)
    assert "st_bitnet" not in modules and modules.strip() != "[]"  # stock (or shipped) BitLinear layers run it
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), before, atol=1e-5)


def test_bitembed_folder_without_trust_remote_code_fails_clearly_for_stock_users(backbone_dirs, tmp_path):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), BitNetConversionConfig(norm="subln"))
    out = save_pretrained(model, tmp_path / "saved")
    with pytest.raises(AssertionError, match="trust_remote_code"):
        run_python(ENCODE.format(path=str(out), trc=False, out=str(tmp_path / "x.npy"), sentences=SENTENCES), hide_st_bitnet=True)


def test_load_helper_and_latent_checkpoint_round_trip(backbone_dirs, tmp_path):
    model = build_sentence_transformer(str(backbone_dirs["llama"]))
    before = model.encode(SENTENCES)
    model.save(str(tmp_path / "latent"))  # a training checkpoint: latent weights, not packed
    reloaded = load(str(tmp_path / "latent"))
    latent_layers = [m for m in reloaded.modules() if isinstance(m, st_bitnet.BitLinear)]
    assert latent_layers and not any(m.is_packed for m in latent_layers)
    np.testing.assert_array_equal(reloaded.encode(SENTENCES), before)


def test_corrupt_and_truncated_checkpoints_raise(backbone_dirs, tmp_path):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]))
    out = save_pretrained(model, tmp_path / "saved")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(str(out))
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(str(out))


def test_wrong_packed_shape_raises(backbone_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_sentence_transformer(str(backbone_dirs["qwen3"]))
    out = save_pretrained(model, tmp_path / "saved")
    state = load_file(str(out / "model.safetensors"))
    key = "layers.0.self_attn.q_proj.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1], dtype=torch.uint8)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"must be U8 \(16, 64\)"):
        load(str(out))


def test_unknown_model_type_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_real_arch"}))
    with pytest.raises(ValueError, match="not_a_real_arch"):
        st_bitnet.convert(str(tmp_path))


def test_save_pretrained_refuses_foreign_folders_and_replaces_its_own(backbone_dirs, tmp_path):
    from st_bitnet.atomic_folder import OutputExistsError

    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), BitNetConversionConfig())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2,3")
    with pytest.raises(OutputExistsError, match="not empty"):
        save_pretrained(model, foreign)
    assert (foreign / "data.csv").read_text() == "1,2,3" and len(list(foreign.iterdir())) == 1
    out = save_pretrained(model, tmp_path / "saved")
    (out / "stale.bin").write_bytes(b"old")
    save_pretrained(model, out)  # a previous st_bitnet save is replaced whole (default overwrite=None)
    assert not (out / "stale.bin").exists() and (out / "config.json").exists()
    with pytest.raises(OutputExistsError, match="not empty"):
        save_pretrained(model, out, overwrite=False)
    with pytest.raises(OutputExistsError, match="source model"):
        save_pretrained(model, backbone_dirs["qwen3"], overwrite=True)
    save_pretrained(model, foreign, overwrite=True)
    assert not (foreign / "data.csv").exists()


def test_save_pretrained_interrupted_leaves_no_half_written_folder(backbone_dirs, tmp_path, monkeypatch):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), BitNetConversionConfig())
    out = save_pretrained(model, tmp_path / "saved")
    before = sorted(p.name for p in out.iterdir())
    real_save = type(model).save

    def killed_midway(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 10)  # half-written weights
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, out)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "fresh").exists()
    assert SentenceTransformer(str(out)).encode(["the cat sat"]).shape == (1, 64)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_build_keeps_a_sentence_transformers_source_settings(backbone_dirs, tmp_path):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(backbone_dirs["bert"]), max_seq_length=17)
    source = SentenceTransformer(
        modules=[transformer, Pooling(64, pooling_mode="cls")], prompts={"query": "query: "}
    )
    folder = tmp_path / "st_source"
    source.save(str(folder))
    model = build_sentence_transformer(str(folder), BitNetConversionConfig(norm="none"))
    assert model.max_seq_length == 17 and model.prompts.get("query") == "query: "
    assert [m.pooling_mode for m in model if isinstance(m, Pooling)] == ["cls"]
    assert not any(isinstance(m, Normalize) for m in model)
    assert any(isinstance(m, st_bitnet.BitLinear) for m in model.modules())
    # explicit arguments still win
    tuned = build_sentence_transformer(str(folder), pooling="mean", normalize=True, max_seq_length=9,
                                       prompts={"doc": "passage: "}, convert_model=False)  # fmt: skip
    assert tuned.max_seq_length == 9 and tuned.prompts["doc"] == "passage: " and tuned.prompts["query"] == "query: "
    assert [m.pooling_mode for m in tuned if isinstance(m, Pooling)] == ["mean"]
    assert isinstance(list(tuned)[-1], Normalize)


def test_missing_local_folder_says_folder_not_found(tmp_path):
    for name in ("./no-such-model-folder", str(tmp_path / "missing" / "model"), "~/no-such-model-folder"):
        with pytest.raises(FileNotFoundError, match="folder not found"):
            load(name)
        with pytest.raises(FileNotFoundError, match="folder not found"):
            build_sentence_transformer(name)
