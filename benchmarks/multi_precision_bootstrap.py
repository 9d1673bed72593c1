"""Paired bootstrap of the trained-quantizer vs post-hoc comparison of train_multi_precision_smoke.py models.

For each saved multi-precision model and STS dev set, the "advantage" at b bits is Spearman(trained quantizer) -
Spearman(post-hoc quantization) on the same float embeddings, i.e. post-hoc drop - trained drop vs the model's own
16-bit output. A 95% interval from 1,000 resamples of the dev pairs tells a win from noise.

Usage:
    python benchmarks/multi_precision_bootstrap.py MODEL [MODEL ...] --out benchmarks/results/multi_precision_smoke_bootstrap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sentence_transformers import SentenceTransformer

from st_bitnet import data
from st_bitnet.multi_precision import find_quantizer, posthoc_quantizer


def pair_cosines(embeddings: np.ndarray, n: int) -> np.ndarray:
    a, b = embeddings[:n].astype(np.float64), embeddings[n:].astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)


def advantage(model, set_name: str, bits: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(point, 2.5th percentile, 97.5th percentile) of Spearman(trained) - Spearman(post-hoc), x100."""
    rows = data.load_sts(set_name, "dev")
    n, gold = len(rows), np.array([r["score"] for r in rows])
    floats = model.encode([r["sentence1"] for r in rows] + [r["sentence2"] for r in rows], batch_size=64)
    trained = pair_cosines(find_quantizer(model).quantize(floats, bits).dequantize(), n)
    posthoc = pair_cosines(posthoc_quantizer(floats).quantize(floats, bits).dequantize(), n)
    point = spearmanr(trained, gold).correlation - spearmanr(posthoc, gold).correlation
    samples = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    deltas = [spearmanr(trained[i], gold[i]).correlation - spearmanr(posthoc[i], gold[i]).correlation for i in samples]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return round(100 * point, 3), round(100 * low, 3), round(100 * high, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="folders saved by train_multi_precision_smoke.py --save-model")
    parser.add_argument("--out", default="benchmarks/results/multi_precision_smoke_bootstrap.json")
    args = parser.parse_args()
    results = {}
    for path in args.models:
        model = SentenceTransformer(path, device="cpu", trust_remote_code=True)
        for set_name in ("stsb", "sick"):
            for bits in (2, 1):
                point, low, high = advantage(model, set_name, bits)
                results[f"{Path(path).name}/{set_name}/{bits}bit"] = [point, low, high]
                print(f"{Path(path).name} {set_name} {bits}-bit: advantage {point:.2f}, 95% CI [{low:.2f}, {high:.2f}]")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
