"""The typed sections of a parsed recipe: frozen dataclasses, one per YAML section, with their defaults.

:func:`~st_bitnet.training.recipe.parse_recipe` validates the YAML once and builds these; the rest of the code
reads named attributes (``recipe.model.max_seq_length``, ``recipe.training.time_budget_minutes``,
``recipe.hard_negatives.range_min``). Each spec is also a read-only mapping keyed by the recipe's own option
names (``recipe.model["path"]``, ``.get``, ``in``, iteration, ``dict(spec)``), so code written against the plain
YAML sections keeps working; item assignment raises ``TypeError`` (edit the raw recipe before parsing, or build
a changed copy with ``dataclasses.replace``). ``to_dict()`` gives the section back as plain YAML data that
``parse_recipe`` reads into an equal spec.

Example::

    recipe = load_recipe("recipes/minilm_bitembed.yaml")
    recipe.model.max_seq_length         # 256
    recipe.model["max_seq_length"]      # 256, the same value through the mapping view
    dataclasses.replace(recipe.model, max_seq_length=128)   # a changed copy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from st_bitnet.multi_precision.precision import BITS


def _plain(value: Any) -> Any:
    """``value`` as plain YAML data (specs and dataclasses to dicts, tuples to lists)."""
    if isinstance(value, SectionSpec):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class SectionSpec(Mapping):
    """A frozen recipe section that also reads as a read-only mapping of its recipe options.

    Subclasses are ``@dataclass(frozen=True, eq=False)``: equality is defined here (same type: same fields; a
    plain mapping: the same items), so a spec still compares equal to the dict it replaced.
    """

    SECTION = "section"  # the recipe key, for error messages

    def _items(self) -> dict[str, Any]:
        """The mapping view: every option under its recipe key (None: not set)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The section as plain YAML data (options left unset are left out); ``parse_recipe`` reads it back."""
        return {key: _plain(value) for key, value in self._items().items() if value is not None}

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __bool__(self) -> bool:  # a parsed section is there, whatever its options (not "empty mapping")
        return True

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self))
        if isinstance(other, Mapping) and not isinstance(other, SectionSpec):
            return dict(self) == dict(other)
        return NotImplemented

    __hash__ = None  # holds dicts

    def _read_only(self, *args, **kwargs):
        raise TypeError(
            f"the recipe's {self.SECTION} section ({type(self).__name__}) is read-only: change the raw recipe before "
            f"parse_recipe (or `--set {self.SECTION}.<key>=<value>`), or build a changed copy with "
            f"dataclasses.replace(spec, <key>=<value>)"
        )

    __setitem__ = __delitem__ = setdefault = pop = popitem = update = clear = _read_only


def option_keys(spec_class: type) -> set[str]:
    """The recipe option names a section spec takes (its field names)."""
    return {f.name for f in dataclasses.fields(spec_class)}


@dataclass(frozen=True, eq=False)
class MultiPrecisionSpec(SectionSpec):
    """The validated ``model.multi_precision`` section.

    Attributes:
        precisions: bit widths the quantizer serves (widest first), e.g. ``(16, 8, 4, 2, 1)``.
        pooling: None keeps the model's pooling; else ``{"mode", "normalization", "include_prompt"}`` for the
            ``QuantizationAwarePooling`` that replaces its ``Pooling`` (+ ``Normalize``); a None mode / include_prompt
            keeps the replaced pooling's.
        calibration_rows: number of training texts the quantizer's ranges are calibrated on.
        calibration: ``"std"`` (median / ``std_multiplier`` x std) or ``"minmax"``.
        std_multiplier: half-width of the ``"std"`` range in standard deviations.
        binary_threshold: ``"offset"`` (nested 1-bit code, trained) or ``"zero"`` (sign of the value).
        rotation: whether the quantizer learns an orthogonal map before its codes (identity at start; give
            ``rotation_generator`` the quantizer's learning rate in ``learning_rate_mapping``).
    """

    SECTION = "model.multi_precision"

    precisions: tuple[int, ...] = BITS
    pooling: dict[str, Any] | None = None
    calibration_rows: int = 512
    calibration: str = "std"
    std_multiplier: float = 2.0
    binary_threshold: str = "offset"
    rotation: bool = False


@dataclass(frozen=True, eq=False)
class ModelSpec(SectionSpec):
    """The validated ``model`` section: the student (or, with ``convert: false``, the model fine-tuned).

    Attributes:
        path: Hub id, folder, or ``pkg:<python package>`` exposing ``get_model_path()``.
        convert: BitNet-convert the model before training (false: fine-tune it as is, e.g. a teacher).
        conversion: :class:`~st_bitnet.BitNetConversionConfig` fields (None: its defaults).
        calibrate_norms: training sentences the conversion's norm weights are fitted on (0: keep them at ones).
        max_seq_length: truncation length (None: the model's own).
        lora: peft ``LoraConfig`` fields (fine-tune with adapters), or None.
        pack: also save a packed copy after training.
        device: the device to load the model on (None: sentence-transformers' choice).
        multi_precision: the output quantizer trained with the model, or None.
        trust_remote_code: load a saved model that ships its own modules.
        gguf_file: a ``.gguf`` file inside ``path`` to build the model from.
        pooling: ``mean`` | ``cls`` | ``lasttoken`` | ``max`` for a raw backbone (None: per architecture).
        normalize: L2-normalise the raw backbone's embeddings (None: true).
        prompts: the model's named prompts ``{name: prompt}``, saved with it.
        freeze: ``{"embeddings": bool, "trainable_layers": int | None}``, or None (train everything).
        dropout: every dropout probability of the backbone during training, attention probabilities included
            (None: the model's own, e.g. 0.1 for BERT).
    """

    SECTION = "model"

    path: str
    convert: bool = True
    conversion: dict[str, Any] | None = None
    calibrate_norms: int = 64
    max_seq_length: int | None = None
    lora: dict[str, Any] | None = None
    pack: bool = False
    device: str | None = None
    multi_precision: MultiPrecisionSpec | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    pooling: str | None = None
    normalize: bool | None = None
    prompts: dict[str, str] | None = None
    freeze: dict[str, Any] | None = None
    dropout: float | None = None


@dataclass(frozen=True, eq=False)
class TeacherSpec(SectionSpec):
    """The validated ``teacher`` section: the frozen full-precision model the distillation losses read.

    Attributes:
        path: Hub id, folder, or ``pkg:<python package>``.
        device: its device (None: the student's).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (and short forms); None keeps the loaded dtype.
        max_seq_length, gguf_file, pooling, normalize, prompts: as in :class:`ModelSpec`.
    """

    SECTION = "teacher"

    path: str
    device: str | None = None
    dtype: str | None = None
    max_seq_length: int | None = None
    gguf_file: str | None = None
    pooling: str | None = None
    normalize: bool | None = None
    prompts: dict[str, str] | None = None


@dataclass(frozen=True, eq=False)
class LossComponentSpec(SectionSpec):
    """One validated ``loss.<name>`` component.

    Attributes:
        type: the loss class name (st_bitnet or sentence-transformers).
        weight: its weight in the weighted sum of the components.
        options: the loss class's keyword arguments as written (a nested ``{type: ...}`` value is an inner loss).
        multi_precision: false, true (every precision the quantizer serves) or ``{precisions, precision_weights,
            n_precisions_per_step}``: wrap the component in ``MultiPrecisionLoss``.
        precompute_teacher_scores: score the training pairs with the teacher once, before training, instead of
            running it at every step (per-row candidates only).
        precompute_teacher_embeddings: embed every training text with the teacher once, before training, and pass
            the embeddings as labels (the same similarity / embedding distillation as a live teacher, in-batch
            negatives included, without a teacher forward per step).
        teacher: None (the recipe's teacher) or ``"self"`` (self-distillation from the model's float output).

    The mapping view is the component as written: ``type``, ``weight``, the options, and the runner's own keys
    where they are set.
    """

    SECTION = "loss"

    type: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    multi_precision: bool | dict[str, Any] = False
    precompute_teacher_scores: bool = False
    precompute_teacher_embeddings: bool = False
    teacher: str | None = None

    @classmethod
    def from_component(cls, component: Mapping[str, Any]) -> LossComponentSpec:
        """The spec of a (validated) component mapping ``{type, weight, ...}``."""
        options = {k: v for k, v in component.items() if k not in LOSS_RECIPE_KEYS}
        return cls(
            type=component["type"],
            weight=float(component.get("weight", 1.0)),
            options=options,
            multi_precision=component.get("multi_precision") or False,
            precompute_teacher_scores=bool(component.get("precompute_teacher_scores", False)),
            precompute_teacher_embeddings=bool(component.get("precompute_teacher_embeddings", False)),
            teacher=component.get("teacher"),
        )

    def _items(self) -> dict[str, Any]:
        items = {"type": self.type, "weight": self.weight, **self.options}
        if self.multi_precision is not False:
            items["multi_precision"] = self.multi_precision
        if self.precompute_teacher_scores:
            items["precompute_teacher_scores"] = True
        if self.precompute_teacher_embeddings:
            items["precompute_teacher_embeddings"] = True
        if self.teacher is not None:
            items["teacher"] = self.teacher
        return items

    def to_dict(self) -> dict[str, Any]:
        return _plain(self._items())  # an option set to null stays null (it may differ from the class default)


# Keys of a loss component the runner consumes itself (not passed to the loss class).
LOSS_RECIPE_KEYS = option_keys(LossComponentSpec) - {"options"}


@dataclass(frozen=True, eq=False)
class TrainingSpec(SectionSpec):
    """The validated ``training`` section.

    Attributes:
        arguments: ``SentenceTransformerTrainingArguments`` fields as written (the runner adds its defaults).
        time_budget_minutes: stop training after this many minutes (None: no budget).
        decay_over_time_budget: decay the learning rate over the time budget rather than over ``max_steps``.

    The mapping view is the section as written: the arguments, and the budget options where they are set.
    """

    SECTION = "training"

    arguments: dict[str, Any] = field(default_factory=dict)
    time_budget_minutes: float | None = None
    decay_over_time_budget: bool = False

    def _items(self) -> dict[str, Any]:
        items = dict(self.arguments)
        if self.time_budget_minutes is not None:
            items["time_budget_minutes"] = self.time_budget_minutes
        if self.decay_over_time_budget:
            items["decay_over_time_budget"] = True
        return items

    def to_dict(self) -> dict[str, Any]:
        return _plain(self._items())


# training keys the runner consumes itself (not SentenceTransformerTrainingArguments fields)
RUNNER_TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingSpec) if f.name != "arguments")


@dataclass(frozen=True, eq=False)
class HardNegativesSpec(SectionSpec):
    """The validated ``hard_negatives`` section: negatives mined by the teacher for the (anchor, positive) sets.

    Attributes:
        num_negatives: negatives kept per row.
        range_min, range_max: the candidates' rank window (skipping the top ranks, where unlabelled positives sit).
        relative_margin: a candidate scores below ``(1 - relative_margin)`` x the positive's (None: no margin).
        batch_size: the teacher's encoding batch size.
        datasets: dataset keys to mine for (None: every (anchor, positive) dataset).
    """

    SECTION = "hard_negatives"

    num_negatives: int = 1
    range_min: int = 10
    range_max: int = 50
    relative_margin: float | None = 0.05
    batch_size: int = 64
    datasets: tuple[str, ...] | None = None

    def mining_settings(self) -> dict[str, Any]:
        """The settings the mined data depends on: stamped into its ``settings.json`` (with the row count), so a
        cache is reused only when they match. Adding a key here re-mines every existing cache."""
        return {"num_negatives": self.num_negatives, "range_min": self.range_min, "range_max": self.range_max,
                "relative_margin": self.relative_margin, "batch_size": self.batch_size}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self.mining_settings())  # relative_margin: null (no margin) stays null
        if self.datasets is not None:
            out["datasets"] = list(self.datasets)
        return out
