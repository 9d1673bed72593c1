"""The YAML recipe schema: one file describes one training stage, checked before any model is loaded.

Sections (see ``recipes/README.md`` for a full example):

* ``model``: ``path`` (Hub id, folder, or ``pkg:<python package>`` exposing ``get_model_path()``),
  ``convert`` (BitNet conversion before training; false for teacher fine-tuning), ``conversion``
  (:class:`~st_bitnet.BitNetConversionConfig` fields), ``max_seq_length``, ``lora`` (peft ``LoraConfig``
  fields, to fine-tune the teacher with adapters), ``pack`` (also save a packed copy after training),
  ``multi_precision`` (train 16/8/4/2/1-bit outputs: ``{precisions: [16, 8, 4, 2, 1], pooling: mean,
  calibration_rows: 512}`` appends a ``MultiPrecisionQuantizer`` calibrated on that many training texts, see
  :func:`.recipe_sections.parse_multi_precision`), ``trust_remote_code`` (to load a saved model with st_bitnet modules).
  A raw transformers backbone (no ``modules.json``) or ``gguf_file`` (a GGUF file inside ``path``, dequantized once
  and cached) is built into an embedder by :func:`st_bitnet.sentence_transformer.build_sentence_transformer`, with
  ``pooling`` (``mean`` | ``cls`` | ``lasttoken`` | ``max``; default last token for decoders, mean for encoders),
  ``normalize`` (default true) and ``prompts`` (the model's named prompts, saved with it). ``freeze``
  (``{embeddings: true, trainable_layers: 4}``) stops gradients to the token embeddings and to every transformer
  layer below the top ``trainable_layers``, see :func:`.recipe_sections.parse_model_backbone`. ``dropout`` sets
  every dropout probability of the backbone for training, attention probabilities included (default: the model's own).
* ``teacher``: ``path``, ``device``, ``dtype``; required by the distillation losses.
* ``datasets``: a list of :class:`~st_bitnet.training.datasets.DatasetSpec` entries.
* ``prompts``: instruction prompts, ``{column: prompt}`` (e.g. ``{anchor: "query: "}``).
* ``loss``: ``{component_name: {type: LossClass, weight: float, ...loss arguments}}``; ``multi_precision: true``
  (or ``{precisions: [...], precision_weights: [...]}``) on a component wraps it in ``MultiPrecisionLoss``.
* ``training``: ``SentenceTransformerTrainingArguments`` fields (batch size, lr, max_steps, save_steps,
  ``ddp_backend``, ``fsdp``...).
* ``evaluation``: dev sets to score before / after training (``stsb``, ``sick``).
* top level: ``name``, ``seed``, ``output_dir``, ``resume_from_checkpoint``.

Each section is parsed once into a typed, frozen spec (:mod:`.recipe_specs`: :class:`ModelSpec`,
:class:`TeacherSpec`, :class:`LossComponentSpec`, :class:`TrainingSpec`, :class:`HardNegativesSpec`,
:class:`MultiPrecisionSpec`) that also reads as a read-only mapping of the YAML keys; the section parsers are in
:mod:`.recipe_sections`. This module reads the file, applies ``--set`` overrides and assembles the :class:`Recipe`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datasets import DatasetSpec, check_spec
from .errors import RecipeError
from .recipe_sections import (
    check_option_types,
    check_precomputed_labels,
    parse_hard_negatives,
    parse_loss_section,
    parse_model_section,
    parse_teacher_section,
    parse_training_section,
    parse_warm_start,
)
from .recipe_specs import HardNegativesSpec, LossComponentSpec, ModelSpec, TeacherSpec, TrainingSpec

TOP_LEVEL_KEYS = {"name", "seed", "output_dir", "model", "teacher", "datasets", "prompts", "loss", "training",
                  "evaluation", "resume_from_checkpoint", "description", "warm_start", "hard_negatives"}  # fmt: skip
EVALUATION_SETS = ("stsb", "sick")


@dataclass
class Recipe:
    """A parsed recipe: typed sections (see :mod:`.recipe_specs`), built by :func:`parse_recipe`.

    A Recipe built by hand may give a section as a plain mapping: it is validated and parsed as
    :func:`parse_recipe` would. ``to_dict()`` is the recipe as plain YAML data (``parse_recipe`` reads it back).
    """

    name: str
    output_dir: str
    model: ModelSpec
    datasets: list[DatasetSpec]
    loss: dict[str, LossComponentSpec]
    seed: int = 42
    teacher: TeacherSpec | None = None
    prompts: dict[str, Any] | None = None
    training: TrainingSpec = field(default_factory=TrainingSpec)
    evaluation: list[str] = field(default_factory=list)
    resume_from_checkpoint: str | bool | None = None
    source: str | None = None
    warm_start: Any = None  # BlockwiseConfig: block-wise reconstruction before training
    hard_negatives: HardNegativesSpec | None = None

    def __post_init__(self):
        where = f" in {self.source}" if self.source else ""
        if not isinstance(self.model, ModelSpec):
            self.model = parse_model_section(self.model, where, self.source)
        if self.teacher is not None and not isinstance(self.teacher, TeacherSpec):
            self.teacher = parse_teacher_section(self.teacher, where)
        if any(not isinstance(component, LossComponentSpec) for component in self.loss.values()):
            self.loss = parse_loss_section(self.loss, self.model.multi_precision, self.teacher, where)
        if not isinstance(self.training, TrainingSpec):
            self.training = parse_training_section(self.training or {}, where)
        if isinstance(self.warm_start, Mapping):
            self.warm_start = parse_warm_start(self.warm_start, self.teacher, where)
        if self.hard_negatives is not None and not isinstance(self.hard_negatives, HardNegativesSpec):
            self.hard_negatives = parse_hard_negatives(self.hard_negatives, self.teacher, self.datasets, where)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML data: ``parse_recipe(recipe.to_dict(), recipe.source) == recipe``."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "output_dir": self.output_dir,
                               "model": self.model.to_dict()}  # fmt: skip
        if self.teacher is not None:
            out["teacher"] = self.teacher.to_dict()
        out["datasets"] = [
            {k: v for k, v in dataclasses.asdict(spec).items() if v is not None and not (k == "extra" and not v)}
            for spec in self.datasets
        ]
        if self.prompts is not None:
            out["prompts"] = copy.deepcopy(self.prompts)
        out["loss"] = {name: component.to_dict() for name, component in self.loss.items()}
        out["training"] = self.training.to_dict()
        out["evaluation"] = list(self.evaluation)
        if self.resume_from_checkpoint is not None:
            out["resume_from_checkpoint"] = self.resume_from_checkpoint
        if self.warm_start is not None:
            out["warm_start"] = {"type": "blockwise", **dataclasses.asdict(self.warm_start)}
        if self.hard_negatives is not None:
            out["hard_negatives"] = self.hard_negatives.to_dict()
        return out


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            if isinstance(node, list):
                node = node[int(key)]
                continue
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {item!r}: {key!r} is not a section")
        if isinstance(node, list):
            node[int(keys[-1])] = _parse_value(value)
        else:
            node[keys[-1]] = _parse_value(value)
    return raw


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def parse_recipe(raw: dict, source: str | None = None) -> Recipe:
    """Validate a raw recipe dict into a :class:`Recipe` (no model or data is loaded)."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping")
    raw = _expand(raw)
    where = f" in {source}" if source else ""
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {sorted(unknown)}{where}; known: {sorted(TOP_LEVEL_KEYS)}")
    for required in ("model", "datasets", "loss", "output_dir"):
        if not raw.get(required):
            raise RecipeError(f"the recipe{where} has no {required!r} section")
    check_option_types(raw, where)
    model = parse_model_section(raw["model"], where, source)
    teacher = raw.get("teacher")
    if teacher is not None:
        teacher = parse_teacher_section(teacher, where)

    if not isinstance(raw["datasets"], list):
        raise RecipeError(f"'datasets'{where} must be a list of dataset entries")
    specs = []
    for entry in raw["datasets"]:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        try:
            spec = DatasetSpec(**entry)
        except TypeError as error:
            raise RecipeError(f"bad dataset entry {entry}{where}: {error}") from None
        check_spec(spec)
        specs.append(spec)

    loss = parse_loss_section(raw["loss"], model.multi_precision, teacher, where)
    check_precomputed_labels(loss, where)
    evaluation = raw.get("evaluation") or []
    evaluation = [evaluation] if isinstance(evaluation, str) else list(evaluation)
    for name in evaluation:
        if name not in EVALUATION_SETS:
            raise RecipeError(f"unknown evaluation set {name!r}{where}; known: {EVALUATION_SETS}")
    warm_start = parse_warm_start(raw.get("warm_start"), teacher, where)
    hard_negatives = parse_hard_negatives(raw.get("hard_negatives"), teacher, specs, where)
    training = parse_training_section(raw.get("training") or {}, where)
    return Recipe(
        name=str(raw.get("name") or (Path(source).stem if source else "recipe")),
        output_dir=str(raw["output_dir"]),
        model=model,
        datasets=specs,
        loss=loss,
        seed=int(raw.get("seed", 42)),
        teacher=teacher,
        prompts=raw.get("prompts"),
        training=training,
        evaluation=evaluation,
        resume_from_checkpoint=raw.get("resume_from_checkpoint"),
        source=source,
        warm_start=warm_start,
        hard_negatives=hard_negatives,
    )


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; ``overrides`` are ``dotted.key=value`` strings."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    return parse_recipe(apply_overrides(raw or {}, overrides), source=str(path))
