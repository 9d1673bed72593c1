"""Teacher / naive / trained on real dev data: all-MiniLM-L6-v2 converted to BitNet, trained with a recipe.

    python experiments/minilm_recipe_quality/run_minilm_quality.py                                  # stage-2 recipe, 150 steps
    python experiments/minilm_recipe_quality/run_minilm_quality.py --max-steps 300 --recipe recipes/stage2_distill_minilm.yaml

Scores Spearman x 100 (cosine) on the STS-B and SICK dev splits (never trained on) for
  teacher: the full-precision model;  naive: converted to ternary weights / int8 activations, no training;
  trained: converted, then trained by the recipe on train splits of $ST_BITNET_DATA;
and reports the share of the naive-conversion gap the recipe wins back. Writes <output>/quality.json.
"""

from __future__ import annotations

import argparse
import os
import copy
import json
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer

import st_bitnet
from st_bitnet.training.recipe import load_recipe
from st_bitnet.training.dev_evaluation import evaluate
from st_bitnet.training.model_setup import resolve_model_path
from st_bitnet.training.runner import run_recipe

# The offline data next to this checkout, unless $ST_BITNET_DATA says otherwise.
os.environ.setdefault("ST_BITNET_DATA", str(Path(__file__).resolve().parents[2].parent / "shared" / "data"))

EVAL_SETS = ["stsb", "sick"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[2] / "recipes" / "stage2_distill_minilm.yaml"))
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--output", default="runs/minilm_quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    overrides = [f"training.max_steps={args.max_steps}", f"output_dir={args.output}", "model.pack=false",
                 "training.save_steps=100000", f"evaluation={json.dumps(EVAL_SETS)}", *args.overrides]  # fmt: skip
    recipe = load_recipe(args.recipe, overrides)
    report = {"recipe": args.recipe, "overrides": overrides, "metric": "Spearman x 100, cosine, dev splits"}

    # The baselines depend only on the model, the conversion and the sequence length: computed once per output
    # folder and reused, since scoring two models on the dev sets costs minutes on a small CPU.
    baseline_key = {"model": recipe.model["path"], "conversion": recipe.model.get("conversion"),
                    "max_seq_length": recipe.model.get("max_seq_length"), "sets": EVAL_SETS}  # fmt: skip
    baseline_file = Path(args.output) / "baselines.json"
    cached = json.loads(baseline_file.read_text()) if baseline_file.exists() else {}
    if cached.get("key") == baseline_key:
        report.update(teacher=cached["teacher"], naive=cached["naive"], eval_seconds=cached["eval_seconds"])
    else:
        start = time.time()
        teacher = SentenceTransformer(resolve_model_path(recipe.model["path"]), device="cpu")
        teacher.max_seq_length = recipe.model.get("max_seq_length") or teacher.max_seq_length
        report["teacher"] = evaluate(teacher, EVAL_SETS)
        print("teacher", report["teacher"], flush=True)
        conversion = st_bitnet.BitNetConversionConfig(**(recipe.model.get("conversion") or {}))
        report["naive"] = evaluate(st_bitnet.convert(copy.deepcopy(teacher), conversion), EVAL_SETS)
        print("naive", report["naive"], flush=True)
        report["eval_seconds"] = round(time.time() - start, 1)
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        baseline_file.write_text(json.dumps({"key": baseline_key, **{k: report[k] for k in ("teacher", "naive", "eval_seconds")}}))

    start = time.time()
    results = run_recipe(recipe)
    report["train_seconds"] = round(time.time() - start, 1)
    report["train"] = results["train"]
    report["trained"] = results["dev"]
    report["gap_recovered"] = {
        key: round((report["trained"][key] - report["naive"][key]) / (report["teacher"][key] - report["naive"][key]), 3)
        for key in report["teacher"]
        if report["teacher"][key] != report["naive"][key]
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with open(Path(args.output) / "quality.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
