"""push_to_hub writes exactly what SentenceTransformer(repo_id) needs (the upload itself is stubbed offline)."""

import shutil

import numpy as np
import pytest

from st_bitnet import BitNetConversionConfig
from st_bitnet.hub import push_to_hub
from st_bitnet.sentence_transformer import build_sentence_transformer

from conftest import SENTENCES, run_python
from test_save_load import ENCODE


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        uploads.setdefault(repo_id, None)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        dest = tmp_path / "hub" / repo_id.replace("/", "__")
        shutil.copytree(folder_path, dest)
        uploads[repo_id] = dest
        return f"https://huggingface.co/{repo_id}/commit/fake"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


@pytest.mark.parametrize("norm,shipped_code", [("per_projection", False), ("subln", True)])
def test_push_to_hub_folder_loads_without_st_bitnet(fake_hub, backbone_dirs, tmp_path, norm, shipped_code):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]), BitNetConversionConfig(norm=norm))
    before = model.encode(SENTENCES)
    url = push_to_hub(model, "org/bitembed-tiny")
    assert url.endswith("commit/fake")
    folder = fake_hub["org/bitembed-tiny"]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modules.json", "tokenizer.json"} <= files
    code_files = {"modeling_bitembed.py", "configuration_bitembed.py", "bitlinear.py"}
    assert (code_files <= files) == shipped_code and (not shipped_code) == files.isdisjoint(code_files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    run_python(ENCODE.format(path=str(folder), trc=shipped_code, out=str(tmp_path / "e.npy"), sentences=SENTENCES),
               hide_st_bitnet=True)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), before, atol=1e-5)


def test_push_to_hub_rejects_bad_repo_id(backbone_dirs):
    model = build_sentence_transformer(str(backbone_dirs["qwen3"]))
    with pytest.raises(ValueError, match="user/name"):
        push_to_hub(model, "a/b/c")
