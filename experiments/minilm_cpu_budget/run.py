"""MiniLM at a CPU budget: train recipes with the product's runner, evaluate each on the full dev protocol.

    python experiments/minilm_cpu_budget/run.py --recipes recipes/minilm_bitembed.yaml recipes/minilm_plain_kd.yaml
    python experiments/minilm_cpu_budget/run.py --evaluate-only runs/minilm_bitembed runs/minilm_plain_kd

Training is `st-bitnet train <recipe>` (resumable with --resume); evaluation is `st_bitnet.evaluation.run_evaluation`
of the packed model at 16-bit and 1-bit outputs (post-hoc 1-bit = sign, sentence-transformers' binary). Each row's
wall-clock minutes of training come from its loss log. Results: results/<run>.json and results/table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEACHER_ROW = "teacher (all-MiniLM-L6-v2, fp32; 1-bit post-hoc)"


def train_minutes(run_dir: Path) -> float | None:
    log = run_dir / "loss_log.jsonl"
    if not log.is_file():
        return None
    times = [json.loads(line).get("time") for line in log.read_text().splitlines() if line.strip()]
    times = [t for t in times if t]
    return round((times[-1] - times[0]) / 60, 1) if len(times) > 1 else None


def evaluate(run_dir: Path, bits: list[int], teacher: str | None, max_seq_length: int) -> dict:
    import torch

    import st_bitnet
    from st_bitnet.evaluation import run_evaluation
    from st_bitnet.machine import cpu_description

    model_dir = run_dir / "packed" if (run_dir / "packed").is_dir() else run_dir / "final"
    start = time.time()
    model = st_bitnet.load(str(model_dir), device="cpu")  # st_bitnet's output modules too, no trust_remote_code
    model.max_seq_length = max_seq_length  # the teacher's length: trained at 128, scored like the teacher at 256
    result = run_evaluation(model, HERE / "results" / run_dir.name, teacher=teacher, bits=bits, plots=False,
                            model_name=run_dir.name, show_progress_bar=False)
    result.pop("files", None)
    steps = json.loads((run_dir / "results.json").read_text()).get("global_step") if (run_dir / "results.json").is_file() else None
    warm = json.loads((run_dir / "warm_start.json").read_text()) if (run_dir / "warm_start.json").is_file() else None
    summary = {"run": run_dir.name, "model": str(model_dir), "steps": steps, "train_minutes": train_minutes(run_dir),
               "eval_minutes": round((time.time() - start) / 60, 1), "eval_max_seq_length": max_seq_length, "cpu": cpu_description(),
               "threads": torch.get_num_threads(), "warm_start": warm, "evaluation": result}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{run_dir.name}.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=[])
    parser.add_argument("--evaluate-only", nargs="*", default=[], metavar="RUN_DIR")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--teacher", default=None, help="also evaluate this teacher side by side")
    parser.add_argument("--max-seq-length", type=int, default=256, help="evaluation length (all-MiniLM-L6-v2's own)")
    args = parser.parse_args(argv)
    run_dirs = [Path(d) for d in args.evaluate_only]
    for recipe in args.recipes:
        import yaml

        out = Path(yaml.safe_load(Path(recipe).read_text())["output_dir"])
        resume = ["--resume"] if any(out.glob("checkpoint-*")) else []
        subprocess.run([sys.executable, "-m", "st_bitnet.cli", "train", recipe, *resume], check=True)
        run_dirs.append(out)
    for run_dir in run_dirs:
        summary = evaluate(run_dir, args.bits, args.teacher, args.max_seq_length)
        print(json.dumps({k: v for k, v in summary.items() if k != "evaluation"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
