"""``st-bitnet train RECIPE.yaml`` / ``python -m st_bitnet.training RECIPE.yaml``."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", help="the recipe YAML file (see recipes/README.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set training.max_steps=10 --set model.path=/models/x (repeatable)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from a checkpoint folder, or from the latest checkpoint in output_dir if no folder is given",
    )
    parser.add_argument("--check", action="store_true", help="only validate the recipe and load its datasets, then exit")
    parser.set_defaults(func=run_from_args)
    return parser


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand on an ``argparse`` subparsers object."""
    return _configure(subparsers.add_parser("train", help="train a BitNet embedder (or its teacher) from a YAML recipe"))


def run_from_args(args: argparse.Namespace) -> int:
    from .datasets import load_training_datasets
    from .recipe import load_recipe
    from .runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("st_bitnet")
    if not package_logger.handlers:  # the run's choices (bf16, warm start, mined negatives) go to stderr
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
    if args.check:
        datasets = load_training_datasets(recipe.datasets, seed=recipe.seed)
        sizes = {k: len(v) for k, v in datasets.items()} if hasattr(datasets, "keys") else {recipe.datasets[0].key: len(datasets)}
        print(json.dumps({"recipe": recipe.name, "datasets": sizes, "loss": list(recipe.loss)}, indent=2))
        return 0
    results = run_recipe(recipe, resume_from_checkpoint=args.resume)
    print(json.dumps(results, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m st_bitnet.training", description=__doc__))
    args = parser.parse_args(argv)
    from .errors import RecipeError
    from .checkpoints import ResumeError
    from .datasets import DatasetConfigError
    from st_bitnet.teacher import TokenizerMismatchError

    try:
        return args.func(args)
    except (RecipeError, DatasetConfigError, TokenizerMismatchError, ResumeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
