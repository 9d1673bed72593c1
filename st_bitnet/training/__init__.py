"""Training recipes for BitNet text embedders: a YAML recipe run by ``SentenceTransformerTrainer``.

Example::

    from st_bitnet.training import run_recipe
    run_recipe("recipes/stage2_distill_minilm.yaml", overrides=["training.max_steps=100"])

or from a shell: ``st-bitnet train recipes/stage2_distill_minilm.yaml`` /
``python -m st_bitnet.training recipes/stage2_distill_minilm.yaml`` (also under ``torchrun``).
"""

from .callbacks import LossLogCallback, read_loss_log
from .datasets import BUILTIN_DATASETS, DatasetConfigError, DatasetSpec, load_training_dataset, load_training_datasets
from .errors import RecipeError
from .recipe import Recipe, load_recipe, parse_recipe
from .recipe_specs import HardNegativesSpec, LossComponentSpec, ModelSpec, MultiPrecisionSpec, TeacherSpec, TrainingSpec
from .loss_builder import build_loss
from .runner import build_trainer, run_recipe

__all__ = [
    "BUILTIN_DATASETS",
    "DatasetConfigError",
    "DatasetSpec",
    "HardNegativesSpec",
    "LossComponentSpec",
    "LossLogCallback",
    "ModelSpec",
    "MultiPrecisionSpec",
    "Recipe",
    "RecipeError",
    "TeacherSpec",
    "TrainingSpec",
    "build_loss",
    "build_trainer",
    "load_recipe",
    "load_training_dataset",
    "load_training_datasets",
    "parse_recipe",
    "read_loss_log",
    "run_recipe",
]
