"""Run a recipe: ``build_trainer`` wires data, models, losses and the trainer; ``run_recipe`` trains and saves.

Following one recipe from ``st-bitnet train`` (:mod:`.cli`) to the saved model, each stage in its own module and
in this order:

==========================  =========================================================================================
:mod:`.recipe`              read the YAML, apply ``--set`` overrides; :mod:`.recipe_sections` validates each section
                            into its spec (:mod:`.recipe_specs`)
:mod:`.checkpoints`         the newest complete checkpoint to resume from (``--resume``)
:mod:`.datasets`            the training data (train splits, held-out slices removed)
:mod:`.model_setup`         the student (converted, frozen, LoRA, output quantizer) and the frozen teacher
:mod:`.arguments`           the trainer's arguments (``bf16: auto`` resolved)
:mod:`.data_preparation`    teacher-mined hard negatives, precomputed teacher scores or embeddings
:mod:`.loss_builder`        the weighted combination of the recipe's losses
:mod:`.mixed_precision`     bf16 autocast around the CPU forwards
:mod:`.blockwise`           the block-wise warm start
:mod:`.callbacks`           the loss log and the wall-clock budget
:mod:`.trainer`             ``BudgetedTrainer`` (its learning rate decays over the budget); training, resumable
:mod:`.outputs`             ``final/``, dev scores (:mod:`.dev_evaluation`), ``packed/``, ``results.json``
==========================  =========================================================================================

The same entry point runs on one CPU, one GPU, or several processes: launch it with ``torchrun`` or
``accelerate launch`` and the transformers Trainer sets up DDP (or FSDP when ``training.fsdp`` is set).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .arguments import training_arguments
from .blockwise import warm_start_from_recipe
from .callbacks import LOSS_LOG, LossLogCallback, TimeBudgetCallback
from .data_preparation import mine_negatives, precompute_scores
from .datasets import load_training_datasets
from .dev_evaluation import build_evaluator
from .errors import RecipeError
from .loss_builder import build_loss
from .mixed_precision import autocast_forward
from .model_setup import calibration_sentences, load_student, load_teacher
from .outputs import save_outputs
from .recipe import Recipe, load_recipe
from .trainer import BudgetedTrainer


def build_trainer(recipe: Recipe, extra_callbacks: list | None = None, warm_start: bool = True):
    """Everything the recipe describes, wired into a ``SentenceTransformerTrainer`` (not started).

    ``warm_start=False`` skips the recipe's block-wise warm start (a resumed run loads trained weights instead).
    """
    from transformers import set_seed

    from st_bitnet.introspection import transformer_modules

    set_seed(recipe.seed)
    train_dataset = load_training_datasets(recipe.datasets, seed=recipe.seed)  # data errors before model loading
    student = load_student(recipe, calibration_sentences(train_dataset), train_dataset)
    teacher = load_teacher(recipe, student)
    args = training_arguments(recipe)
    cpu_bf16 = bool(args.bf16) and student.device.type == "cpu"
    if recipe.hard_negatives:
        train_dataset = mine_negatives(recipe, train_dataset, teacher, cpu_bf16_autocast=cpu_bf16)
    train_dataset = precompute_scores(recipe, train_dataset, teacher, student, cpu_bf16_autocast=cpu_bf16)
    loss = build_loss(recipe, student, teacher)
    if cpu_bf16:
        # the backbone modules, not the SentenceTransformer: the trainer (accelerate) re-wraps the model's own forward
        for module in transformer_modules(student) + (transformer_modules(teacher.model) if teacher else []):
            autocast_forward(module)
    if recipe.warm_start is not None and warm_start:
        set_seed(recipe.seed)
        warm_start_from_recipe(recipe, student, teacher, train_dataset, cpu_bf16)
    callbacks = [LossLogCallback(Path(recipe.output_dir) / LOSS_LOG), *(extra_callbacks or [])]
    budget = recipe.training.time_budget_minutes
    if budget is not None:
        callbacks.append(TimeBudgetCallback(budget))
    trainer = BudgetedTrainer(
        budget_minutes=budget if recipe.training.decay_over_time_budget else None,
        model=student,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=build_evaluator(recipe.evaluation) if args.eval_strategy != "no" else None,
        callbacks=callbacks,
    )
    trainer.st_bitnet_teacher = teacher
    return trainer


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    overrides: list[str] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    extra_callbacks: list | None = None,
) -> dict[str, Any]:
    """Train one recipe end to end; returns the training metrics and dev scores (also written to
    ``<output_dir>/results.json``; with ``model.multi_precision`` also ``dev_by_precision``, the dev scores at each
    precision the quantizer serves). The final model is saved to ``<output_dir>/final`` (latent BitLinears,
    resumable training state; with a quantizer, reload it with ``trust_remote_code=True``) and, with
    ``model.pack``, packed to ``<output_dir>/packed``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RecipeError("overrides apply to recipe files; edit the Recipe object instead")
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else recipe.resume_from_checkpoint
    from .checkpoints import resolve_resume  # the newest *complete* checkpoint (a kill can leave a partial one)

    resume = resolve_resume(resume or None, recipe.output_dir)
    trainer = build_trainer(recipe, extra_callbacks, warm_start=not resume)
    output = trainer.train(resume_from_checkpoint=resume)
    results: dict[str, Any] = {"recipe": recipe.name, "train": dict(output.metrics), "global_step": output.global_step}
    return save_outputs(recipe, trainer, results)
