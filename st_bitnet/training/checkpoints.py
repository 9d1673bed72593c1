"""Which checkpoint ``--resume`` continues from: the newest *complete* one.

transformers writes a checkpoint folder file by file and ``trainer_state.json`` last, and picks the folder with the
highest step number whatever it holds; a run killed while saving then fails to resume (or resumes from a truncated
optimizer state). Here a checkpoint counts as complete when its ``trainer_state.json`` parses and records its step.

Example::

    checkpoint = resolve_resume(True, "runs/stage2")   # "runs/stage2/checkpoint-40", skipping a half-written -50
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(ValueError):
    """The run cannot resume: the named checkpoint is incomplete, or no complete checkpoint exists."""


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    state_path = folder / TRAINER_STATE
    if not state_path.is_file():
        return f"{folder} has no {TRAINER_STATE} (the save was interrupted)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{state_path} is unreadable or truncated ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{state_path} records no global_step"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The complete ``checkpoint-N`` folder of ``output_dir`` with the highest ``N`` (None if there is none), and
    the problems of the newer, incomplete ones that were skipped."""
    root = Path(output_dir)
    if not root.is_dir():
        return None, []
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    skipped = []
    for _, folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(problem)
    return None, skipped


def resolve_resume(resume: str | os.PathLike | bool | None, output_dir: str | os.PathLike) -> str | None:
    """What to hand ``Trainer.train(resume_from_checkpoint=...)``.

    Args:
        resume: a checkpoint folder, ``True`` (the newest complete checkpoint of ``output_dir``), or None/False.
        output_dir: the run's output folder.

    Returns:
        The checkpoint folder as a string, or None (start from scratch).

    Raises:
        ResumeError: an explicit folder that is not a complete checkpoint, or ``True`` with no complete checkpoint.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        folder, skipped = latest_complete_checkpoint(output_dir)
        if folder is None:
            detail = "; ".join(skipped) if skipped else "no checkpoint-N folders"
            raise ResumeError(f"cannot resume: no complete checkpoint in {output_dir} ({detail})")
        if skipped:
            import logging

            logging.getLogger(__name__).warning("resuming from %s; skipped: %s", folder, "; ".join(skipped))
        return str(folder)
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ResumeError(f"cannot resume from {resume}: {problem}")
    return str(resume)
