"""``st-bitnet`` subcommands of the multi-precision outputs: ``mp-encode`` and ``storage-report``.

The main ``st_bitnet/cli.py`` registers them with ``add_subparser(subparsers)``.
"""

from __future__ import annotations

import argparse
import json


def _encode_command(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from .encode import encode
    from .precision import is_st_precision, resolve_bits

    if is_st_precision(args.precision):
        raise ValueError(
            f"mp-encode writes multi-precision codes; --precision {args.precision} is a sentence-transformers name "
            "(a numpy array, not codes). Use 1bit (sign bits, like binary / ubinary), 2bit, 4bit, 8bit or 16bit."
        )
    resolve_bits(args.precision)  # unknown names fail before the model loads
    with open(args.input, encoding="utf-8") as handle:
        texts = [line.rstrip("\n") for line in handle if line.strip()]
    model = SentenceTransformer(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    codes = encode(model, texts, precision=args.precision, batch_size=args.batch_size)
    codes.save(args.output)
    print(json.dumps({"vectors": len(codes), "precision": codes.precision, "bytes": codes.nbytes, "output": args.output}))
    return 0


def _storage_command(args: argparse.Namespace) -> int:
    from .storage import format_storage_report, storage_report

    rows = storage_report(args.dim, args.n, rescore_bits=args.rescore_bits)
    print(json.dumps(rows, indent=2) if args.json else format_storage_report(rows))
    return 0


def add_subparser(subparsers) -> None:
    """Register ``mp-encode`` and ``storage-report`` on an ``argparse`` subparsers object."""
    encode_parser = subparsers.add_parser(
        "mp-encode", help="encode a text file (one text per line) to packed multi-precision codes (.safetensors)"
    )
    encode_parser.add_argument("model", help="SentenceTransformer folder or Hub id (with a MultiPrecisionQuantizer)")
    encode_parser.add_argument("input", help="UTF-8 text file, one text per line")
    encode_parser.add_argument("output", help="output .safetensors file (QuantizedEmbeddings)")
    encode_parser.add_argument("--precision", default="1bit", help="16bit / 8bit / 4bit / 2bit / 1bit")
    encode_parser.add_argument("--batch-size", type=int, default=32)
    encode_parser.add_argument("--device", default=None)
    encode_parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="needed to load st_bitnet's module classes (sentence-transformers' rule for non-core modules)",
    )
    encode_parser.set_defaults(func=_encode_command)

    storage_parser = subparsers.add_parser("storage-report", help="bytes per vector and index size per precision")
    storage_parser.add_argument("--dim", type=int, required=True)
    storage_parser.add_argument("--n", type=int, default=1_000_000, help="number of vectors")
    storage_parser.add_argument("--rescore-bits", type=int, default=8)
    storage_parser.add_argument("--json", action="store_true")
    storage_parser.set_defaults(func=_storage_command)
