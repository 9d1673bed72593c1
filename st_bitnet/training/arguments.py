"""The recipe's ``training`` section as ``SentenceTransformerTrainingArguments`` (``bf16: auto`` resolved here)."""

from __future__ import annotations

import logging

from .errors import RecipeError
from .recipe import Recipe

logger = logging.getLogger(__name__)

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
# training.batch_sampler: length_grouped -> samplers.LengthGroupedBatchSampler (sentence-transformers' names otherwise)
LENGTH_GROUPED = "length_grouped"


def training_arguments(recipe: Recipe):
    """The trainer's arguments: the runner's defaults, then the recipe's values; ``bf16: auto`` becomes bf16
    autocast where this CPU (or GPU) multiplies bf16 faster than float32 (the choice is logged), and
    ``batch_sampler: length_grouped`` the :class:`~.samplers.LengthGroupedBatchSampler`."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    from .mixed_precision import resolve_bf16

    # the budget options are the runner's own (TimeBudgetCallback, BudgetedTrainer), not in training.arguments
    kwargs = {**DEFAULT_TRAINING_ARGS, **recipe.training.arguments}
    if kwargs.get("bf16") == "auto":
        use_cpu = bool(kwargs.get("use_cpu")) or not _cuda_available()
        kwargs["bf16"], reason = resolve_bf16("auto", use_cpu)
        logger.info("training.bf16 %s", reason)
        if kwargs["bf16"] and use_cpu:
            kwargs["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told the run is on the CPU
    if kwargs.get("batch_sampler") == LENGTH_GROUPED:
        from .samplers import LengthGroupedBatchSampler

        kwargs["batch_sampler"] = LengthGroupedBatchSampler
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
