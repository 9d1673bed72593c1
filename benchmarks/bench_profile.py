"""Where a forward spends its time: torch.profiler shares per part, st_bitnet (float32 / bf16 rest) and its rival.

Parts: ``linears`` (every packed BitLinear with its norm, int8 quantization and ternary kernel; in the PyTorch
variants every ``nn.Linear`` or dynamic int8 linear with its activation quantization), ``attention``
(``aten::scaled_dot_product_attention``), ``norms`` (the model's own RMSNorm / LayerNorm modules, q/k norms
included), ``rotary`` (the rotary-embedding module and ``apply_rotary_pos_emb``), ``activations`` (the MLP's
``act_fn``), ``embedding`` (``aten::embedding``) and ``other`` (the rest of the forward: residual adds, reshapes,
masks, transformers' module code). Parts are marked with ``torch.profiler.record_function`` around the modules
(forward pre/post hooks); shares are of the whole forward's wall time as the profiler records it.

Profiled variants: both st_bitnet variants and PyTorch's dynamic int8 (the fastest alternative on CPUs without AMX,
whose linears use the same VNNI instructions), so a part's milliseconds can be compared between them.

Run through ``bench_side_by_side.py --profile``, or alone: ``python benchmarks/bench_profile.py`` (both models at
their real depth, 1x32 and 8x128; writes ``benchmarks/results/profile.{json,md}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_encode import _hf_model  # noqa: E402

from st_bitnet.bitlinear import BitLinear  # noqa: E402
from st_bitnet.ops import register_kernels  # noqa: E402

_LINEARS = (BitLinear, torch.nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
PROFILED_VARIANTS = ("st_bitnet", "st_bitnet-bf16", "torch-int8-dynamic")
PROFILED_RUNS = 5

PARTS = ("linears", "attention", "norms", "rotary", "activations", "embedding", "other")
_OPS = {"aten::scaled_dot_product_attention": "attention", "aten::embedding": "embedding"}
_LABEL = "sbs::"


def _part_of(name: str, module: torch.nn.Module) -> str | None:
    if isinstance(module, _LINEARS):
        return "linears"
    cls = type(module).__name__
    if cls.endswith(("RMSNorm", "LayerNorm")) and cls != "BitRMSNorm":
        return "norms"
    if cls.endswith("RotaryEmbedding"):
        return "rotary"
    if name.endswith("act_fn"):
        return "activations"
    return None


@contextlib.contextmanager
def labelled(model: torch.nn.Module):
    """Wrap each part's modules (and transformers' ``apply_rotary_pos_emb``) in ``record_function`` labels."""
    handles, patched = [], []
    for name, module in model.named_modules():
        part = _part_of(name, module)
        if part is None:
            continue
        stack = []

        def pre(mod, args, part=part, stack=stack):
            ctx = record_function(_LABEL + part)
            ctx.__enter__()
            stack.append(ctx)

        def post(mod, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for mod in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(mod)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is not None:
            def wrapped(*a, _fn=fn, **kw):
                with record_function(_LABEL + "rotary"):
                    return _fn(*a, **kw)

            setattr(module, "apply_rotary_pos_emb", wrapped)
            patched.append((module, fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, fn in patched:
            module.apply_rotary_pos_emb = fn


def breakdown(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, runs: int = PROFILED_RUNS) -> dict:
    """Shares of the forward's time per part: each part's median over ``runs`` forwards, each profiled on its own
    after one warm-up (a median, so one forward stalled by another process does not decide the row)."""
    per_run = []
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        with labelled(model):
            for _ in range(runs):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    with record_function(_LABEL + "forward"):
                        model(input_ids=ids, attention_mask=mask)
                totals = {}
                for event in prof.events():
                    key = event.name[len(_LABEL):] if event.name.startswith(_LABEL) else _OPS.get(event.name)
                    if key is not None:
                        totals[key] = totals.get(key, 0.0) + event.cpu_time_total
                per_run.append(totals)
    forward = statistics.median(t["forward"] for t in per_run)
    share = {part: statistics.median(t.get(part, 0.0) for t in per_run) / forward for part in PARTS if part != "other"}
    share["other"] = max(0.0, 1.0 - sum(share.values()))
    return {"share": share, "forward_ms": forward / 1000.0, "runs": runs}


def profile_variants(model_name: str, layers: int, shapes, variants=PROFILED_VARIANTS) -> dict:
    """``{"<variant> @ BxS": breakdown}`` for each variant of ``bench_side_by_side`` (same seeded weights)."""
    from bench_side_by_side import build_variant

    torch.manual_seed(0)
    base = _hf_model(model_name, layers).eval()
    models = {v: build_variant(v, model_name, layers, base=base) for v in variants}
    out = {}
    for batch, seq in shapes:
        ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(seq))
        for variant, m in models.items():
            r = out[f"{variant} @ {batch}x{seq}"] = breakdown(m, ids, torch.ones_like(ids))
            print(model_name, variant, f"{batch}x{seq}", f"{r['forward_ms']:.1f} ms",
                  {k: f"{100 * v:.0f}%" for k, v in r["share"].items()}, flush=True)
    return out


def render_profile(model_name: str, parts_by_row: dict) -> list[str]:
    """Markdown table: each part's share of the forward and its milliseconds, one row per variant and shape."""
    parts = list(next(iter(parts_by_row.values()))["share"])
    lines = [f"profile ({model_name}, share of the forward's CPU time (its ms), torch.profiler)", "",
             "| variant @ shape | " + " | ".join(parts) + " | forward ms |", "|---|" + "---:|" * (len(parts) + 1)]
    for key, prof in parts_by_row.items():
        cells = [f"{100 * prof['share'][p]:.0f}% ({prof['share'][p] * prof['forward_ms']:.1f})" for p in parts]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {prof['forward_ms']:.1f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3", "gemma3"])
    p.add_argument("--layers", type=int, default=None, help="default: the real depth")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/profile", help="writes <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_kernels()
    from bench_side_by_side import FULL_LAYERS, machine_line, machine_meta

    start, load_before = time.perf_counter(), os.getloadavg()
    result = {m: profile_variants(m, args.layers or FULL_LAYERS[m], ((1, 32), (8, 128))) for m in args.models}
    meta = {**machine_meta(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "profile": result}, indent=1))
    lines = [f"{machine_line(meta)}, load before/after {tuple(round(v, 1) for v in load_before)} / "
             f"{tuple(round(v, 1) for v in meta['loadavg_after'])}, {meta['seconds']:.0f} s; per part the median "
             f"of {PROFILED_RUNS} forwards, each profiled alone after one warm-up"]
    for model_name, parts_by_row in result.items():
        lines += ["", *render_profile(model_name, parts_by_row)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
