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

from .callbacks import LossLogCallback, TimeBudgetCallback
from .loss_types import loss_class  # noqa: F401 (part of the runner's API)
from .datasets import load_training_datasets
from .recipe import RUNNER_TRAINING_KEYS, MultiPrecisionSpec, Recipe, RecipeError, load_recipe, parse_freeze, parse_multi_precision

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


def multi_precision_spec(recipe: Recipe) -> MultiPrecisionSpec | None:
    """The validated ``model.multi_precision`` (a Recipe built by hand may hold the raw YAML value)."""
    value = recipe.model.get("multi_precision")
    return value if isinstance(value, MultiPrecisionSpec) else parse_multi_precision(value)


def _is_sentence_transformer_folder(path: str) -> bool:
    """True when ``path`` (a local folder, else a Hub repo) holds sentence-transformers' ``modules.json``."""
    if Path(path).is_dir():
        return (Path(path) / "modules.json").is_file()
    from sentence_transformers.util import is_sentence_transformer_model

    return is_sentence_transformer_model(path)


def _gguf_folder(path: str, gguf_file: str, what: str) -> str:
    """The local folder holding ``gguf_file``: ``path`` itself, or the Hub snapshot the file is downloaded to."""
    folder = Path(path)
    if folder.is_dir():
        if not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"{what}.gguf_file: {gguf_file!r} not found in the folder {str(folder)!r}")
        return str(folder)
    if folder.exists():
        raise RecipeError(f"{what}.path must be the folder (or Hub repo) holding {what}.gguf_file, got the file {path!r}")
    from huggingface_hub import hf_hub_download

    return str(Path(hf_hub_download(path, gguf_file)).parent)


def load_embedder(spec: dict, what: str = "model", device: str | None = None):
    """The SentenceTransformer a ``model`` (or ``teacher``) section names, before any conversion or freezing.

    A sentence-transformers folder / repo (``modules.json``) loads as saved (``pooling`` / ``normalize`` are then an
    error: it has its own); a raw transformers backbone, or ``gguf_file`` inside ``path``, is built by
    :func:`st_bitnet.sentence_transformer.build_sentence_transformer` (full precision; default pooling last token
    for decoders with EOS appended and a prepended BOS kept, mean for encoders; ``normalize`` default true; a GGUF
    is dequantized once and cached). ``max_seq_length`` and ``prompts`` (merged into the model's) apply to both.
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(spec["path"])
    device = device if device is not None else spec.get("device")
    gguf_file = spec.get("gguf_file")
    build_keys = [k for k in ("pooling", "normalize") if spec.get(k) is not None]
    if gguf_file is None and _is_sentence_transformer_folder(path):
        if build_keys:
            raise RecipeError(
                f"{what}.{build_keys[0]} is set, but {what}.path {path!r} is already a SentenceTransformer (modules.json) "
                f"with its own pooling: remove {', '.join(f'{what}.{k}' for k in build_keys)}, or point {what}.path at "
                "the raw transformers backbone"
            )
        model = SentenceTransformer(path, device=device, trust_remote_code=bool(spec.get("trust_remote_code")))
        if spec.get("max_seq_length"):
            model.max_seq_length = int(spec["max_seq_length"])
    else:
        from st_bitnet.sentence_transformer import build_sentence_transformer

        if gguf_file is not None:
            path = _gguf_folder(path, gguf_file, what)
        model = build_sentence_transformer(
            path,
            gguf_file=gguf_file,
            pooling=spec.get("pooling"),
            normalize=spec.get("normalize", True) is not False,
            max_seq_length=int(spec["max_seq_length"]) if spec.get("max_seq_length") else None,
            convert_model=False,  # the caller converts (model.convert), after this
            device=device,
        )
        logger.info("%s: built from the raw backbone %s%s with %s pooling", what, path,
                    f" ({gguf_file})" if gguf_file else "", model[1].get_config_dict().get("pooling_mode"))  # fmt: skip
    if spec.get("prompts"):
        model.prompts = {**(model.prompts or {}), **spec["prompts"]}
    return model


TRANSFORMER_LAYER_PATHS = ("layers", "encoder.layer", "encoder.layers", "language_model.layers", "transformer.h", "h",
                           "decoder.layers")  # fmt: skip


def find_transformer_layers(backbone):
    """The ``nn.ModuleList`` of transformer blocks: ``layers`` (Llama / Qwen / Gemma...), ``encoder.layer`` (BERT...)
    and a few other usual names, on the model or its ``base_model``.

    Raises:
        RecipeError: when none of those names holds a non-empty ``ModuleList``.
    """
    from torch import nn

    for root in dict.fromkeys([backbone, getattr(backbone, "base_model", backbone)]):
        for name in TRANSFORMER_LAYER_PATHS:
            try:
                layers = root.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise RecipeError(
        f"model.freeze.trainable_layers: cannot find the transformer layer list of {type(backbone).__name__} "
        f"(looked for {', '.join(TRANSFORMER_LAYER_PATHS)}); freeze only the embeddings, or train every layer"
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (a tied weight counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_freeze(model, freeze: dict | None) -> tuple[int, int]:
    """Apply ``model.freeze`` in place: ``requires_grad_(False)`` on the token embeddings (``embeddings: true``)
    and on every transformer layer below the top ``trainable_layers``; the rest (final norm, pooling, output
    quantizer...) keeps training. The trainer's optimizer then holds only the trainable parameters, so frozen
    weights get neither updates nor weight decay. Returns (trainable, total) parameter counts.
    """
    from st_bitnet.introspection import backbones as transformers_models

    if not freeze:
        return count_parameters(model)
    backbones = transformers_models(model)
    if not backbones:
        raise RecipeError("model.freeze needs a model with a transformers backbone")
    for backbone in backbones:
        if freeze.get("embeddings"):
            embeddings = backbone.get_input_embeddings()
            if embeddings is None:
                raise RecipeError(f"model.freeze.embeddings: {type(backbone).__name__} has no input embeddings")
            embeddings.requires_grad_(False)
        keep = freeze.get("trainable_layers")
        if keep is not None:
            layers = find_transformer_layers(backbone)
            if keep > len(layers):
                raise RecipeError(
                    f"model.freeze.trainable_layers is {keep}, but {type(backbone).__name__} has {len(layers)} layers"
                )
            for layer in list(layers)[: len(layers) - keep]:
                layer.requires_grad_(False)
    return count_parameters(model)


def load_student(recipe: Recipe, calibration_sentences: list[str] | None = None, train_dataset=None):
    """The student SentenceTransformer: loaded (:func:`load_embedder`: a SentenceTransformer folder, a raw backbone
    or a GGUF file), BitNet-converted (``model.convert``), optionally with LoRA, frozen in part (``model.freeze``),
    and with ``model.multi_precision`` its output quantizer (calibrated on texts of ``train_dataset``).

    With norms in the conversion, their weights are fitted on ``model.calibrate_norms`` training sentences
    (default 64; 0 keeps them at ones), see :func:`st_bitnet.calibration.calibrate_norms`.
    """
    spec = recipe.model
    model = load_embedder(spec, "model")
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
        add_lora(model, spec["lora"])
    freeze = parse_freeze(spec.get("freeze"))  # idempotent; a Recipe built by hand may hold the raw YAML value
    if freeze:
        trainable, total = apply_freeze(model, freeze)
        logger.info("model.freeze %s: %d of %d parameters stay trainable (%.1f%%)", freeze, trainable, total,
                    100 * trainable / max(total, 1))  # fmt: skip
    multi_precision = multi_precision_spec(recipe)
    if multi_precision is not None:
        from .output_quantizer import attach_output_quantizer, calibration_texts

        if train_dataset is None:
            raise RecipeError("model.multi_precision needs the training data to calibrate the quantizer on")
        texts = calibration_texts(train_dataset, multi_precision.calibration_rows, recipe.prompts)
        attach_output_quantizer(model, multi_precision, texts)
    return model


def add_lora(model, lora_spec: dict) -> None:
    """LoRA adapters on every transformer backbone of ``model``; only the adapters stay trainable.

    Uses peft's ``inject_adapter_in_model`` rather than ``SentenceTransformer.add_adapter``: the latter goes
    through transformers' PEFT integration, which transformers 5.24 gates on peft >= 0.22 (not on PyPI as of
    2026-11), so it fails with every released peft. The adapters are the same peft LoRA layers either way,
    and ``merge_lora`` folds them into the base weights before saving."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(**{"task_type": "FEATURE_EXTRACTION", **lora_spec})
    backbones = transformer_backbones(model)
    if not backbones:
        raise RecipeError("model.lora: found no transformers backbone in the model to put adapters on")
    for backbone in backbones:
        inject_adapter_in_model(config, backbone)


def transformer_backbones(model) -> list:
    """The transformers models held as ``.model`` by the modules of ``model`` (a nested one is listed too: peft
    finds the LoRA layer already there and does not wrap it twice)."""
    return [module.model for module in model.modules() if hasattr(getattr(module, "model", None), "config")]


def merge_lora(model) -> None:
    """Fold trained LoRA adapters into the base weights, in place, so the result saves as a plain model
    (a standalone teacher: no adapter files, no base-model path to resolve, no adapter overhead)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for inner in transformer_backbones(model):
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
    model = load_embedder(recipe.teacher, "teacher", device=device)
    return FrozenTeacher(model, device=device, dtype=dtype, student=student)


def _instantiate_loss(name: str, params: dict, student, teacher, model_spec=None):
    """One loss from its recipe entry; a nested ``{type: ...}`` argument (a wrapper's inner loss) is built too, and
    ``multi_precision: true`` wraps the component in ``MultiPrecisionLoss``."""
    from .recipe import parse_loss_multi_precision

    params = dict(params)
    wrap = parse_loss_multi_precision(name, params, model_spec)
    params.pop("multi_precision", None)
    cls = loss_class(params.pop("type"))
    precomputed = params.pop("precompute_teacher_scores", False)
    # teacher: self (self-distillation, checked by parse_recipe) needs no teacher model
    if params.get("teacher") != "self" and "teacher" in inspect.signature(cls.__init__).parameters:
        params["teacher"] = None if precomputed else teacher
    for key, value in params.items():
        if isinstance(value, dict) and "type" in value:
            params[key] = _instantiate_loss(f"{name}.{key}", value, student, teacher, model_spec)
        elif isinstance(value, list) and key in ("directions", "relations"):
            params[key] = tuple(value)
    from st_bitnet.losses import MultiPrecisionLoss

    if cls is MultiPrecisionLoss and "precisions" not in params and model_spec is not None:
        params["precisions"] = list(model_spec.precisions)  # default: every precision the quantizer serves
    try:
        loss = cls(student, **params)
    except TypeError as error:
        raise RecipeError(f"loss component {name!r}: {error}") from None
    if wrap is not None:
        loss = MultiPrecisionLoss(student, loss, **wrap)
    return loss


def _runs_its_own_teacher_per_precision(loss) -> bool:
    """A standalone MultiPrecisionLoss over a teacher loss would run the teacher once per precision."""
    from st_bitnet.losses import MultiPrecisionLoss

    return isinstance(loss, MultiPrecisionLoss) and getattr(loss.loss, "teacher", None) is not None


def build_loss(recipe: Recipe, student, teacher):
    """The recipe's loss: one component as is, several as a :class:`WeightedCombinationLoss`."""
    from st_bitnet.losses import WeightedCombinationLoss

    components, weights = {}, {}
    for name, spec in recipe.loss.items():
        params = dict(spec)
        weights[name] = float(params.pop("weight", 1.0))
        components[name] = _instantiate_loss(name, params, student, teacher, multi_precision_spec(recipe))
    if len(components) == 1 and next(iter(weights.values())) == 1.0:
        only = next(iter(components.values()))
        if not _runs_its_own_teacher_per_precision(only):
            return only
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

    from .mixed_precision import resolve_bf16

    kwargs = {**DEFAULT_TRAINING_ARGS, **recipe.training}
    for key in RUNNER_TRAINING_KEYS:  # the runner's own options (TimeBudgetCallback, BudgetedTrainer)
        kwargs.pop(key, None)
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


def mine_negatives(recipe: Recipe, train_dataset, teacher):
    """Add teacher-mined hard negatives (``recipe.hard_negatives``) to the (anchor, positive) datasets.

    sentence-transformers' ``mine_hard_negatives`` ranks each dataset's own positives by the teacher's similarity to
    the anchor and keeps, per row, ``num_negatives`` candidates ranked between ``range_min`` and ``range_max`` whose
    score is below ``(1 - relative_margin)`` x the positive's (skipping the very top ranks, where unlabelled true
    positives sit). Rows without enough such candidates are dropped. The mined sets are saved under
    ``<output_dir>/hard_negatives`` and reused by a resumed run.
    """
    from datasets import Dataset, DatasetDict, load_from_disk
    from sentence_transformers.util import mine_hard_negatives

    settings = dict(recipe.hard_negatives)
    wanted = settings.pop("datasets", None)
    named = dict(train_dataset) if isinstance(train_dataset, DatasetDict) else {recipe.datasets[0].key: train_dataset}
    root = Path(recipe.output_dir) / "hard_negatives"
    out = {}
    for key, dataset in named.items():
        pairs = dataset.column_names[:2] == ["anchor", "positive"] and len(dataset.column_names) == 2
        if (wanted is not None and key not in wanted) or (wanted is None and not pairs):
            out[key] = dataset
            continue
        if not pairs:
            raise RecipeError(f"hard_negatives: dataset {key!r} has columns {dataset.column_names}, not (anchor, positive)")
        folder = root / key
        stamp = json.dumps({"rows": len(dataset), **settings}, sort_keys=True)
        if (folder / "settings.json").is_file() and (folder / "settings.json").read_text() == stamp:
            out[key] = load_from_disk(str(folder / "data"))
            logger.info("hard negatives for %s: reused %s (%d rows)", key, folder, len(out[key]))
            continue
        mined = mine_hard_negatives(
            dataset, teacher.model, anchor_column_name="anchor", positive_column_name="positive",
            range_min=settings["range_min"], range_max=settings["range_max"],
            relative_margin=settings["relative_margin"], num_negatives=settings["num_negatives"],
            sampling_strategy="top", output_format="n-tuple", batch_size=settings["batch_size"], verbose=False,
        )  # fmt: skip
        logger.info("hard negatives for %s: %d of %d rows kept", key, len(mined), len(dataset))
        folder.mkdir(parents=True, exist_ok=True)
        mined.save_to_disk(str(folder / "data"))
        (folder / "settings.json").write_text(stamp)
        out[key] = mined
    if isinstance(train_dataset, Dataset) and not isinstance(train_dataset, DatasetDict):
        return next(iter(out.values()))
    return DatasetDict(out)


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
    student = load_student(recipe, _calibration_sentences(train_dataset), train_dataset)
    teacher = load_teacher(recipe, student)
    if recipe.hard_negatives:
        train_dataset = mine_negatives(recipe, train_dataset, teacher)
    train_dataset = _precompute_scores(recipe, train_dataset, teacher)
    loss = build_loss(recipe, student, teacher)
    args = training_arguments(recipe)
    if args.bf16 and student.device.type == "cpu":
        from st_bitnet.introspection import transformer_modules

        from .mixed_precision import autocast_forward

        # the backbone modules, not the SentenceTransformer: the trainer (accelerate) re-wraps the model's own forward
        for module in transformer_modules(student) + (transformer_modules(teacher.model) if teacher else []):
            autocast_forward(module)
    if recipe.warm_start is not None and warm_start:
        set_seed(recipe.seed)
        run_warm_start(recipe, student, teacher, train_dataset, bool(args.bf16))
    callbacks = [LossLogCallback(Path(recipe.output_dir) / LOSS_LOG), *(extra_callbacks or [])]
    if recipe.training.get("time_budget_minutes") is not None:
        callbacks.append(TimeBudgetCallback(recipe.training["time_budget_minutes"]))
    decay_over_budget = recipe.training.get("decay_over_time_budget", False)
    trainer = BudgetedTrainer(
        budget_minutes=recipe.training["time_budget_minutes"] if decay_over_budget else None,
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


def evaluate_precisions(model, names: list[str], batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Spearman x 100 of cosine similarity on the named dev sets, of the float output and at every precision the
    model's ``MultiPrecisionQuantizer`` serves (its stored ranges; each text is encoded once), ``{}`` without one.

    The cosine of the dequantized codes equals the code-space score (integer dot / popcount), so this is what a
    ``b``-bit index would rank with.
    """
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from st_bitnet import data
    from st_bitnet.multi_precision import find_quantizer

    quantizer = find_quantizer(model)
    if quantizer is None or not names:
        return {}
    scores = {}
    for name in names:
        rows = data.load_sts(name, "dev")
        texts = sorted({r["sentence1"] for r in rows} | {r["sentence2"] for r in rows})
        index = {t: i for i, t in enumerate(texts)}
        left = [index[r["sentence1"]] for r in rows]
        right = [index[r["sentence2"]] for r in rows]
        gold = np.array([r["score"] for r in rows])

        def spearman(embeddings: torch.Tensor) -> float:
            cosine = torch.nn.functional.cosine_similarity(embeddings[left], embeddings[right], dim=-1)
            return round(100 * float(spearmanr(cosine.cpu().numpy(), gold).statistic), 2)

        floats = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
        per_bits = {"float": spearman(floats.double())}
        with torch.no_grad():
            for bits in quantizer.precisions:
                per_bits[f"{bits}bit"] = spearman(quantizer.fake_quantize(floats.to(quantizer.offset.device), bits).double())
        scores[f"{name}-dev"] = per_bits
    return scores


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
        if recipe.model.get("lora"):
            merge_lora(model)
        model.save(str(final_dir))
        if recipe.evaluation:
            by_precision = evaluate_precisions(model, recipe.evaluation)  # one encoding for every precision
            if by_precision:
                results["dev"] = {f"{name}_spearman_cosine": v["float"] for name, v in by_precision.items()}
                results["dev_by_precision"] = by_precision
            else:
                results["dev"] = evaluate(model, recipe.evaluation)
        if recipe.model.get("pack") and recipe.model.get("convert", True):
            import st_bitnet

            st_bitnet.pack(model)
            save = getattr(st_bitnet, "save_pretrained", None)
            if save is None:
                from st_bitnet.sentence_transformer import save_pretrained as save
            save(model, Path(recipe.output_dir) / "packed", recipe=recipe)  # the card records the recipe
        with open(Path(recipe.output_dir) / "results.json", "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results
