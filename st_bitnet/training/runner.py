"""Run a recipe: ``build_trainer`` wires data, models, losses and the trainer; ``run_recipe`` trains, scores and saves.

Following one recipe from ``st-bitnet train`` (:mod:`.cli`) to the saved model: :mod:`.recipe` (parse and
validate), :mod:`.datasets` (training data), :mod:`.model_setup` (student and teacher), :mod:`.data_preparation`
(hard negatives, teacher scores), :mod:`.loss_builder` (losses), this module (training arguments, block-wise warm
start, :class:`~.trainer.BudgetedTrainer`, training, saving) and :mod:`.dev_evaluation` (dev scores).

The same entry point runs on one CPU, one GPU, or several processes: launch it with ``torchrun`` or
``accelerate launch`` and the transformers Trainer sets up DDP (or FSDP when ``training.fsdp`` is set).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .callbacks import LossLogCallback, TimeBudgetCallback
from .data_preparation import mine_negatives, precompute_scores
from .datasets import load_training_datasets
from .dev_evaluation import build_evaluator, evaluate, evaluate_precisions
from .loss_builder import build_loss
from .loss_types import loss_class  # noqa: F401 (importable from here too)
from .model_setup import (  # noqa: F401 (importable from here too)
    DTYPES,
    add_lora,
    apply_freeze,
    calibration_sentences,
    count_parameters,
    load_embedder,
    load_student,
    load_teacher,
    merge_lora,
    resolve_model_path,
)
from .recipe import RUNNER_TRAINING_KEYS, Recipe, RecipeError, load_recipe, multi_precision_spec  # noqa: F401

logger = logging.getLogger(__name__)

LOSS_LOG = "loss_log.jsonl"


DEFAULT_TRAINING_ARGS = {
    "report_to": "none",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "batch_sampler": "no_duplicates",
    "per_device_train_batch_size": 32,
    "learning_rate": 2e-5,
    "num_train_epochs": 1,
}



def training_arguments(recipe: Recipe):
    from sentence_transformers import SentenceTransformerTrainingArguments

    from .mixed_precision import resolve_bf16

    # the budget options are the runner's own (TimeBudgetCallback, BudgetedTrainer), not in training.arguments
    kwargs = {**DEFAULT_TRAINING_ARGS, **recipe.training.arguments}
    if kwargs.get("bf16") == "auto":
        use_cpu = bool(kwargs.get("use_cpu")) or not _cuda_available()
        kwargs["bf16"], reason = resolve_bf16("auto", use_cpu)
        logger.info("training.bf16 %s", reason)
    kwargs.setdefault("seed", recipe.seed)
    kwargs.setdefault("data_seed", recipe.seed)
    if recipe.prompts:
        kwargs["prompts"] = recipe.prompts
    try:
        return SentenceTransformerTrainingArguments(output_dir=recipe.output_dir, **kwargs)
    except TypeError as error:
        raise RecipeError(f"bad training option: {error}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_warm_start(recipe: Recipe, student, teacher, train_dataset, bf16: bool) -> list[dict]:
    """Block-wise reconstruction of the teacher's blocks (``recipe.warm_start``); report saved as JSON."""
    import contextlib

    import torch

    from .blockwise import blockwise_warm_start
    from .output_quantizer import calibration_texts

    config = recipe.warm_start
    texts = calibration_texts(train_dataset, 2 * config.texts, recipe.prompts)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and student.device.type == "cpu" else contextlib.nullcontext()
    with autocast:
        report = blockwise_warm_start(student, teacher.model, texts, config, seed=recipe.seed)
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(recipe.output_dir) / "warm_start.json").write_text(json.dumps(report, indent=2))
    return report


def build_trainer(recipe: Recipe, extra_callbacks: list | None = None, warm_start: bool = True):
    """Everything the recipe describes, wired into a ``SentenceTransformerTrainer`` (not started).

    ``warm_start=False`` skips the recipe's block-wise warm start (a resumed run loads trained weights instead).
    """
    from transformers import set_seed

    from .trainer import BudgetedTrainer

    set_seed(recipe.seed)
    train_dataset = load_training_datasets(recipe.datasets, seed=recipe.seed)  # data errors before model loading
    student = load_student(recipe, calibration_sentences(train_dataset), train_dataset)
    teacher = load_teacher(recipe, student)
    if recipe.hard_negatives:
        train_dataset = mine_negatives(recipe, train_dataset, teacher)
    args = training_arguments(recipe)
    cpu_bf16 = bool(args.bf16) and student.device.type == "cpu"
    train_dataset = precompute_scores(recipe, train_dataset, teacher, student, cpu_bf16_autocast=cpu_bf16)
    loss = build_loss(recipe, student, teacher)
    if cpu_bf16:
        from st_bitnet.introspection import transformer_modules

        from .mixed_precision import autocast_forward

        # the backbone modules, not the SentenceTransformer: the trainer (accelerate) re-wraps the model's own forward
        for module in transformer_modules(student) + (transformer_modules(teacher.model) if teacher else []):
            autocast_forward(module)
    if recipe.warm_start is not None and warm_start:
        set_seed(recipe.seed)
        run_warm_start(recipe, student, teacher, train_dataset, bool(args.bf16))
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
    from st_bitnet.introspection import transformer_modules

    from .mixed_precision import remove_autocast_forward

    for module in transformer_modules(trainer.model):  # evaluate and save the model as users will run it
        remove_autocast_forward(module)
    if trainer.is_world_process_zero():
        model = trainer.model
        final_dir = Path(recipe.output_dir) / "final"
        if recipe.model.lora:
            merge_lora(model)
        model.save(str(final_dir))
        if recipe.evaluation:
            by_precision = evaluate_precisions(model, recipe.evaluation)  # one encoding for every precision
            if by_precision:
                results["dev"] = {f"{name}_spearman_cosine": v["float"] for name, v in by_precision.items()}
                results["dev_by_precision"] = by_precision
            else:
                results["dev"] = evaluate(model, recipe.evaluation)
        if recipe.model.pack and recipe.model.convert:
            import st_bitnet

            st_bitnet.pack(model)
            save = getattr(st_bitnet, "save_pretrained", None)
            if save is None:
                from st_bitnet.sentence_transformer import save_pretrained as save
            save(model, Path(recipe.output_dir) / "packed", recipe=recipe)  # the card records the recipe
        with open(Path(recipe.output_dir) / "results.json", "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results

