import json

import numpy as np
import pytest

from st_bitnet.cli import build_parser, main, validate_sentences

from conftest import SENTENCES


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "convert", "encode"):
        assert command in out


def test_convert_then_encode(backbone_dirs, tmp_path, capsys):
    out = tmp_path / "bitnet"
    assert main(["convert", str(backbone_dirs["qwen3"]), str(out), "--norm", "subln", "--bidirectional", "yes"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    # norms included: tiny 64-wide layers pay ~0.5 bit/weight for them (real models: see test_real_models)
    assert 2.0 < report["bits_per_weight"] < 2.6 and (out / "modules.json").exists()
    assert report["projection_bytes_packed"] * 6 < report["projection_bytes_bf16"]
    assert main(["encode", str(out), "the cat sat", "the dog sat", "--output", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_encode_bad_inputs(backbone_dirs, tmp_path, capsys):
    assert main(["encode", str(backbone_dirs["qwen3"])]) == 2
    assert "no sentences" in capsys.readouterr().err
    with pytest.raises(TypeError, match="must be strings"):
        validate_sentences(["ok", 3])
    with pytest.raises(ValueError, match="no sentences"):
        validate_sentences([])
    assert main(["encode", str(tmp_path / "missing"), "hello"]) != 0


def test_parser_rejects_unknown_norm():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "x", "y", "--norm", "bogus"])


# --------------------------------------------------------------------------------------------------
# convert: calibration, and never losing data
# --------------------------------------------------------------------------------------------------
def _folder_digest(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _saved_norms(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.endswith("rms_norm.weight")}


def test_convert_calibrates_the_added_norms(backbone_dirs, tmp_path, capsys):
    out = tmp_path / "calibrated"
    assert main(["convert", str(backbone_dirs["bert"]), str(out)]) == 0
    assert "calibrated" in capsys.readouterr().err
    norms = _saved_norms(out)
    assert norms and all(not bool((w == 1).all()) for w in norms.values())  # at ones = uncalibrated
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\n\nwhat is the capital of france\n")
    out2 = tmp_path / "from_file"
    assert main(["convert", str(backbone_dirs["bert"]), str(out2), "--calibration-texts", str(texts)]) == 0
    other = _saved_norms(out2)
    assert any(not bool((other[k] == norms[k]).all()) for k in norms)  # fitted on the file's texts


def test_convert_refuses_bad_calibration_texts(backbone_dirs, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["convert", str(backbone_dirs["bert"]), str(tmp_path / "o1"), "--calibration-texts", str(empty)]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert main(["convert", str(backbone_dirs["bert"]), str(tmp_path / "o2"), "--calibration-texts",
                 str(tmp_path / "missing.txt")]) == 2  # fmt: skip
    assert "not found" in capsys.readouterr().err
    assert main(["convert", str(backbone_dirs["bert"]), str(tmp_path / "o3"), "--norm", "none",
                 "--calibration-texts", str(empty)]) == 2  # fmt: skip
    assert "nothing to calibrate" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_convert_with_forgotten_output_leaves_the_source_alone(backbone_dirs, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(backbone_dirs["qwen3"], src)
    before = _folder_digest(src)
    assert main(["convert", str(src)]) == 2  # argparse reads SRC as the output of a default conversion
    assert "forget the output" in capsys.readouterr().err
    assert _folder_digest(src) == before


def test_convert_never_overwrites_without_asking(backbone_dirs, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(backbone_dirs["qwen3"], src)
    source_digest = _folder_digest(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    assert main(["convert", str(src), str(out), "--norm", "none"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "user data"
    for target in (src, src / "sub"):  # the source itself, or a folder inside it, even with --overwrite
        assert main(["convert", str(src), str(target), "--norm", "none", "--overwrite"]) == 2
        assert "source model" in capsys.readouterr().err
    assert _folder_digest(src) == source_digest
    assert main(["convert", str(src), str(out), "--norm", "none", "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "modules.json").exists()  # replaced whole: no stale files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_bf16_token_embeddings_shrink_the_folder_and_stay_close(backbone_dirs, tmp_path, capsys):
    from transformers import AutoConfig

    reports, embeddings = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["convert", str(backbone_dirs["qwen3"]), str(out), "--norm", "none", "--embedding-dtype", dtype]) == 0
        reports[dtype] = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        assert main(["encode", str(out), *SENTENCES, "--output", str(tmp_path / f"{dtype}.npy")]) == 0
        embeddings[dtype] = np.load(tmp_path / f"{dtype}.npy")
        capsys.readouterr()
    config = AutoConfig.from_pretrained(str(backbone_dirs["qwen3"]))
    table = config.vocab_size * config.hidden_size
    full, half = reports["float32"], reports["bfloat16"]
    assert (full["token_embedding_dtype"], half["token_embedding_dtype"]) == ("F32", "BF16")
    assert full["weight_bytes_by_kind"]["token_embeddings"] == 4 * table
    assert half["weight_bytes_by_kind"]["token_embeddings"] == 2 * table
    assert full["folder_bytes"] - half["folder_bytes"] >= 2 * table - 64  # safetensors header differences only
    assert sum(half["weight_bytes_by_kind"].values()) <= half["folder_bytes"]
    # stated tolerance: the bf16 table rounds each entry by <= 2**-9 relative; after the int8/ternary layers the
    # unit-norm sentence embeddings stay within cosine 0.999 of the float32 folder's
    cosine = (embeddings["float32"] * embeddings["bfloat16"]).sum(1)
    assert cosine.min() > 0.999, cosine
