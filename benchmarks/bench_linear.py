"""Time st_bitnet's ternary_linear kernel against dense baselines, all in the same run.

For every linear shape of a Qwen3-0.6B and a Gemma3-270M encoder layer, at M tokens:

* ``kernel``: ``torch.ops.st_bitnet.ternary_linear`` in the layout the dispatch uses on that device
  (CPU: ``tile16``; CUDA: ``int8`` and ``packed2``), activation quantization and rescale included;
* ``fp32`` / ``bf16``: ``nn.Linear`` (``F.linear``) in that dtype;
* ``reference``: the pure-PyTorch reference (``ternary_linear_reference`` on unpacked int8 weights);
* ``int_mm``: ``torch._int_mm`` on int8 activations (already quantized) x int8 weights: the matmul
  alone, no quantization or rescale.

Reports medians of ``--repeats`` runs, GOP/s (2*M*N*K / time) and speed ratios against fp32 (CPU) or
bf16 (CUDA); writes ``--out``.json and ``--out``.md.

Usage::

    python benchmarks/bench_linear.py                       # CPU, M=2048
    python benchmarks/bench_linear.py --device cuda --m 128 1024 4096 32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from st_bitnet.bitlinear import ternary_linear_reference  # noqa: E402
from st_bitnet.ops import cpu_kernel, register_kernels  # noqa: E402
from st_bitnet.ops.layouts import pack_amx64, to_layout  # noqa: E402

# (name, K, N) of every linear of one layer
SHAPES = {
    "gemma3-270m": [("q", 640, 1024), ("k/v", 640, 256), ("o", 1024, 640), ("gate/up", 640, 2048), ("down", 2048, 640)],
    "qwen3-0.6b": [("q", 1024, 2048), ("k/v", 1024, 1024), ("o", 2048, 1024), ("gate/up", 1024, 3072), ("down", 3072, 1024)],
}
# how often each shape occurs in one layer (for the per-layer sums)
COUNT = {"q": 1, "k/v": 2, "o": 1, "gate/up": 2, "down": 1}


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times

    else:

        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times

    return run


def bench_shape(m, k, n, device, repeats, warmup, variants):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device)
    w_q = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.tensor([1.3])
    dense = torch.randn(n, k, generator=g) * 0.02
    x_bf, dense_bf = x.bfloat16(), dense.to(device).bfloat16()
    dense = dense.to(device)
    w_dev, ws = w_q.to(device), ws.to(device)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w_t = w_dev.t().contiguous()  # _int_mm wants (K, N)
    op = torch.ops.st_bitnet.ternary_linear
    fns = {}
    if device.type == "cpu":
        fns["kernel"] = (lambda blob=to_layout(w_q, "tile16"): op(x, blob, ws, None, n, "tile16"))
        amx = cpu_kernel.amx_library()
        if amx is not None:  # both CPU paths side by side: 2-bit weights (VNNI) and int8-resident tiles (AMX)
            vnni = cpu_kernel.load_library()
            fns["kernel vnni 2bit"] = lambda blob=to_layout(w_q, "tile16"): cpu_kernel.run_tile16(vnni, x, blob, ws, None, n)
            fns["kernel amx int8"] = lambda blob=pack_amx64(w_q): cpu_kernel.run_amx64(amx, x, blob, ws, None, n)
    else:
        w8, w2 = to_layout(w_q, "int8").to(device), to_layout(w_q, "packed2").to(device)
        fns["kernel int8"] = lambda: op(x_bf, w8, ws, None, n, "int8")
        fns["kernel 2bit"] = lambda: op(x_bf, w2, ws, None, n, "packed2")
    fns["fp32"] = lambda: F.linear(x, dense)
    fns["bf16"] = lambda: F.linear(x_bf, dense_bf)
    if "reference" in variants:
        fns["reference"] = lambda: ternary_linear_reference(x, w_dev, ws)
    try:
        torch._int_mm(x_q[:32] if m >= 32 else x_q, w_t)
        fns["int_mm"] = lambda: torch._int_mm(x_q, w_t)
    except Exception as e:  # shape/backend limits of _int_mm
        print(f"  _int_mm unavailable at M={m} K={k} N={n}: {e}", file=sys.stderr)
    run = _timer(device)
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            run(fn, warmup)
            t = statistics.median(run(fn, repeats))
            out[name] = {"seconds": t, "gops": 2 * m * n * k / t / 1e9}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--m", type=int, nargs="+", default=None, help="tokens (default: 2048 on CPU, several on CUDA)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-PyTorch reference")
    p.add_argument("--out", default="benchmarks/results/linear")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_kernels()
    ms = args.m or ([2048] if device.type == "cpu" else [128, 1024, 4096, 32768])
    variants = set() if args.no_reference else {"reference"}
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_kernel.isa() if device.type == "cpu" else None,
        "cpu_amx": device.type == "cpu" and cpu_kernel.amx_library() is not None,
        "loadavg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    rows = []
    for model in args.models:
        for m in ms:
            for name, k, n in SHAPES[model]:
                res = bench_shape(m, k, n, device, args.repeats, args.warmup, variants)
                rows.append({"model": model, "M": m, "name": name, "K": k, "N": n, "results": res})
                short = "  ".join(f"{v}={r['gops']:.0f}" for v, r in res.items())
                print(f"{model:12s} M={m:<6d} {name:8s} K={k:<5d} N={n:<5d} GOP/s: {short}", flush=True)
    meta["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    base = "fp32" if device.type == "cpu" else "bf16"
    kernels = [v for v in rows[0]["results"] if v.startswith("kernel")]
    others = [v for v in rows[0]["results"] if not v.startswith("kernel")]
    lines = [
        f"device: {meta['device']}, torch {meta['torch']}, threads {meta['threads']}, CPU ISA {meta['cpu_isa']}, "
        f"load average before/after {meta['loadavg_before']} / {meta['loadavg_after']}",
        "",
        "| model | M | linear | K x N | " + " | ".join(f"{v} GOP/s" for v in kernels + others) + " | "
        + " | ".join(f"{kv} / {base}" for kv in kernels) + " |",
        "|" + "---|" * (4 + len(kernels) * 2 + len(others)),
    ]
    for r in rows:
        res = r["results"]
        lines.append(
            f"| {r['model']} | {r['M']} | {r['name']} | {r['K']}x{r['N']} | "
            + " | ".join(f"{res[v]['gops']:.0f}" if v in res else "-" for v in kernels + others)
            + " | "
            + " | ".join(f"{res[base]['seconds'] / res[kv]['seconds']:.2f}x" for kv in kernels)
            + " |"
        )
    # per-layer sums: time of all linears of one layer (with k/v and gate/up counted twice)
    lines += ["", f"Per layer (all linears, time-weighted): speed-up of each variant over {base}", ""]
    lines.append("| model | M | " + " | ".join(kernels + others) + " |")
    lines.append("|" + "---|" * (2 + len(kernels) + len(others)))
    for model in args.models:
        for m in ms:
            sel = [r for r in rows if r["model"] == model and r["M"] == m]
            tot = {v: sum(COUNT[r["name"]] * r["results"][v]["seconds"] for r in sel if v in r["results"]) for v in kernels + others}
            lines.append(
                f"| {model} | {m} | " + " | ".join(f"{tot[base] / tot[v]:.2f}x" if tot.get(v) else "-" for v in kernels + others) + " |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
