"""Padded tokens per epoch of the MiniLM recipe's training data: random batches against length-grouped ones.

    ST_BITNET_DATA=../shared/data python experiments/minilm_cpu_budget/padding.py [--recipe recipes/minilm_bitembed.yaml]

A transformer step costs about its padded tokens; this counts them (the student's tokenizer, truncated at the
recipe's max_seq_length) for batches drawn at random and for st_bitnet's LengthGroupedBatchSampler, per dataset,
over one epoch (hard-negative columns not included: they are mined at run time). Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def padded_tokens(lengths: dict[str, torch.Tensor], batches: list[list[int]]) -> int:
    return sum(int(lengths[c][b].max()) * len(b) for b in batches for c in lengths)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "minilm_bitembed.yaml"))
    args = parser.parse_args(argv)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import RandomSampler
    from transformers import AutoTokenizer

    from st_bitnet.training.datasets import load_training_datasets
    from st_bitnet.training.model_setup import resolve_model_path
    from st_bitnet.training.recipe import load_recipe
    from st_bitnet.training.samplers import LengthGroupedBatchSampler

    recipe = load_recipe(args.recipe)
    batch, max_len = recipe.training.arguments.get("per_device_train_batch_size", 32), recipe.model.max_seq_length
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(recipe.model.path))
    data = load_training_datasets(recipe.datasets, seed=recipe.seed)
    print("| dataset | rows | real tokens | padded, random batches | padded, length-grouped | ratio |\n|---|---:|---:|---:|---:|---:|")
    totals = [0, 0, 0]
    for key, dataset in data.items():
        lengths = {c: torch.tensor([min(len(ids), max_len) for ids in tokenizer(list(dataset[c]))["input_ids"]])
                   for c in dataset.column_names}  # fmt: skip
        generator = torch.Generator().manual_seed(recipe.seed)
        random_batches = list(DefaultBatchSampler(RandomSampler(range(len(dataset)), generator=generator), batch, True))
        grouped = list(LengthGroupedBatchSampler(dataset, batch, True, seed=recipe.seed, tokenizer=tokenizer,
                                                 max_length=max_len))
        real = sum(int(lengths[c][b].sum()) for b in random_batches for c in lengths)
        row = [real, padded_tokens(lengths, random_batches), padded_tokens(lengths, grouped)]
        totals = [t + r for t, r in zip(totals, row)]
        print(f"| {key} | {len(dataset)} | {row[0]:,} | {row[1]:,} | {row[2]:,} | {row[1] / row[2]:.2f} |")
    print(f"| all | | {totals[0]:,} | {totals[1]:,} | {totals[2]:,} | {totals[1] / totals[2]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
