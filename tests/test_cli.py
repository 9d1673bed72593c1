import json

import numpy as np
import pytest

from st_bitnet.cli import build_parser, main, validate_sentences


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
