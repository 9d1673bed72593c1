"""``--resume`` continues from the newest *complete* checkpoint (a kill while saving leaves a partial one)."""

from __future__ import annotations

import json

import pytest

from st_bitnet.training.checkpoints import ResumeError, latest_complete_checkpoint, resolve_resume


def _checkpoint(root, step, state="complete"):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    if state == "complete":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    elif state == "truncated":
        (folder / "trainer_state.json").write_text('{"global_step": %d, "log_hist' % step)
    return folder


def test_newest_complete_checkpoint_skips_half_written_ones(tmp_path):
    good = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 5)
    _checkpoint(tmp_path, 30, state="no_state")  # killed before trainer_state.json
    _checkpoint(tmp_path, 100, state="truncated")  # killed while writing it
    (tmp_path / "checkpoint-200").write_text("not a folder")
    folder, skipped = latest_complete_checkpoint(tmp_path)
    assert folder == good and len(skipped) == 2
    assert resolve_resume(True, tmp_path) == str(good)
    assert resolve_resume(None, tmp_path) is None and resolve_resume(False, tmp_path) is None


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint-N folders"):
        resolve_resume(True, tmp_path)
    partial = _checkpoint(tmp_path, 3, state="no_state")
    with pytest.raises(ResumeError, match="no complete checkpoint.*interrupted"):
        resolve_resume(True, tmp_path)
    with pytest.raises(ResumeError, match="checkpoint-3.*interrupted"):
        resolve_resume(str(partial), tmp_path)
    assert resolve_resume(str(_checkpoint(tmp_path, 4)), tmp_path).endswith("checkpoint-4")


def test_run_recipe_hands_the_trainer_the_complete_checkpoint(tmp_path, monkeypatch):
    from st_bitnet.training import parse_recipe, runner

    good = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, state="truncated")
    seen = {}

    class Trainer:
        def train(self, resume_from_checkpoint=None):
            seen["resume"] = resume_from_checkpoint
            raise KeyboardInterrupt  # stop here: only the checkpoint choice is under test

    monkeypatch.setattr(runner, "build_trainer", lambda recipe, callbacks=None, warm_start=True: Trainer())
    recipe = parse_recipe({"output_dir": str(tmp_path), "model": {"path": "x"}, "datasets": [{"name": "stsb"}],
                           "loss": {"l": {"type": "MultipleNegativesRankingLoss"}}})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        runner.run_recipe(recipe, resume_from_checkpoint=True)
    assert seen["resume"] == str(good)
