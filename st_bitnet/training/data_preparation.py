"""Training data the teacher adds to: mined hard negatives (``hard_negatives``) and precomputed teacher scores
or embeddings (``precompute_teacher_scores`` / ``precompute_teacher_embeddings`` on a loss component), after the
models are loaded and before the loss is built."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import RecipeError
from .prompts import column_prompts
from .recipe import Recipe
from .recipe_specs import HardNegativesSpec

logger = logging.getLogger(__name__)


def mined_data_stamp(spec: HardNegativesSpec, rows: int, prompts: dict[str, str] | None = None,
                     bf16: bool = False) -> str:
    """The ``settings.json`` text of one mined dataset: a cache is reused only when the stamp matches exactly."""
    extra = {**({"prompts": prompts} if prompts else {}), **({"bf16": True} if bf16 else {})}
    return json.dumps({"rows": rows, **spec.mining_settings(), **extra}, sort_keys=True)


def mine_negatives(recipe: Recipe, train_dataset, teacher, cpu_bf16_autocast: bool = False):
    """Add teacher-mined hard negatives (``recipe.hard_negatives``) to the (anchor, positive) datasets.

    sentence-transformers' ``mine_hard_negatives`` ranks each dataset's own positives by the teacher's similarity to
    the anchor and keeps, per row, ``num_negatives`` candidates ranked between ``range_min`` and ``range_max`` whose
    score is below ``(1 - relative_margin)`` x the positive's (skipping the very top ranks, where unlabelled true
    positives sit). The recipe's prompts of the anchor and positive columns are the teacher's query and corpus
    prompts. Rows without enough such candidates are dropped. The mined sets are saved under
    ``<output_dir>/hard_negatives`` and reused by a resumed run. ``cpu_bf16_autocast``: the teacher embeds under
    bf16 autocast, as it does for the precomputed labels of a bf16 run (2-3x faster where the CPU multiplies bf16).
    """
    import torch
    from datasets import Dataset, DatasetDict, load_from_disk
    from sentence_transformers.util import mine_hard_negatives

    settings = recipe.hard_negatives
    wanted = settings.datasets
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
        prompts = column_prompts(recipe.prompts, key, ("anchor", "positive"))
        stamp = mined_data_stamp(settings, len(dataset), prompts, cpu_bf16_autocast)
        if (folder / "settings.json").is_file() and (folder / "settings.json").read_text() == stamp:
            out[key] = load_from_disk(str(folder / "data"))
            logger.info("hard negatives for %s: reused %s (%d rows)", key, folder, len(out[key]))
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_autocast):
            mined = mine_hard_negatives(
                dataset, teacher.model, anchor_column_name="anchor", positive_column_name="positive",
                range_min=settings.range_min, range_max=settings.range_max,
                relative_margin=settings.relative_margin, num_negatives=settings.num_negatives,
                query_prompt=prompts.get("anchor"), corpus_prompt=prompts.get("positive"), sampling_strategy="top",
                output_format="n-tuple", batch_size=settings.batch_size, verbose=False,
            )  # fmt: skip
        logger.info("hard negatives for %s: %d of %d rows kept", key, len(mined), len(dataset))
        folder.mkdir(parents=True, exist_ok=True)
        mined.save_to_disk(str(folder / "data"))
        (folder / "settings.json").write_text(stamp)
        # read back, so a fresh and a resumed run hold the same dataset (fingerprint included: the teacher-label
        # cache keys on it)
        out[key] = load_from_disk(str(folder / "data"))
    if isinstance(train_dataset, Dataset) and not isinstance(train_dataset, DatasetDict):
        return next(iter(out.values()))
    return DatasetDict(out)


def precompute_scores(recipe: Recipe, datasets, teacher, student=None, cpu_bf16_autocast: bool = False):
    """The teacher's scores (``precompute_teacher_scores``) or embeddings (``precompute_teacher_embeddings``, at the
    student's ``max_seq_length``, under bf16 autocast when the training runs so on the CPU) written into every
    training set's ``label`` column, once before training. Each labelled set is saved under
    ``<output_dir>/teacher_labels`` with a settings stamp and reused by a resumed run. The recipe's prompts are
    prepended as the trainer prepends them, so the labels are what a live teacher would give."""
    from datasets import Dataset, DatasetDict, load_from_disk

    components = recipe.loss.values()
    length = getattr(student, "max_seq_length", None)
    if any(c.precompute_teacher_embeddings for c in components):
        from st_bitnet.teacher import precompute_teacher_embeddings

        kind = "embeddings"
        logger.info("embedding the training texts with the teacher once (max_seq_length %s)", length)

        def precompute(dataset, prompts):
            return precompute_teacher_embeddings(dataset, teacher, max_seq_length=length,
                                                 cpu_bf16_autocast=cpu_bf16_autocast, prompts=prompts)
    elif any(c.precompute_teacher_scores for c in components):
        from st_bitnet.teacher import precompute_teacher_scores

        kind = "scores"

        def precompute(dataset, prompts):
            return precompute_teacher_scores(dataset, teacher, prompts=prompts)
    else:
        return datasets
    named = dict(datasets) if isinstance(datasets, DatasetDict) else {recipe.datasets[0].key: datasets}
    out = {}
    for key, dataset in named.items():
        folder = Path(recipe.output_dir) / "teacher_labels" / key
        prompts = column_prompts(recipe.prompts, key, [c for c in dataset.column_names if c != "label"])
        stamp = json.dumps({"kind": kind, "teacher": recipe.teacher.path if recipe.teacher else None,
                            "max_seq_length": length if kind == "embeddings" else None,
                            "bf16": cpu_bf16_autocast if kind == "embeddings" else None,
                            "rows": len(dataset), "data": getattr(dataset, "_fingerprint", None),
                            **({"prompts": prompts} if prompts else {})},
                           sort_keys=True)  # fmt: skip
        cacheable = getattr(dataset, "_fingerprint", None) is not None  # the content hash of datasets' own cache
        if cacheable and (folder / "settings.json").is_file() and (folder / "settings.json").read_text() == stamp:
            out[key] = load_from_disk(str(folder / "data"))
            logger.info("teacher %s for %s: reused %s", kind, key, folder)
            continue
        out[key] = precompute(dataset, prompts)
        if cacheable:
            folder.mkdir(parents=True, exist_ok=True)
            out[key].save_to_disk(str(folder / "data"))
            (folder / "settings.json").write_text(stamp)
    if isinstance(datasets, Dataset) and not isinstance(datasets, DatasetDict):
        return next(iter(out.values()))
    return DatasetDict(out)
