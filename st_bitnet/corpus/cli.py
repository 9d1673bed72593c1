"""``st-bitnet encode-corpus``: the command-line face of :func:`st_bitnet.corpus.encode_corpus`."""

from __future__ import annotations

import argparse
import json


def _encode_corpus_command(args: argparse.Namespace) -> int:
    from .encode_corpus import encode_corpus

    if args.engine == "ray":
        import ray

        if not ray.is_initialized():
            # "auto" joins the cluster this node belongs to; without one, a local instance of --workers CPUs.
            if args.ray_address:
                ray.init(address=args.ray_address)
            else:
                ray.init(num_cpus=args.workers * args.ray_num_cpus)
    load_kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    if args.device:
        load_kwargs["device"] = args.device
    encode_kwargs = {"prompt_name": args.prompt_name} if args.prompt_name else {}
    manifest = encode_corpus(
        args.model, args.source, args.output_dir, precisions=args.precisions, shard_size=args.shard_size,
        batch_size=args.batch_size, engine=args.engine, workers=args.workers, calibration_size=args.calibration_size,
        index=args.index, id_field=args.id_field, text_field=args.text_field, source_format=args.format,
        encode_kwargs=encode_kwargs, load_kwargs=load_kwargs, ray_num_cpus=args.ray_num_cpus,
        ray_num_gpus=args.ray_num_gpus, show_progress=not args.no_progress,
    )
    summary = {key: manifest[key] for key in ("count", "dim", "precisions", "num_shards", "calibration", "last_run")}
    print(json.dumps(summary, indent=2))
    return 0


def add_subparser(subparsers) -> None:
    """Register ``encode-corpus`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "encode-corpus",
        help="encode a corpus (JSONL / Parquet / BEIR folder) to resumable Parquet shards of packed codes",
        description="Encode a corpus to Parquet shards of packed codes plus manifest.json; rerun to resume.",
    )
    p.add_argument("model", help="model folder or Hub id (st_bitnet.load)")
    p.add_argument("source", help=".jsonl / .parquet file or BEIR folder (corpus.jsonl)")
    p.add_argument("output_dir", help="output folder (new, empty, or a run to resume)")
    p.add_argument("--precisions", nargs="+", default=["8bit", "1bit"], help="16bit / 8bit / 4bit / 2bit / 1bit")
    p.add_argument("--format", default=None, choices=["jsonl", "parquet", "beir"], help="default: from the path")
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", default="text")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine", default="single", choices=["single", "multiprocess", "ray"])
    p.add_argument("--workers", type=int, default=2, help="pool processes / Ray actors")
    p.add_argument("--ray-address", default=None, help="e.g. 'auto' to join a running Ray cluster")
    p.add_argument("--ray-num-cpus", type=float, default=1, help="CPUs per Ray actor")
    p.add_argument("--ray-num-gpus", type=float, default=0, help="GPUs per Ray actor")
    p.add_argument("--calibration-size", type=int, default=2048, help="rows for post-hoc quantizer ranges")
    p.add_argument("--index", action="store_true", help="also save a MultiPrecisionIndex (needs 1bit + a wider one)")
    p.add_argument("--prompt-name", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_encode_corpus_command)
