"""``st-bitnet eval`` and ``st-bitnet export-gguf`` subcommands (argparse).

The main CLI (``st_bitnet/cli.py``) calls :func:`add_subparser` with its subparsers object. Heavy imports
(mteb, matplotlib, gguf) happen only when a subcommand runs.
"""

from __future__ import annotations

import argparse


def _run_eval(args: argparse.Namespace) -> int:
    from .report import format_table
    from .run import run_evaluation

    result = run_evaluation(
        args.model,
        args.output,
        teacher=args.teacher,
        tasks=args.tasks,
        bits=args.bits,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        source=args.source,
        device=args.device,
        model_name=args.name,
        teacher_name=args.teacher_name,
        plots=not args.no_plots,
    )
    print(format_table(result))
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")
    return 0


def _run_export_gguf(args: argparse.Namespace) -> int:
    from st_bitnet.export import export_gguf

    path = export_gguf(args.model, args.output, name=args.name)
    print(f"wrote {path}")
    return 0


def add_subparser(subparsers) -> None:
    """Register ``eval`` and ``export-gguf`` on an ``argparse`` subparsers object (``set_defaults(func=...)``)."""
    from ..data import DEFAULT_DATA_DIR
    from .tasks import DEV_TASK_NAMES

    evaluate = subparsers.add_parser(
        "eval",
        help="Evaluate a model at each output precision (mteb tasks; local dev protocol offline).",
        description=(
            "Evaluate MODEL (folder or Hub id) on mteb tasks at each output precision and write results.json, "
            "results.md, tradeoff.png and sensitivity.png. Offline, the dev protocol reads $ST_BITNET_DATA "
            f"(default {DEFAULT_DATA_DIR}): {', '.join(DEV_TASK_NAMES)}."
        ),
    )
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument("--teacher", default=None, help="teacher folder or Hub id, evaluated side by side")
    evaluate.add_argument("--tasks", nargs="+", default=None, help="mteb task names or aliases (default: dev protocol)")
    evaluate.add_argument("--bits", nargs="+", type=int, default=None, help="output precisions (default: 16 8 4 2 1)")
    evaluate.add_argument("--output", default="eval_results", help="output folder (default: eval_results)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-samples", type=int, default=None, help="cap per task for quick runs / CI")
    evaluate.add_argument("--source", choices=("auto", "local", "hub"), default="auto",
                          help="task data: local files, the Hub by name, or local when available (default)")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--name", default=None, help="model name shown in table and plots")
    evaluate.add_argument("--teacher-name", default=None, help="teacher name shown in table and plots")
    evaluate.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    evaluate.set_defaults(func=_run_eval)

    export = subparsers.add_parser(
        "export-gguf",
        help="Export a packed BitNet embedder to an I2_S GGUF for bitnet.cpp's llama-embedding.",
    )
    export.add_argument("model", help="st_bitnet model folder (or Hub id)")
    export.add_argument("output", help="output .gguf path")
    export.add_argument("--name", default=None, help="general.name metadata (default: folder name)")
    export.set_defaults(func=_run_export_gguf)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m st_bitnet.evaluation.cli eval ...``) until the main CLI wires us in."""
    parser = argparse.ArgumentParser(prog="st-bitnet")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
