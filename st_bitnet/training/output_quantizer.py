"""``model.multi_precision``: give the student a calibrated ``MultiPrecisionQuantizer`` before training.

The runner calls :func:`attach_output_quantizer` after loading (and converting) the student and before building
the losses, so ``MultiPrecisionLoss`` finds the quantizer and the trainer's optimizer sees its ranges.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .errors import RecipeError
from .prompts import prompt_for
from .recipe_specs import MultiPrecisionSpec

logger = logging.getLogger(__name__)


def calibration_texts(train_dataset, n: int, prompts: Any = None) -> list[str]:
    """Up to ``n`` distinct training texts spread evenly over every dataset and every text column (queries and
    documents are distributed differently; the ranges must fit both), with the recipe's prompts applied as the
    trainer will apply them. Deterministic: the first rows of each column.
    """
    from datasets import DatasetDict

    named = list(train_dataset.items()) if isinstance(train_dataset, (DatasetDict, dict)) else [(None, train_dataset)]
    sources = [
        (name, dataset, column)
        for name, dataset in named
        for column in dataset.column_names
        if getattr(dataset.features.get(column), "dtype", None) == "string"
    ]
    if not sources:
        raise RecipeError("model.multi_precision: the training data has no text column to calibrate the quantizer on")
    quota = math.ceil(n / len(sources))
    texts, seen = [], set()
    for name, dataset, column in sources:
        prompt = prompt_for(prompts, name, column)
        for text in dataset.select(range(min(quota, len(dataset))))[column]:
            if isinstance(text, str) and text.strip() and text not in seen:
                seen.add(text)
                texts.append(prompt + text)
    return texts[:n]


def replace_pooling(model, pooling: dict[str, Any]) -> None:
    """Swap the model's ``Pooling`` (and a ``Normalize`` right after it) for a ``QuantizationAwarePooling``.

    The default ``rms`` normalization only rescales each vector at first, so a pretrained model's cosines are
    unchanged; every text then has the same scale, which lets one set of quantizer ranges fit all texts.
    """
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    from st_bitnet.multi_precision import QuantizationAwarePooling

    items = list(model._modules.items())
    positions = [i for i, (_, module) in enumerate(items) if isinstance(module, Pooling)]
    if not positions:
        raise RecipeError("model.multi_precision.pooling: the model has no Pooling module to replace (use pooling: keep)")
    index = positions[0]
    name, old = items[index]
    if isinstance(old, QuantizationAwarePooling):
        logger.info("the model already has a QuantizationAwarePooling; keeping it")
        return
    after = items[index + 1 :]
    others = [type(module).__name__ for _, module in after if not isinstance(module, Normalize)]
    if others:
        raise RecipeError(
            f"model.multi_precision.pooling replaces the model's Pooling (+ Normalize), but {others} follow it: "
            "use pooling: keep"
        )
    new = QuantizationAwarePooling(
        old.embedding_dimension,
        pooling_mode=pooling.get("mode") or old.pooling_mode,
        include_prompt=old.include_prompt if pooling.get("include_prompt") is None else pooling["include_prompt"],
        normalization=pooling.get("normalization", "rms"),
    )
    model._modules[name] = new.to(model.device)
    for removed, _ in after:  # the Normalize: the quantizer's ranges are per dimension of the normalized pooling
        del model._modules[removed]
        if isinstance(getattr(model, "module_kwargs", None), dict):
            model.module_kwargs.pop(removed, None)


def attach_output_quantizer(model, spec: MultiPrecisionSpec, texts: list[str], batch_size: int = 64):
    """Append a ``MultiPrecisionQuantizer`` calibrated on ``texts`` (after the optional pooling swap) and return it.

    A model that already ends with a quantizer (a saved multi-precision model trained further) keeps it and its
    trained ranges; it must serve ``spec.precisions``.
    """
    from st_bitnet.multi_precision import MultiPrecisionQuantizer, find_quantizer

    existing = find_quantizer(model)
    if existing is not None:
        unserved = [b for b in spec.precisions if b not in existing.precisions]
        if unserved:
            raise RecipeError(
                f"the model's MultiPrecisionQuantizer serves {existing.precisions} bits, not {unserved} "
                "(model.multi_precision.precisions)"
            )
        logger.info("the model already has a MultiPrecisionQuantizer; training its saved ranges further")
        return existing
    if spec.pooling is not None:
        replace_pooling(model, spec.pooling)
    if len(texts) < 2:
        raise RecipeError(f"model.multi_precision: only {len(texts)} calibration text(s) found in the training data")
    if len(texts) < spec.calibration_rows:
        logger.warning("calibrating the quantizer on %d texts (calibration_rows=%d)", len(texts), spec.calibration_rows)
    was_training = model.training
    embeddings = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    model.train(was_training)
    quantizer = MultiPrecisionQuantizer.from_embeddings(
        embeddings,
        precisions=spec.precisions,
        binary_threshold=spec.binary_threshold,
        rotation=spec.rotation,
        method=spec.calibration,
        std_multiplier=spec.std_multiplier,
    )
    model.append(quantizer.to(model.device))
    return quantizer
