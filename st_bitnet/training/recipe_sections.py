"""Section parsers of a recipe: each YAML section validated into its typed spec (:mod:`.recipe_specs`).

:func:`~.recipe.parse_recipe` calls them in the order of a recipe file: option types, ``model`` (backbone, freeze,
output quantizer), ``teacher``, ``loss`` (each component's arguments, its multi-precision wrapper, precomputed
teacher labels), ``training``, ``warm_start``, ``hard_negatives``. Every error names the key and what it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from st_bitnet.multi_precision.precision import BITS, resolve_bits

from .errors import RecipeError
from .loss_types import loss_class
from .recipe_specs import (
    LOSS_RECIPE_KEYS,
    RUNNER_TRAINING_KEYS,
    HardNegativesSpec,
    LossComponentSpec,
    ModelSpec,
    MultiPrecisionSpec,
    TeacherSpec,
    TrainingSpec,
    option_keys,
)

# hard_negatives: negatives mined by the teacher for the (anchor, positive) datasets, see data_preparation.mine_negatives.
HARD_NEGATIVE_KEYS = option_keys(HardNegativesSpec)
MODEL_KEYS = option_keys(ModelSpec)
# Keys that build the embedder from a raw backbone / GGUF; the teacher section takes them too.
BACKBONE_KEYS = ("gguf_file", "pooling", "normalize", "prompts")
TEACHER_KEYS = option_keys(TeacherSpec)
FREEZE_KEYS = {"embeddings", "trainable_layers"}
FREEZE_EXAMPLE = "{embeddings: true, trainable_layers: 4}"
# model.multi_precision: the output quantizer the runner appends to the student before training.
MULTI_PRECISION_KEYS = option_keys(MultiPrecisionSpec)
MULTI_PRECISION_EXAMPLE = f"{{precisions: {list(BITS)}, pooling: mean, calibration_rows: 512}}"
POOLING_MODES = ("mean", "cls", "lasttoken", "max")
POOLING_KEYS = {"mode", "normalization", "include_prompt"}
POOLING_NORMALIZATIONS = ("rms", "layer", "none")
# loss.<name>.multi_precision: the MultiPrecisionLoss wrapper of one component.
LOSS_MULTI_PRECISION_KEYS = {"precisions", "precision_weights", "n_precisions_per_step"}


# Top-level and model options with one expected type (checked at parse time, so --check catches them).
TYPED_OPTIONS = {
    "name": str, "seed": int, "output_dir": str, "description": str, "training": dict, "prompts": dict,
    "model.convert": bool, "model.pack": bool, "model.calibrate_norms": int, "model.max_seq_length": int,
    "model.trust_remote_code": bool, "model.conversion": dict, "model.lora": dict, "model.dropout": float,
}  # fmt: skip


def _type_ok(value, expected) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_option_types(raw: dict, where: str = "") -> None:
    """Raise for a top-level or model option of the wrong type (see :data:`TYPED_OPTIONS`)."""
    for dotted, expected in TYPED_OPTIONS.items():
        section, _, key = dotted.rpartition(".")
        holder = raw.get(section) if section else raw
        if isinstance(holder, dict) and holder.get(key) is not None and not _type_ok(holder[key], expected):
            raise RecipeError(
                f"{dotted}{where} must be a {expected.__name__}, got {type(holder[key]).__name__} {holder[key]!r}"
            )


def _set_options(section: dict) -> dict:
    """The options given a value (null: the option's default)."""
    return {key: value for key, value in section.items() if value is not None}


def _parse_precisions(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RecipeError(f"{what} must be a non-empty list of bit widths out of {list(BITS)}, got {value!r}")
    try:
        bits = [resolve_bits(v) for v in value]
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{what}: {error}") from None
    if len(set(bits)) != len(bits):
        raise RecipeError(f"{what} lists a bit width twice: {list(value)}")
    return tuple(bits)


def _parse_pooling(value: Any, where: str) -> dict[str, Any] | None:
    what = f"model.multi_precision.pooling{where}"
    if value is None or value == "keep":
        return None
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise RecipeError(f"{what} must be 'keep', a pooling mode {POOLING_MODES} or {{mode, normalization, include_prompt}}")
    bad = set(value) - POOLING_KEYS
    if bad:
        raise RecipeError(f"unknown key(s) {sorted(bad)} in {what}; known: {sorted(POOLING_KEYS)}")
    mode = value.get("mode")
    if mode is not None and mode not in POOLING_MODES:
        raise RecipeError(f"{what}: unknown pooling mode {mode!r}; known: 'keep', {', '.join(POOLING_MODES)}")
    normalization = value.get("normalization", "rms")
    if normalization not in POOLING_NORMALIZATIONS:
        raise RecipeError(f"{what}.normalization must be one of {POOLING_NORMALIZATIONS}, got {normalization!r}")
    include_prompt = value.get("include_prompt")
    if include_prompt is not None and not isinstance(include_prompt, bool):
        raise RecipeError(f"{what}.include_prompt must be true or false, got {include_prompt!r}")
    return {"mode": mode, "normalization": normalization, "include_prompt": include_prompt}


def _optional_section(value: Any, what: str, known, example: str, accepts: str = "a mapping") -> dict | None:
    """A section that null / false switches off: None then, else the mapping, after checking its keys."""
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise RecipeError(f"{what} must be {accepts} like {example}, got {value!r}")
    bad = set(value) - set(known)
    if bad:
        raise RecipeError(f"unknown key(s) {sorted(bad)} in {what}; known: {sorted(known)}")
    return dict(value)


def parse_multi_precision(value: Any, source: str | None = None) -> MultiPrecisionSpec | None:
    """Validate ``model.multi_precision``: ``true`` (defaults), a mapping, or false / null (off).

    Mapping keys: ``precisions`` (default ``[16, 8, 4, 2, 1]``), ``pooling`` (``keep`` (default), ``mean``, ``cls``,
    ``lasttoken``, ``max``, or ``{mode, normalization: rms|layer|none, include_prompt}``), ``calibration_rows``
    (training texts to calibrate on, default 512, at least 2), ``calibration`` (``std`` | ``minmax``),
    ``std_multiplier`` (default 2.0), ``binary_threshold`` (``offset`` | ``zero``), ``rotation`` (default false: a
    learned orthogonal map before the codes).

    Raises:
        RecipeError: naming the bad key and what it accepts.
    """
    where = f" in {source}" if source else ""
    if isinstance(value, MultiPrecisionSpec):
        return value
    if value is True:
        return MultiPrecisionSpec()
    value = _optional_section(value, f"model.multi_precision{where}", MULTI_PRECISION_KEYS, MULTI_PRECISION_EXAMPLE,
                              accepts="true or a mapping")  # fmt: skip
    if value is None:
        return None
    spec = MultiPrecisionSpec()
    precisions = spec.precisions
    if "precisions" in value:
        precisions = _parse_precisions(value["precisions"], f"model.multi_precision.precisions{where}")
    rows = value.get("calibration_rows", spec.calibration_rows)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
        raise RecipeError(f"model.multi_precision.calibration_rows{where} must be an integer >= 2 (training texts), got {rows!r}")
    calibration = value.get("calibration", spec.calibration)
    if calibration not in ("std", "minmax"):
        raise RecipeError(f"model.multi_precision.calibration{where} must be 'std' or 'minmax', got {calibration!r}")
    multiplier = value.get("std_multiplier", spec.std_multiplier)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier > 0:
        raise RecipeError(f"model.multi_precision.std_multiplier{where} must be a positive number, got {multiplier!r}")
    threshold = value.get("binary_threshold", spec.binary_threshold)
    if threshold not in ("offset", "zero"):
        raise RecipeError(f"model.multi_precision.binary_threshold{where} must be 'offset' or 'zero', got {threshold!r}")
    rotation = value.get("rotation", spec.rotation)
    if not isinstance(rotation, bool):
        raise RecipeError(f"model.multi_precision.rotation{where} must be true or false, got {rotation!r}")
    return MultiPrecisionSpec(
        precisions=tuple(sorted(precisions, reverse=True)),
        pooling=_parse_pooling(value.get("pooling"), where),
        calibration_rows=rows,
        calibration=calibration,
        std_multiplier=float(multiplier),
        binary_threshold=threshold,
        rotation=rotation,
    )


def parse_model_backbone(section: dict, what: str = "model", where: str = "") -> dict:
    """Validate the keys that decide how the embedder is built and trained (``model`` or ``teacher`` section).

    * ``gguf_file``: a ``.gguf`` file name inside ``path`` (a local folder or a Hub repo);
    * ``pooling``: ``mean`` | ``cls`` | ``lasttoken`` | ``max``, only for a raw backbone or a GGUF (a
      SentenceTransformer folder keeps its own pooling; giving one there is an error at load time);
    * ``normalize``: true / false (L2 ``Normalize`` after the pooling, same rule as ``pooling``);
    * ``prompts``: ``{name: prompt}``, the model's own prompts (``encode(prompt_name=...)``, saved with it);
    * ``freeze`` (model section only): ``{embeddings: bool, trainable_layers: int >= 0 | null}``, or null / false.

    Returns the section with ``freeze`` normalised to ``{"embeddings": bool, "trainable_layers": int | None}`` or None.

    Raises:
        RecipeError: naming the bad key and what it accepts.
    """
    section = dict(section)
    gguf_file = section.get("gguf_file")
    if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file.endswith(".gguf")):
        raise RecipeError(f"{what}.gguf_file{where} must be the name of a .gguf file inside {what}.path, got {gguf_file!r}")
    pooling = section.get("pooling")
    if pooling is not None and pooling not in POOLING_MODES:
        raise RecipeError(f"{what}.pooling{where} must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
    normalize = section.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise RecipeError(f"{what}.normalize{where} must be true or false, got {normalize!r}")
    prompts = section.get("prompts")
    if prompts is not None and (
        not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
    ):
        raise RecipeError(f"{what}.prompts{where} must map prompt names to strings, e.g. {{query: 'query: '}}, got {prompts!r}")
    if "freeze" in section:
        section["freeze"] = parse_freeze(section["freeze"], f"{what}.freeze{where}")
    return section


def parse_freeze(value: Any, what: str = "model.freeze") -> dict | None:
    """``model.freeze``: ``{embeddings: true, trainable_layers: N}`` (either key optional), or null / false (off).

    ``embeddings`` freezes the backbone's token (input) embeddings; ``trainable_layers: N`` freezes every
    transformer layer below the top ``N`` (0 freezes them all; null / absent freezes none).
    """
    value = _optional_section(value, what, FREEZE_KEYS, FREEZE_EXAMPLE)
    if value is None:
        return None
    embeddings = value.get("embeddings", False)
    if not isinstance(embeddings, bool):
        raise RecipeError(f"{what}.embeddings must be true or false, got {embeddings!r}")
    layers = value.get("trainable_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise RecipeError(
            f"{what}.trainable_layers must be an integer >= 0 (train only the top N transformer layers) or null "
            f"(freeze no layer), got {layers!r}"
        )
    return {"embeddings": embeddings, "trainable_layers": layers}


def parse_model_section(section: Mapping, where: str = "", source: str | None = None) -> ModelSpec:
    """Validate the ``model`` section into a :class:`ModelSpec` (null options take their defaults)."""
    model = dict(section)
    check_option_types({"model": model}, where)
    if "path" not in model:
        raise RecipeError(f"model.path is missing{where}")
    bad = set(model) - MODEL_KEYS
    if bad:
        raise RecipeError(f"unknown model option(s) {sorted(bad)}{where}; known: {sorted(MODEL_KEYS)}")
    model = parse_model_backbone(model, "model", where)
    dropout = model.get("dropout")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise RecipeError(f"model.dropout{where} must be in [0, 1), got {dropout!r}")
    model["multi_precision"] = parse_multi_precision(model.get("multi_precision"), source)
    return ModelSpec(**_set_options(model))


def parse_teacher_section(section: Mapping, where: str = "") -> TeacherSpec:
    """Validate the ``teacher`` section into a :class:`TeacherSpec`."""
    teacher = dict(section)
    bad = set(teacher) - TEACHER_KEYS
    if bad or "path" not in teacher:
        raise RecipeError(
            f"the teacher section{where} needs 'path' (and optionally {', '.join(sorted(TEACHER_KEYS - {'path'}))}); "
            f"got {sorted(teacher)}"
        )
    return TeacherSpec(**_set_options(parse_model_backbone(teacher, "teacher", where)))


def check_loss_arguments(name: str, component: dict, where: str = "") -> None:
    """Raise for a loss component whose type is unknown, whose keys the loss class does not take, or whose
    values have the wrong type for the class's defaults (``weight`` must be a number). Nested components
    (``{type: ...}`` values) are checked too."""
    import inspect

    if not isinstance(component["type"], str):
        raise RecipeError(f"loss component {name!r}{where}: 'type' must be a class name, got {component['type']!r}")
    cls = loss_class(component["type"])
    if "weight" in component and not _type_ok(component["weight"], float):
        raise RecipeError(f"loss component {name!r}{where}: weight must be a number, got {component['weight']!r}")
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = [k for k in parameters if k not in ("self", "model")]
    for key, value in component.items():
        if key in LOSS_RECIPE_KEYS:
            continue
        if key not in parameters and not takes_any:
            raise RecipeError(
                f"loss component {name!r} ({component['type']}){where}: unknown argument {key!r}; "
                f"{component['type']} takes {sorted(known)}"
            )
        if isinstance(value, dict) and "type" in value:
            check_loss_arguments(f"{name}.{key}", value, where)
            continue
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        expected = type(default) if isinstance(default, (bool, int, float, str)) else None
        if expected is int:
            expected = float  # an int default still takes 0.5 (scale=20 -> 20.5)
        if expected is not None and value is not None and not _type_ok(value, expected):
            raise RecipeError(
                f"loss component {name!r} ({component['type']}){where}: {key} must be a {expected.__name__} "
                f"(default {default!r}), got {type(value).__name__} {value!r}"
            )


def parse_loss_multi_precision(
    name: str, component: dict, model_spec: MultiPrecisionSpec | None, where: str = ""
) -> dict | None:
    """Validate a loss component's ``multi_precision`` option (true, false or {precisions, precision_weights,
    n_precisions_per_step}) and the model section it needs; returns the ``MultiPrecisionLoss`` keyword arguments
    (None when the component is not wrapped)."""
    value = component.get("multi_precision", False)
    add_section = f"add model.multi_precision: {MULTI_PRECISION_EXAMPLE}"
    if component["type"] == "MultiPrecisionLoss" and value in (False, None):
        if model_spec is None:
            raise RecipeError(f"loss component {name!r} (MultiPrecisionLoss){where} needs the student's output quantizer: {add_section}")
        if "precisions" in component:
            _check_served(name, _parse_precisions(component["precisions"], f"loss.{name}.precisions{where}"), model_spec, where)
        return None
    if value is False or value is None:
        return None
    if model_spec is None:
        raise RecipeError(f"loss component {name!r}{where} sets multi_precision, but the model has no output quantizer: {add_section}")
    from st_bitnet.losses import traits  # the loss classes load with sentence-transformers: only when checked

    cls = loss_class(component["type"])
    if not traits.multi_precision_wrappable(cls):
        why = traits.why_not_multi_precision_wrappable(cls)
        raise RecipeError(f"loss component {name!r} ({component['type']}){where} cannot take multi_precision: {why}")
    if value is True:
        return {"precisions": list(model_spec.precisions)}
    option = f"loss.{name}.multi_precision{where}"
    if not isinstance(value, dict):
        raise RecipeError(f"{option} must be true or {{precisions, precision_weights, n_precisions_per_step}}")
    bad = set(value) - LOSS_MULTI_PRECISION_KEYS
    if bad:
        raise RecipeError(f"unknown key(s) {sorted(bad)} in {option}; known: {sorted(LOSS_MULTI_PRECISION_KEYS)}")
    kwargs = dict(value)
    bits = _parse_precisions(kwargs.get("precisions", list(model_spec.precisions)), f"{option}: precisions")
    _check_served(name, bits, model_spec, where)
    kwargs["precisions"] = list(bits)
    weights = kwargs.get("precision_weights")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(bits)):
        raise RecipeError(f"{option}: precision_weights needs one weight per precision {list(bits)}")
    per_step = kwargs.get("n_precisions_per_step", -1)
    if isinstance(per_step, bool) or not isinstance(per_step, int):
        raise RecipeError(f"{option}: n_precisions_per_step must be an integer (-1 = every precision), got {per_step!r}")
    return kwargs


def _check_served(name: str, bits: tuple[int, ...], model_spec: MultiPrecisionSpec, where: str) -> None:
    unserved = [b for b in bits if b not in model_spec.precisions]
    if unserved:
        raise RecipeError(
            f"loss component {name!r}{where} trains {unserved}-bit outputs, but model.multi_precision.precisions is "
            f"{list(model_spec.precisions)}"
        )


def parse_loss_section(
    loss: Any, model_spec: MultiPrecisionSpec | None, teacher: TeacherSpec | None, where: str = ""
) -> dict[str, LossComponentSpec]:
    """Validate the ``loss`` section (every component, against the model's quantizer and the teacher section)."""
    from st_bitnet.losses import traits

    if not isinstance(loss, Mapping):
        raise RecipeError(f"'loss'{where} must map component names to {{type: ..., weight: ...}}")
    components = {}
    for name, component in loss.items():
        if not isinstance(component, Mapping) or "type" not in component:
            raise RecipeError(f"loss component {name!r}{where} needs a 'type'")
        component = dict(component)
        check_loss_arguments(name, component, where)
        parse_loss_multi_precision(name, component, model_spec, where)
        nested = [v["type"] for v in component.values() if isinstance(v, dict) and "type" in v]
        if "teacher" in component and component["teacher"] != "self":
            raise RecipeError(
                f"loss component {name!r}{where}: 'teacher' may only be 'self' (self-distillation); the teacher model "
                "is the recipe's teacher section"
            )
        self_distilled = component.get("teacher") == "self"  # the student's own float output is the target
        if self_distilled and component["type"] != "MultiPrecisionSimilarityDistillationLoss":
            raise RecipeError(
                f"loss component {name!r}{where}: self-distillation needs MultiPrecisionSimilarityDistillationLoss "
                f"(the low-bit outputs distilled from the model's own float output), not {component['type']}"
            )
        if teacher is None and not self_distilled and any(traits.needs_teacher(loss_class(t)) for t in (component["type"], *nested)):
            raise RecipeError(
                f"loss component {name!r} ({component['type']}) distills from a teacher, but the recipe{where} has "
                "no 'teacher' section: add teacher: {path: <full-precision model>}"
            )
        for key in ("precompute_teacher_scores", "precompute_teacher_embeddings"):
            if not isinstance(component.get(key, False), bool):
                raise RecipeError(f"loss component {name!r}{where}: {key} must be true or false, got {component[key]!r}")
        if component.get("precompute_teacher_embeddings") and not traits.accepts_teacher_embeddings(loss_class(component["type"])):
            raise RecipeError(
                f"loss component {name!r}{where}: {component['type']} cannot distill from precomputed teacher "
                "embeddings (SimilarityDistributionDistillationLoss, PairSimilarityDistillationLoss and "
                "EmbeddingMSEDistillationLoss can)"
            )
        components[name] = LossComponentSpec.from_component(component)
    return components


def check_precomputed_labels(loss: Mapping[str, LossComponentSpec], where: str = "") -> None:
    """A batch has one label column: the components that precompute the teacher into it must agree on what."""
    scores = [n for n, c in loss.items() if c.precompute_teacher_scores]
    embeddings = [n for n, c in loss.items() if c.precompute_teacher_embeddings]
    if scores and embeddings:
        raise RecipeError(
            f"loss{where}: {scores} precompute teacher scores and {embeddings} teacher embeddings, but a batch has one "
            "label column: precompute the embeddings for all of them (similarity KD reads them too)"
        )


def check_training_options(training: dict, where: str = "") -> None:
    """Raise for a ``training`` key that ``SentenceTransformerTrainingArguments`` does not have, or a value whose
    type does not match the field's default (e.g. YAML reads ``learning_rate: 2e-5`` as a string)."""
    import dataclasses

    from sentence_transformers import SentenceTransformerTrainingArguments

    fields = {f.name: f for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    unknown = sorted(set(training) - set(fields) - set(RUNNER_TRAINING_KEYS))
    if unknown:
        raise RecipeError(f"unknown training option(s) {unknown}{where} (SentenceTransformerTrainingArguments fields, "
                          f"or the runner's {sorted(RUNNER_TRAINING_KEYS)})")
    budget = training.get("time_budget_minutes")
    if budget is not None and (not _type_ok(budget, float) or not budget > 0):
        raise RecipeError(f"training.time_budget_minutes{where} must be a positive number of minutes, got {budget!r}")
    decay = training.get("decay_over_time_budget", False)
    if not isinstance(decay, bool):
        raise RecipeError(f"training.decay_over_time_budget{where} must be true or false, got {decay!r}")
    if decay and budget is None:
        raise RecipeError(f"training.decay_over_time_budget{where} needs training.time_budget_minutes")
    for key, value in training.items():
        if key in RUNNER_TRAINING_KEYS or (key == "bf16" and value == "auto"):  # bf16: auto is resolved at run time
            continue
        default = fields[key].default
        # numeric fields take any number (several int-default fields also take ratios); bools must be bools
        expected = bool if isinstance(default, bool) else float if isinstance(default, (int, float)) else None
        if expected is not None and value is not None and not _type_ok(value, expected):
            hint = " (YAML reads 2e-5 as text: write 2.0e-5)" if isinstance(value, str) and expected is float else ""
            kind = "true or false" if expected is bool else "a number"
            raise RecipeError(
                f"training.{key}{where} must be {kind} (default {default!r}), got {type(value).__name__} {value!r}{hint}"
            )


def parse_training_section(training: Mapping, where: str = "") -> TrainingSpec:
    """Validate the ``training`` section into a :class:`TrainingSpec` (trainer arguments + the runner's budget)."""
    training = dict(training)
    if "output_dir" in training:
        raise RecipeError("set output_dir at the top level of the recipe, not under training")
    check_training_options(training, where)
    return TrainingSpec(
        arguments={k: v for k, v in training.items() if k not in RUNNER_TRAINING_KEYS},
        time_budget_minutes=training.get("time_budget_minutes"),
        decay_over_time_budget=training.get("decay_over_time_budget", False),
    )


def parse_warm_start(value: Any, teacher, where: str = ""):
    """``warm_start: {type: blockwise, texts: 2048, steps_per_block: 200, ...}`` -> a BlockwiseConfig (or None)."""
    if value is None or value is False:
        return None
    from .blockwise import BlockwiseConfig

    if not isinstance(value, dict) or value.get("type", "blockwise") != "blockwise":
        raise RecipeError(f"warm_start{where} must be {{type: blockwise, texts: ..., steps_per_block: ...}}, got {value!r}")
    if teacher is None:
        raise RecipeError(f"warm_start{where} reconstructs the teacher's blocks: add a teacher section")
    fields = {k: v for k, v in value.items() if k != "type"}
    try:
        return BlockwiseConfig(**fields)
    except TypeError as error:
        raise RecipeError(f"warm_start{where}: {error}") from None
    except ValueError as error:
        raise RecipeError(f"{error}{where}") from None


def parse_hard_negatives(value: Any, teacher, specs, where: str = "") -> HardNegativesSpec | None:
    """``hard_negatives: {num_negatives: 1, range_min: 10, range_max: 50, datasets: [scifact]}``: validated spec."""
    value = _optional_section(value, f"hard_negatives{where}", HARD_NEGATIVE_KEYS,
                              "{num_negatives: 1, range_min: 10, range_max: 50}")  # fmt: skip
    if value is None:
        return None
    if teacher is None:
        raise RecipeError(f"hard_negatives{where} are mined by the teacher: add a teacher section")
    out = {**HardNegativesSpec().mining_settings(), **value}  # the defaults, then the recipe's values as written
    for key in ("num_negatives", "range_min", "range_max", "batch_size"):
        if not isinstance(out[key], int) or out[key] < 0 or (key != "range_min" and out[key] == 0):
            raise RecipeError(f"hard_negatives.{key}{where} must be a positive integer, got {out[key]!r}")
    if out["range_max"] <= out["range_min"]:
        raise RecipeError(f"hard_negatives{where}: range_max must exceed range_min")
    margin = out["relative_margin"]
    if margin is not None and not _type_ok(margin, float):
        raise RecipeError(f"hard_negatives.relative_margin{where} must be a number (or null: no margin), got {margin!r}")
    datasets = out.get("datasets")
    if datasets is not None and not isinstance(datasets, (list, tuple)):
        raise RecipeError(f"hard_negatives.datasets{where} must be a list of dataset names, got {datasets!r}")
    names = [spec.key for spec in specs]
    unknown = [d for d in datasets or [] if d not in names]
    if unknown:
        raise RecipeError(f"hard_negatives.datasets{where}: {unknown} are not datasets of this recipe ({names})")
    # values as written (no int -> float): they are stamped into the mined data's settings.json
    return HardNegativesSpec(**{**out, "datasets": tuple(datasets) if datasets is not None else None})
