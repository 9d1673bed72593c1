"""The YAML recipe schema: one file describes one training stage, checked before any model is loaded.

Sections (see ``recipes/README.md`` for a full example):

* ``model``: ``path`` (Hub id, folder, or ``pkg:<python package>`` exposing ``get_model_path()``),
  ``convert`` (BitNet conversion before training; false for teacher fine-tuning), ``conversion``
  (:class:`~st_bitnet.BitNetConversionConfig` fields), ``max_seq_length``, ``lora`` (peft ``LoraConfig``
  fields, to fine-tune the teacher with adapters), ``pack`` (also save a packed copy after training).
* ``teacher``: ``path``, ``device``, ``dtype``; required by the distillation losses.
* ``datasets``: a list of :class:`~st_bitnet.training.datasets.DatasetSpec` entries.
* ``prompts``: instruction prompts, ``{column: prompt}`` (e.g. ``{anchor: "query: "}``).
* ``loss``: ``{component_name: {type: LossClass, weight: float, ...loss arguments}}``.
* ``training``: ``SentenceTransformerTrainingArguments`` fields (batch size, lr, max_steps, save_steps,
  ``ddp_backend``, ``fsdp``...).
* ``evaluation``: dev sets to score before / after training (``stsb``, ``sick``).
* top level: ``name``, ``seed``, ``output_dir``, ``resume_from_checkpoint``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datasets import DatasetSpec, check_spec

TOP_LEVEL_KEYS = {"name", "seed", "output_dir", "model", "teacher", "datasets", "prompts", "loss", "training",
                  "evaluation", "resume_from_checkpoint", "description"}  # fmt: skip
MODEL_KEYS = {"path", "convert", "conversion", "calibrate_norms", "max_seq_length", "lora", "pack", "device"}
TEACHER_KEYS = {"path", "device", "dtype"}
# Loss types that read a teacher (live, or to precompute scores).
TEACHER_LOSSES = {"SimilarityDistributionDistillationLoss", "AttentionRelationDistillationLoss", "EmbeddingMSEDistillationLoss"}
EVALUATION_SETS = ("stsb", "sick")


class RecipeError(ValueError):
    """The recipe is malformed; raised before any model or dataset is loaded."""


@dataclass
class Recipe:
    name: str
    output_dir: str
    model: dict[str, Any]
    datasets: list[DatasetSpec]
    loss: dict[str, dict[str, Any]]
    seed: int = 42
    teacher: dict[str, Any] | None = None
    prompts: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: list[str] = field(default_factory=list)
    resume_from_checkpoint: str | bool | None = None
    source: str | None = None


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
    model = dict(raw["model"])
    if "path" not in model:
        raise RecipeError(f"model.path is missing{where}")
    bad = set(model) - MODEL_KEYS
    if bad:
        raise RecipeError(f"unknown model option(s) {sorted(bad)}{where}; known: {sorted(MODEL_KEYS)}")
    model.setdefault("convert", True)
    teacher = raw.get("teacher")
    if teacher is not None:
        teacher = dict(teacher)
        bad = set(teacher) - TEACHER_KEYS
        if bad or "path" not in teacher:
            raise RecipeError(f"the teacher section{where} needs 'path' (and optionally device, dtype); got {sorted(teacher)}")

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

    loss = raw["loss"]
    if not isinstance(loss, dict):
        raise RecipeError(f"'loss'{where} must map component names to {{type: ..., weight: ...}}")
    for name, component in loss.items():
        if not isinstance(component, dict) or "type" not in component:
            raise RecipeError(f"loss component {name!r}{where} needs a 'type'")
        nested = [v["type"] for v in component.values() if isinstance(v, dict) and "type" in v]
        if TEACHER_LOSSES & {component["type"], *nested} and teacher is None:
            raise RecipeError(
                f"loss component {name!r} ({component['type']}) distills from a teacher, but the recipe{where} has "
                "no 'teacher' section: add teacher: {path: <full-precision model>}"
            )
    evaluation = raw.get("evaluation") or []
    evaluation = [evaluation] if isinstance(evaluation, str) else list(evaluation)
    for name in evaluation:
        if name not in EVALUATION_SETS:
            raise RecipeError(f"unknown evaluation set {name!r}{where}; known: {EVALUATION_SETS}")
    training = dict(raw.get("training") or {})
    if "output_dir" in training:
        raise RecipeError("set output_dir at the top level of the recipe, not under training")
    return Recipe(
        name=str(raw.get("name") or (Path(source).stem if source else "recipe")),
        output_dir=str(raw["output_dir"]),
        model=model,
        datasets=specs,
        loss=dict(loss),
        seed=int(raw.get("seed", 42)),
        teacher=teacher,
        prompts=raw.get("prompts"),
        training=training,
        evaluation=evaluation,
        resume_from_checkpoint=raw.get("resume_from_checkpoint"),
        source=source,
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
