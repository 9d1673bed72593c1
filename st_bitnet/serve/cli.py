"""``st-bitnet serve MODEL``: run the OpenAI-compatible embeddings server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .limits import ServeLimits

_DEFAULTS = ServeLimits()


def _serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"st-bitnet serve needs FastAPI and uvicorn: pip install \"st_bitnet[serve]\" ({err})"
        ) from err
    from st_bitnet.sentence_transformer import load

    from .calibration import read_calibration_texts

    limits = ServeLimits(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars, max_body_bytes=args.max_body_bytes,
        max_queued_texts=args.max_queued_texts,
    )
    texts = read_calibration_texts(args.calibration_texts) if args.calibration_texts else None
    model = load(args.model, device=args.device, **({"trust_remote_code": True} if args.trust_remote_code else {}))
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    app = create_app(model, model_name=name, limits=limits, calibration_texts=texts)
    codec = app.state.codec
    print(f"[st-bitnet] serving {name!r} (dim {codec.dim}, {codec.quantizer_source} quantizer, precisions "
          f"{', '.join(codec.precisions)}) on http://{args.host}:{args.port}/v1/embeddings", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def add_subparser(subparsers) -> None:
    """Register ``serve`` on an ``argparse`` subparsers object (FastAPI is imported only when it runs)."""
    p = subparsers.add_parser(
        "serve", help="serve MODEL behind an OpenAI-compatible POST /v1/embeddings (needs st_bitnet[serve])",
    )
    p.add_argument("model",
                   help="saved folder or Hub id (st_bitnet, Microsoft bitnet-embedding, any SentenceTransformer)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` value clients send and responses carry (default: MODEL's last path part)")
    p.add_argument("--device", default=None, help="torch device (default: sentence-transformers' choice)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="needed for models saved with st_bitnet modules such as a MultiPrecisionQuantizer")
    p.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size,
                   help="most texts per model.encode call; concurrent requests are gathered up to this "
                        "(default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms,
                   help="how long a request waits for others to share its batch (default: %(default)s)")
    p.add_argument("--max-inputs", type=int, default=_DEFAULTS.max_inputs,
                   help="most texts per request (default: %(default)s)")
    p.add_argument("--max-input-chars", type=int, default=_DEFAULTS.max_input_chars,
                   help="most characters per text (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes,
                   help="largest request body in bytes (default: %(default)s)")
    p.add_argument("--max-queued-texts", type=int, default=_DEFAULTS.max_queued_texts,
                   help="texts allowed to wait for the model before requests get 503 (default: %(default)s)")
    p.add_argument("--calibration-texts", default=None,
                   help="UTF-8 file, one text per line, to calibrate the post-hoc int8/uint8 and *bit ranges on, "
                        "once at startup (default: a built-in list; a model's trained quantizer keeps its own "
                        "*bit ranges)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    p.set_defaults(func=_serve_command)
