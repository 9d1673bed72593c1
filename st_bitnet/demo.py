"""``st-bitnet demo``: what st_bitnet gives, in a few minutes on a laptop-class CPU.

Converts the packaged all-MiniLM-L6-v2 into a ternary BitNet embedder, distills it briefly with the project's
recipe (``st_bitnet/demo_minilm.yaml``: block-wise warm start, then hidden-state / embedding / similarity
distillation), and prints teacher / naive conversion / distilled student side by side: STS-B dev Spearman,
SciFact retrieval (nDCG@10 at 16-bit and 1-bit outputs, a 100-query dev subset), encoding speed against the
float32 and bf16 teacher on this CPU, bytes per stored vector and bytes of weights.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

DEMO_RECIPE = Path(__file__).with_name("demo_minilm.yaml")
SCIFACT_QUERIES = 100  # dev subset: these queries, their positives and 10x distractors (the eval harness' subsample)
SPEED_BATCH = (8, 128)  # sequences x tokens per encode call in the speed check


def _stage(name: str):
    print(f"\n[st-bitnet demo] {name}", flush=True)


def _packed_copy(model):
    import copy

    import st_bitnet

    return st_bitnet.pack(copy.deepcopy(model)).eval()


def sts_spearman(model, rows) -> float:
    from scipy.stats import spearmanr

    a = model.encode([r["sentence1"] for r in rows], convert_to_tensor=True, show_progress_bar=False).float()
    b = model.encode([r["sentence2"] for r in rows], convert_to_tensor=True, show_progress_bar=False).float()
    cosine = torch.nn.functional.cosine_similarity(a, b).cpu().numpy()
    return round(100 * float(spearmanr(cosine, [r["score"] for r in rows]).statistic), 2)


def scifact_subset(n_queries: int = SCIFACT_QUERIES):
    """(query ids, query texts, doc ids, doc texts, qrels) of the harness' fixed-seed SciFact dev subsample."""
    from st_bitnet.data import beir_doc_text
    from st_bitnet.evaluation.tasks import _retrieval_split

    split = _retrieval_split(n_queries)
    corpus, queries = split["corpus"], split["queries"]
    docs = [beir_doc_text({"title": t, "text": x}) for t, x in zip(corpus["title"], corpus["text"])]
    return list(queries["id"]), list(queries["text"]), list(corpus["id"]), docs, split["relevant_docs"]


def retrieval_scores(model, subset, bits_list=(16, 1)) -> dict[int, float]:
    """nDCG@10 x 100 of ``model`` on ``subset`` at each output precision (16: float16 round trip, 1: sign bits)."""
    from st_bitnet.evaluation.retrieval import ndcg_at_k
    from st_bitnet.multi_precision import similarity_at_bits
    from st_bitnet.multi_precision.quantizer import MultiPrecisionQuantizer

    qids, qtexts, dids, dtexts, qrels = subset
    q = model.encode(qtexts, convert_to_numpy=True, show_progress_bar=False)
    d = model.encode(dtexts, convert_to_numpy=True, show_progress_bar=False)
    # One calibration for both sides (the corpus'), as an index would store it; 16 and 1 bit need no ranges.
    quantizer = MultiPrecisionQuantizer.from_embeddings(d, precisions=(16, 1), binary_threshold="zero", method="minmax",
                                                        degenerate_fraction=0.0)
    out = {}
    for bits in bits_list:
        with torch.no_grad():
            qb = quantizer.fake_quantize(torch.from_numpy(q), bits).numpy()
            db = quantizer.fake_quantize(torch.from_numpy(d), bits).numpy()
        out[bits] = ndcg_at_k(similarity_at_bits(qb, db, bits), qids, dids, qrels)
    return out


def tokens_per_second(models: dict, repeats: int = 3) -> dict[str, float]:
    """Encoding speed of each model on the same random ``SPEED_BATCH`` of token ids, round-robin, medians."""
    batch, length = SPEED_BATCH
    any_model = next(iter(models.values()))
    vocab = any_model.tokenizer.vocab_size
    ids = torch.randint(1000, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(dict(features))  # warm-up (kernel build / oneDNN selection)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(dict(features))
                times[name].append(time.perf_counter() - start)
    return {name: round(batch * length / statistics.median(t), 0) for name, t in times.items()}


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def run_demo(output: str = "outputs/demo-minilm", steps: int | None = None, quick: bool = False) -> dict:
    """The whole demo; returns (and writes to ``<output>/demo_results.json``) every number it prints."""
    from sentence_transformers import SentenceTransformer

    import st_bitnet
    from st_bitnet import data
    from st_bitnet.machine import cpu_description
    from st_bitnet.multi_precision.precision import bytes_per_vector
    from st_bitnet.training import load_recipe, run_recipe
    from st_bitnet.training.model_setup import resolve_model_path

    started = time.time()
    overrides = [f"output_dir={output}"]
    if steps is not None:
        overrides.append(f"training.max_steps={steps}")
    if quick:  # CI-sized: the whole pipeline in well under a minute of training
        overrides += ["training.max_steps=4", "warm_start.texts=64", "warm_start.steps_per_block=2",
                      "warm_start.held_out_batches=1"]
    recipe = load_recipe(DEMO_RECIPE, overrides)
    teacher_path = resolve_model_path(recipe.teacher.path)

    _stage("1/5 teacher: all-MiniLM-L6-v2 (full precision) and its naive ternary conversion")
    teacher = SentenceTransformer(teacher_path, device="cpu")
    teacher.max_seq_length = recipe.model.max_seq_length
    naive = st_bitnet.convert(SentenceTransformer(teacher_path, device="cpu"),
                              st_bitnet.BitNetConversionConfig(**recipe.model.conversion))
    naive.max_seq_length = teacher.max_seq_length

    _stage(f"2/5 distill the student ({recipe.training.arguments['max_steps']} steps at most, "
           f"{recipe.training.time_budget_minutes} min budget; block-wise warm start first)")
    train_start = time.time()
    run_recipe(recipe)
    train_minutes = (time.time() - train_start) / 60
    student = SentenceTransformer(str(Path(output) / "final"), device="cpu")
    models = {"teacher (fp32)": teacher, "naive ternary": _packed_copy(naive), "distilled ternary": _packed_copy(student)}

    _stage("3/5 STS-B dev (1,500 pairs) and SciFact dev subset (100 queries) at 16-bit and 1-bit outputs")
    sts_rows = data.load_sts("stsb", "dev")[: 200 if quick else None]
    subset = scifact_subset(20 if quick else SCIFACT_QUERIES)
    from tqdm.auto import tqdm

    quality = {}
    for name, model in tqdm(models.items(), desc="evaluating", unit="model"):
        retrieval = retrieval_scores(model, subset)
        quality[name] = {"stsb": sts_spearman(model, sts_rows), "scifact_16bit": retrieval[16],
                         "scifact_1bit": retrieval[1]}

    _stage("4/5 encoding speed on this CPU (batch 8 x 128 tokens)")
    teacher_bf16 = SentenceTransformer(teacher_path, device="cpu").to(torch.bfloat16)
    speed = tokens_per_second({"teacher (fp32)": teacher, "teacher (bf16)": teacher_bf16,
                               "distilled ternary": models["distilled ternary"]})

    _stage("5/5 storage")
    packed_dir = Path(output) / "packed"
    st_bitnet.save_pretrained(models["distilled ternary"], packed_dir, embedding_dtype="bfloat16")
    dim = teacher.get_embedding_dimension()
    storage = {"bytes_per_vector": {"float32": bytes_per_vector(dim, 32), "16-bit": bytes_per_vector(dim, 16),
                                    "1-bit": bytes_per_vector(dim, 1)},
               "weight_bytes": {"teacher": weight_bytes(Path(teacher_path)), "distilled ternary (packed)": weight_bytes(packed_dir)}}

    results = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "train_minutes": round(train_minutes, 2),
               "total_minutes": round((time.time() - started) / 60, 2), "quality": quality, "tokens_per_s": speed,
               "storage": storage, "recipe": str(DEMO_RECIPE)}
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    q, speed, storage = results["quality"], results["tokens_per_s"], results["storage"]
    lines = [f"\nst_bitnet demo on {results['cpu']} ({results['threads']} threads): "
             f"{results['train_minutes']:.1f} min of training, {results['total_minutes']:.1f} min in all\n",
             "| model | STS-B dev Spearman | SciFact nDCG@10 16-bit | SciFact nDCG@10 1-bit | tokens/s |",
             "|---|---:|---:|---:|---:|"]
    for name, row in q.items():
        tps = speed.get(name)
        lines.append(f"| {name} | {row['stsb']:.2f} | {row['scifact_16bit']:.2f} | {row['scifact_1bit']:.2f} | "
                     f"{'' if tps is None else f'{tps:,.0f}'} |")
    lines.append(f"| teacher (bf16) | | | | {speed['teacher (bf16)']:,.0f} |")
    t, n, s = q["teacher (fp32)"], q["naive ternary"], q["distilled ternary"]
    gap = t["stsb"] - n["stsb"]
    recovered = 100 * (s["stsb"] - n["stsb"]) / gap if gap > 0 else float("nan")
    bpv, wb = storage["bytes_per_vector"], storage["weight_bytes"]
    lines += [
        f"\nThe distilled student wins back {recovered:.0f}% of the STS-B gap the naive conversion opened "
        f"({n['stsb']:.1f} -> {s['stsb']:.1f}, teacher {t['stsb']:.1f}); longer training: recipes/minilm_bitembed.yaml.",
        f"Speed: the ternary student encodes {speed['distilled ternary'] / speed['teacher (fp32)']:.2f}x the fp32 teacher's "
        f"tokens/s and {speed['distilled ternary'] / speed['teacher (bf16)']:.2f}x the bf16 teacher's on this CPU.",
        f"Storage per vector: float32 {bpv['float32']} B, 16-bit {bpv['16-bit']} B, 1-bit {bpv['1-bit']} B. "
        f"Weights on disk: teacher {wb['teacher'] / 2**20:.1f} MiB, packed student "
        f"{wb['distilled ternary (packed)'] / 2**20:.1f} MiB (2-bit projections; the token-embedding table in bf16).",
    ]
    return "\n".join(lines)
