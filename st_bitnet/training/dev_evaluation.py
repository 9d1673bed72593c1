"""Dev-set scores of a trained model: Spearman x 100 of cosine similarity on the STS dev splits a recipe names, of
the float output and at every precision its output quantizer serves."""

from __future__ import annotations

def build_evaluator(names: list[str], batch_size: int = 64):
    """sentence-transformers' STS evaluators on the dev splits named in the recipe (dev data: scoring only)."""
    if not names:
        return None
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SequentialEvaluator

    from st_bitnet import data

    evaluators = []
    for name in names:
        rows = data.load_sts(name, "dev")
        evaluators.append(
            EmbeddingSimilarityEvaluator(
                [r["sentence1"] for r in rows],
                [r["sentence2"] for r in rows],
                [r["score"] for r in rows],
                name=f"{name}-dev",
                batch_size=batch_size,
                main_similarity="cosine",
            )
        )
    return evaluators[0] if len(evaluators) == 1 else SequentialEvaluator(evaluators)


def evaluate(model, names: list[str]) -> dict[str, float]:
    """Spearman x 100 of cosine similarity on the named dev sets."""
    evaluator = build_evaluator(names)
    if evaluator is None:
        return {}
    results = evaluator(model)
    return {k: round(100 * v, 2) for k, v in results.items() if k.endswith("spearman_cosine")}


def evaluate_precisions(model, names: list[str], batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Spearman x 100 of cosine similarity on the named dev sets, of the float output and at every precision the
    model's ``MultiPrecisionQuantizer`` serves (its stored ranges; each text is encoded once), ``{}`` without one.

    The cosine of the dequantized codes equals the code-space score (integer dot / popcount), so this is what a
    ``b``-bit index would rank with.
    """
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from st_bitnet import data
    from st_bitnet.multi_precision import find_quantizer

    quantizer = find_quantizer(model)
    if quantizer is None or not names:
        return {}
    scores = {}
    for name in names:
        rows = data.load_sts(name, "dev")
        texts = sorted({r["sentence1"] for r in rows} | {r["sentence2"] for r in rows})
        index = {t: i for i, t in enumerate(texts)}
        left = [index[r["sentence1"]] for r in rows]
        right = [index[r["sentence2"]] for r in rows]
        gold = np.array([r["score"] for r in rows])

        def spearman(embeddings: torch.Tensor) -> float:
            cosine = torch.nn.functional.cosine_similarity(embeddings[left], embeddings[right], dim=-1)
            return round(100 * float(spearmanr(cosine.cpu().numpy(), gold).statistic), 2)

        floats = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
        per_bits = {"float": spearman(floats.double())}
        with torch.no_grad():
            for bits in quantizer.precisions:
                per_bits[f"{bits}bit"] = spearman(quantizer.fake_quantize(floats.to(quantizer.offset.device), bits).double())
        scores[f"{name}-dev"] = per_bits
    return scores

