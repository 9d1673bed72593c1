"""What a finished run leaves: ``final/`` (the trained model as users run it), the dev scores, ``packed/`` and
``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .recipe import Recipe


def save_outputs(recipe: Recipe, trainer, results: dict[str, Any]) -> dict[str, Any]:
    """Remove the training-only autocast wrappers, merge LoRA, save ``final/``, score the dev sets (every
    precision of an output quantizer), pack to ``packed/`` and write ``results.json`` (main process only)."""
    from st_bitnet.introspection import transformer_modules

    from .dev_evaluation import evaluate, evaluate_precisions
    from .mixed_precision import remove_autocast_forward
    from .model_setup import merge_lora

    for module in transformer_modules(trainer.model):  # evaluate and save the model as users will run it
        remove_autocast_forward(module)
    if not trainer.is_world_process_zero():
        return results
    model = trainer.model
    if recipe.model.lora:
        merge_lora(model)
    model.save(str(Path(recipe.output_dir) / "final"))
    if recipe.evaluation:
        by_precision = evaluate_precisions(model, recipe.evaluation)  # one encoding for every precision
        if by_precision:
            results["dev"] = {f"{name}_spearman_cosine": v["float"] for name, v in by_precision.items()}
            results["dev_by_precision"] = by_precision
        else:
            results["dev"] = evaluate(model, recipe.evaluation)
    if recipe.model.pack and recipe.model.convert:
        import st_bitnet
        from st_bitnet.sentence_transformer import save_pretrained

        st_bitnet.pack(model)
        save_pretrained(model, Path(recipe.output_dir) / "packed", recipe=recipe)  # the card records the recipe
    with open(Path(recipe.output_dir) / "results.json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results
