"""Run a recipe: load student (+ BitNet conversion) and teacher, data, losses, then SentenceTransformerTrainer.

The same entry point runs on one CPU, one GPU, or several processes: launch it with ``torchrun`` or
``accelerate launch`` and the transformers Trainer sets up DDP (or FSDP when ``training.fsdp`` is set).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

from .callbacks import LossLogCallback
from .datasets import load_training_datasets
from .recipe import Recipe, RecipeError, load_recipe

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
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_model_path(path: str) -> str:
    """``pkg:<package>`` -> ``<package>.get_model_path()`` (offline weight packages); anything else unchanged."""
    if path.startswith("pkg:"):
        module = importlib.import_module(path[4:])
        return str(module.get_model_path())
    return path


def load_student(recipe: Recipe, calibration_sentences: list[str] | None = None):
    """The student SentenceTransformer: loaded, BitNet-converted (``model.convert``), optionally with LoRA.

    With norms in the conversion, their weights are fitted on ``model.calibrate_norms`` training sentences
    (default 64; 0 keeps them at ones), see :func:`st_bitnet.calibration.calibrate_norms`.
    """
    from sentence_transformers import SentenceTransformer

    spec = recipe.model
    model = SentenceTransformer(resolve_model_path(spec["path"]), device=spec.get("device"))
    if spec.get("max_seq_length"):
        model.max_seq_length = int(spec["max_seq_length"])
    if spec.get("convert", True):
        import st_bitnet

        conversion = st_bitnet.BitNetConversionConfig(**(spec.get("conversion") or {}))
        st_bitnet.convert(model, conversion)
        n_calibration = int(spec.get("calibrate_norms", 64))
        if conversion.norm != "none" and n_calibration > 0 and calibration_sentences:
            from st_bitnet.calibration import calibrate_norms

            calibrate_norms(model, calibration_sentences[:n_calibration])
    elif spec.get("conversion"):
        raise RecipeError("model.conversion is set but model.convert is false")
    if spec.get("lora"):
        if spec.get("convert", True):
            raise RecipeError("LoRA is for fine-tuning the full-precision teacher: set model.convert: false")
        from peft import LoraConfig

        model.add_adapter(LoraConfig(**{"task_type": "FEATURE_EXTRACTION", **spec["lora"]}))
    return model


def merge_lora(model) -> None:
    """Fold trained LoRA adapters into the base weights, in place, so the result saves as a plain model
    (a standalone teacher: no adapter files, no base-model path to resolve, no adapter overhead)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        inner = getattr(module, "model", None)
        if not hasattr(inner, "config"):
            continue
        for name, layer in list(inner.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                inner.set_submodule(name, layer.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(inner, attr):
                delattr(inner, attr) if attr == "peft_config" else setattr(inner, attr, False)


def load_teacher(recipe: Recipe, student):
    """The frozen teacher (tokenizer checked against the student), or None when the recipe has none."""
    if recipe.teacher is None:
        return None
    import torch

    from st_bitnet.teacher import FrozenTeacher

    dtype = recipe.teacher.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise RecipeError(f"teacher.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, DTYPES[dtype])
    device = recipe.teacher.get("device")
    if device is None:
        device = str(student.device)
    return FrozenTeacher(resolve_model_path(recipe.teacher["path"]), device=device, dtype=dtype, student=student)


def loss_class(name: str):
    import st_bitnet.losses as ours
    from sentence_transformers.sentence_transformer import losses as theirs

    for namespace in (ours, theirs):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise RecipeError(f"unknown loss type {name!r}: use a class of st_bitnet.losses or sentence-transformers' losses")


def _instantiate_loss(name: str, params: dict, student, teacher):
    """One loss from its recipe entry; a nested ``{type: ...}`` argument (a wrapper's inner loss) is built too."""
    params = dict(params)
    cls = loss_class(params.pop("type"))
    precomputed = params.pop("precompute_teacher_scores", False)
    if "teacher" in inspect.signature(cls.__init__).parameters:
        params["teacher"] = None if precomputed else teacher
    for key, value in params.items():
        if isinstance(value, dict) and "type" in value:
            params[key] = _instantiate_loss(f"{name}.{key}", value, student, teacher)
        elif isinstance(value, list) and key in ("directions", "relations"):
            params[key] = tuple(value)
    try:
        return cls(student, **params)
    except TypeError as error:
        raise RecipeError(f"loss component {name!r}: {error}") from None


def build_loss(recipe: Recipe, student, teacher):
    """The recipe's loss: one component as is, several as a :class:`WeightedCombinationLoss`."""
    from st_bitnet.losses import WeightedCombinationLoss

    components, weights = {}, {}
    for name, spec in recipe.loss.items():
        params = dict(spec)
        weights[name] = float(params.pop("weight", 1.0))
        components[name] = _instantiate_loss(name, params, student, teacher)
    if len(components) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(components.values()))
    return WeightedCombinationLoss(student, components, weights)


def build_evaluator(names: list[str], batch_size: int = 64):
    """sentence-transformers' STS evaluators on the dev splits named in the recipe (dev data: scoring only)."""
    if not names:
        return None
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SequentialEvaluator

    from st_bitnet import data

    evaluators = []
    for name in names:
        rows = data.load_sts(name, "dev")
        evaluators.append(
            EmbeddingSimilarityEvaluator(
                [r["sentence1"] for r in rows],
                [r["sentence2"] for r in rows],
                [r["score"] for r in rows],
                name=f"{name}-dev",
                batch_size=batch_size,
                main_similarity="cosine",
            )
        )
    return evaluators[0] if len(evaluators) == 1 else SequentialEvaluator(evaluators)


def training_arguments(recipe: Recipe):
    from sentence_transformers import SentenceTransformerTrainingArguments

    kwargs = {**DEFAULT_TRAINING_ARGS, **recipe.training}
    kwargs.setdefault("seed", recipe.seed)
    kwargs.setdefault("data_seed", recipe.seed)
    if recipe.prompts:
        kwargs["prompts"] = recipe.prompts
    try:
        return SentenceTransformerTrainingArguments(output_dir=recipe.output_dir, **kwargs)
    except TypeError as error:
        raise RecipeError(f"bad training option: {error}") from None


def _precompute_scores(recipe: Recipe, datasets, teacher):
    if not any(spec.get("precompute_teacher_scores") for spec in recipe.loss.values()):
        return datasets
    from datasets import DatasetDict

    from st_bitnet.teacher import precompute_teacher_scores

    if isinstance(datasets, DatasetDict):
        return DatasetDict({k: precompute_teacher_scores(v, teacher) for k, v in datasets.items()})
    return precompute_teacher_scores(datasets, teacher)


def _calibration_sentences(dataset, limit: int = 256) -> list[str]:
    """Texts of the first column of the training data (datasets.Dataset or a DatasetDict of them)."""
    from datasets import DatasetDict

    first = dataset[next(iter(dataset))] if isinstance(dataset, DatasetDict) else dataset
    column = first.column_names[0]
    return [t for t in first.select(range(min(limit, len(first))))[column] if isinstance(t, str) and t.strip()]


def build_trainer(recipe: Recipe, extra_callbacks: list | None = None):
    """Everything the recipe describes, wired into a ``SentenceTransformerTrainer`` (not started)."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import set_seed

    set_seed(recipe.seed)
    train_dataset = load_training_datasets(recipe.datasets, seed=recipe.seed)  # data errors before model loading
    student = load_student(recipe, _calibration_sentences(train_dataset))
    teacher = load_teacher(recipe, student)
    train_dataset = _precompute_scores(recipe, train_dataset, teacher)
    loss = build_loss(recipe, student, teacher)
    args = training_arguments(recipe)
    callbacks = [LossLogCallback(Path(recipe.output_dir) / LOSS_LOG), *(extra_callbacks or [])]
    trainer = SentenceTransformerTrainer(
        model=student,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=build_evaluator(recipe.evaluation) if args.eval_strategy != "no" else None,
        callbacks=callbacks,
    )
    trainer.st_bitnet_teacher = teacher
    return trainer


def evaluate(model, names: list[str]) -> dict[str, float]:
    """Spearman x 100 of cosine similarity on the named dev sets."""
    evaluator = build_evaluator(names)
    if evaluator is None:
        return {}
    results = evaluator(model)
    return {k: round(100 * v, 2) for k, v in results.items() if k.endswith("spearman_cosine")}


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    overrides: list[str] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    extra_callbacks: list | None = None,
) -> dict[str, Any]:
    """Train one recipe end to end; returns the training metrics and dev scores (also written to
    ``<output_dir>/results.json``). The final model is saved to ``<output_dir>/final`` (latent BitLinears,
    resumable training state) and, with ``model.pack``, packed to ``<output_dir>/packed``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RecipeError("overrides apply to recipe files; edit the Recipe object instead")
    trainer = build_trainer(recipe, extra_callbacks)
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else recipe.resume_from_checkpoint
    output = trainer.train(resume_from_checkpoint=resume or None)
    results: dict[str, Any] = {"recipe": recipe.name, "train": dict(output.metrics), "global_step": output.global_step}
    if trainer.is_world_process_zero():
        model = trainer.model
        final_dir = Path(recipe.output_dir) / "final"
        if recipe.model.get("lora"):
            merge_lora(model)
        model.save(str(final_dir))
        if recipe.evaluation:
            results["dev"] = evaluate(model, recipe.evaluation)
        if recipe.model.get("pack") and recipe.model.get("convert", True):
            import st_bitnet

            st_bitnet.pack(model)
            save = getattr(st_bitnet, "save_pretrained", None)
            if save is None:
                from st_bitnet.sentence_transformer import save_pretrained as save
            save(model, Path(recipe.output_dir) / "packed")
        with open(Path(recipe.output_dir) / "results.json", "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results
