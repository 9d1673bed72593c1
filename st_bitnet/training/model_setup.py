"""Model setup of a recipe: the student (loaded, BitNet-converted, LoRA, frozen in part, output quantizer) and the
frozen teacher; LoRA adapters merged back before saving.

Order in :func:`~st_bitnet.training.runner.build_trainer`: :func:`load_student` (with :func:`calibration_sentences`
of the training data), then :func:`load_teacher`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .errors import RecipeError
from .recipe import Recipe

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}



def set_dropout(model, p: float) -> int:
    """Every dropout of ``model`` set to ``p``: ``nn.Dropout`` modules and the attention-probability dropout that
    transformers' attention modules pass to SDPA as a float (``attention_dropout``, ``dropout_prob``).

    Returns the number of places changed (0 means the model has no dropout this function knows).
    """
    import torch

    p = float(p)  # the attention modules hold a float; an int would hide them from the next call
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            changed += 1
        for name in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
                changed += 1
    return changed


def resolve_model_path(path: str) -> str:
    """``pkg:<package>`` -> ``<package>.get_model_path()`` (offline weight packages); anything else unchanged."""
    if path.startswith("pkg:"):
        module = importlib.import_module(path[4:])
        return str(module.get_model_path())
    return path


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



def calibration_sentences(dataset, limit: int = 256) -> list[str]:
    """Texts of the first column of the training data (datasets.Dataset or a DatasetDict of them)."""
    from datasets import DatasetDict

    first = dataset[next(iter(dataset))] if isinstance(dataset, DatasetDict) else dataset
    column = first.column_names[0]
    return [t for t in first.select(range(min(limit, len(first))))[column] if isinstance(t, str) and t.strip()]



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
    from st_bitnet import introspection

    if not freeze:
        return count_parameters(model)
    backbones = introspection.backbones(model)
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
            try:
                layers = introspection.transformer_layers(backbone)
            except LookupError as error:
                raise RecipeError(
                    f"model.freeze.trainable_layers: {error}; freeze only the embeddings, or train every layer"
                ) from None
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
    if spec.convert:
        import st_bitnet

        conversion = st_bitnet.BitNetConversionConfig(**(spec.conversion or {}))
        st_bitnet.convert(model, conversion)
        if conversion.norm != "none" and spec.calibrate_norms > 0 and calibration_sentences:
            from st_bitnet.calibration import calibrate_norms

            calibrate_norms(model, calibration_sentences[: spec.calibrate_norms])
    elif spec.conversion:
        raise RecipeError("model.conversion is set but model.convert is false")
    if spec.lora:
        if spec.convert:
            raise RecipeError("LoRA is for fine-tuning the full-precision teacher: set model.convert: false")
        add_lora(model, spec.lora)
    if spec.dropout is not None:
        changed = set_dropout(model, spec.dropout)
        logger.info("model.dropout %s set in %d places", spec.dropout, changed)
    freeze = spec.freeze
    if freeze:
        trainable, total = apply_freeze(model, freeze)
        logger.info("model.freeze %s: %d of %d parameters stay trainable (%.1f%%)", freeze, trainable, total,
                    100 * trainable / max(total, 1))  # fmt: skip
    multi_precision = spec.multi_precision
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

    from st_bitnet.introspection import backbones as transformers_models

    config = LoraConfig(**{"task_type": "FEATURE_EXTRACTION", **lora_spec})
    backbones = transformers_models(model)
    if not backbones:
        raise RecipeError("model.lora: found no transformers backbone in the model to put adapters on")
    for backbone in backbones:
        inject_adapter_in_model(config, backbone)


def merge_lora(model) -> None:
    """Fold trained LoRA adapters into the base weights, in place, so the result saves as a plain model
    (a standalone teacher: no adapter files, no base-model path to resolve, no adapter overhead)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from st_bitnet.introspection import backbones as transformers_models

    for inner in transformers_models(model):
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

    dtype = recipe.teacher.dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise RecipeError(f"teacher.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, DTYPES[dtype])
    device = recipe.teacher.device
    if device is None:
        device = str(student.device)
    model = load_embedder(recipe.teacher, "teacher", device=device)
    return FrozenTeacher(model, device=device, dtype=dtype, student=student)

