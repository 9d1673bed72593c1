"""st_bitnet against what a user would run instead, side by side on this CPU: one process, round-robin, medians.

Models: full-depth random backbones of the real shapes (built by ``bench_encode._hf_model``): Qwen3-0.6B
(28 layers, hidden 1024, 16/8 heads of 128, ffn 3072) and Gemma3-270M (18 layers, hidden 640, 4/1 heads of
256, ffn 2048), vocabulary 32000. Shapes (batch x tokens): 1x32, 1x128, 1x512, 8x128, 32x256.

Variants (the backbone forward on the same token ids, ``torch.inference_mode``):

* ``st_bitnet``: converted + packed, st_bitnet's kernels, everything else float32 (the exact default);
* ``st_bitnet-bf16``: the same packed model after ``.to(torch.bfloat16)``: attention, norms, rotary,
  activations and embeddings in bf16, every BitLinear still int8 x ternary (quantized as in float32);
* ``torch-fp32``, ``torch-bf16`` (``model.to(torch.bfloat16)``), ``torch-int8-dynamic``
  (``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``, qint8);
* ``onnx-int8`` / ``openvino-int8``: sentence-transformers' ONNX / OpenVINO backends, when ``optimum.onnxruntime``
  / ``optimum.intel`` import; otherwise listed as skipped with the import error (in this project's environment
  neither installs cleanly: ``optimum-onnx`` pins ``transformers<4.58`` and ``optimum-intel[openvino]`` pulls
  another torch build, either of which would replace what st_bitnet runs on).

Every column: the median over ``--repeats`` round-robin passes (each pass runs every variant once, so load
changes hit all alike); the 32x256 column gets ``--big-repeats``. Reported: tokens/s per variant and column,
and per column the ratio of st_bitnet's best variant to the best alternative. The header gives the CPU model,
its ISA flags, the kernel's ISA, torch version, threads and load average before/after. Peak resident memory
per variant is measured in a fresh subprocess per variant (model built, ``VmHWM`` reset through
``/proc/self/clear_refs``, one 8x128 forward): resident after building and peak during the forward, in MiB.

Writes ``--out``.json and ``--out``.md (default ``benchmarks/results/side_by_side``).

Expected time of the full run with the defaults (2 cores, idle machine): at most about 11 minutes. Extrapolated
from CPU seconds measured on a shared machine (load 7-11 on 2 cores), 1 thread, ``--layers 2 --repeats 1
--big-repeats 1 --no-memory``: 40 CPU-s for Qwen3 and 13 CPU-s for Gemma3 (model building included); the
defaults run 2x more token-forwards on the small columns (3 passes + 1 warm-up vs 1 + 1) and as many on the
32x256 column (1 pass), 14x / 9x the layers, so 1.3x that work per layer: 40 * 14 * 1.3 + 13 * 9 * 1.3 = 880
CPU-s, ~520 s on 2 threads at 85% scaling, plus ~2 minutes for the 10 memory subprocesses. An upper bound: the
embedding table and model building do not grow with depth. ``--big-repeats 2`` adds about 5 minutes; ``--profile`` adds 16 forwards at 1x32 and 8x128 per model (not timed yet).
``--quick`` (2 layers, hidden sizes of the real models, shapes 1x8 and 2x16, 2 repeats) runs in seconds; ``--profile`` adds a
torch.profiler breakdown (linears, attention/SDPA, norms, rotary, activations, embedding, other) of both
st_bitnet variants and PyTorch dynamic int8 at 1x32 and 8x128.

Usage::

    python benchmarks/bench_side_by_side.py                 # full run, both models
    python benchmarks/bench_side_by_side.py --quick --out /tmp/sbs
    python benchmarks/bench_side_by_side.py --profile --models qwen3
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_encode import _cpu_name, _hf_model, _time_interleaved, write_results  # noqa: E402

import st_bitnet  # noqa: E402  (bench_encode put the checkout first on sys.path)
from st_bitnet.ops import cpu_kernel, register_kernels  # noqa: E402

FULL_LAYERS = {"qwen3": 28, "gemma3": 18}
SHAPES = ((1, 32), (1, 128), (1, 512), (8, 128), (32, 256))
QUICK_SHAPES = ((1, 8), (2, 16))
ST_VARIANTS = ("st_bitnet", "st_bitnet-bf16")
TORCH_VARIANTS = ("torch-fp32", "torch-bf16", "torch-int8-dynamic")
BACKEND_VARIANTS = {"onnx-int8": "optimum.onnxruntime", "openvino-int8": "optimum.intel"}
VARIANTS = ST_VARIANTS + TORCH_VARIANTS + tuple(BACKEND_VARIANTS)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
VOCAB = 32000
MEMORY_SHAPE = (8, 128)


def cpu_flags() -> list[str]:
    """The ISA extensions among :data:`ISA_FLAGS` that /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine_meta() -> dict:
    """CPU model, cores, ISA extensions, the st_bitnet kernel chosen, torch version and threads."""
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "kernel_isa": cpu_kernel.isa(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip


def machine_line(meta: dict) -> str:
    """``machine_meta`` as the opening words of a results table's header."""
    return (f"{meta['cpu']} ({meta['cores']} cores; ISA: {', '.join(meta['cpu_flags']) or 'unknown'}; st_bitnet "
            f"kernel: {meta['kernel_isa']}), torch {meta['torch']}, {meta['threads']} threads")


def backend_skips() -> dict[str, str]:
    """``{variant: reason}`` for the sentence-transformers backends whose packages do not import here."""
    skips = {}
    for variant, module in BACKEND_VARIANTS.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install raising anything else
            skips[variant] = f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            skips[variant] = f"{module} imports, but this benchmark does not drive that backend yet"
    return skips


def build_variant(name: str, model: str, layers: int, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """The ``name`` variant of the random ``model`` backbone (seeded: every variant starts from the same weights)."""
    if base is None:
        torch.manual_seed(0)
        base = _hf_model(model, layers).eval()
    m = copy.deepcopy(base) if name != "torch-fp32" else base
    if name in ST_VARIANTS:
        m = st_bitnet.pack(st_bitnet.convert(m)).eval()
        if name == "st_bitnet-bf16":
            m = m.to(torch.bfloat16)
    elif name == "torch-bf16":
        m = m.to(torch.bfloat16)
    elif name == "torch-int8-dynamic":
        m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    elif name != "torch-fp32":
        raise ValueError(f"unknown variant {name!r}")
    return m.eval()


def _inputs(batch: int, seq: int):
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def _forward(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def bench_model(model: str, layers: int, shapes, repeats: int, big_repeats: int, variants) -> dict:
    """``{"BxS": {variant: tokens/s}}`` for every shape, variants timed round-robin."""
    torch.manual_seed(0)
    base = _hf_model(model, layers).eval()
    built = {v: build_variant(v, model, layers, base) for v in variants if v != "torch-fp32"}
    if "torch-fp32" in variants:
        built["torch-fp32"] = base
    built = {v: built[v] for v in variants}
    out = {}
    biggest = max(b * s for b, s in shapes)
    for batch, seq in shapes:
        ids, mask = _inputs(batch, seq)
        big = batch * seq == biggest and len(shapes) > 1
        n = big_repeats if big else repeats
        fns = {v: (lambda m=m: _forward(m, ids, mask)) for v, m in built.items()}
        secs = _time_interleaved(fns, {v: n for v in fns}, warmup=0 if big else 1)
        out[f"{batch}x{seq}"] = {v: batch * seq / t for v, t in secs.items()}
        print(model, f"{batch}x{seq}", {v: round(x, 1) for v, x in out[f"{batch}x{seq}"].items()}, flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Resident memory: one fresh process per variant
# --------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(model: str, layers: int, variant: str, shape) -> dict:
    """Resident MiB after building ``variant`` and peak MiB during one forward at ``shape`` (this process)."""
    m = build_variant(variant, model, layers)
    gc.collect()
    _forward(m, *_inputs(1, 8))  # kernel caches and lazy buffers exist in every variant before the count
    gc.collect()
    resident = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak resident) to the current resident size
    _forward(m, *_inputs(*shape))
    return {"resident_mib": resident / 1024, "peak_forward_mib": _status_kib("VmHWM") / 1024}


def measure_memory(model: str, layers: int, variants, shape, threads: int) -> dict:
    out = {}
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", model, str(layers), variant,
               f"{shape[0]}x{shape[1]}", "--threads", str(threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out[variant] = {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
        else:
            out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(model, "memory", variant, out[variant], flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def best_ratios(columns: dict) -> dict:
    """Per column: st_bitnet's best variant, the best alternative, and their tokens/s ratio."""
    out = {}
    for col, res in columns.items():
        ours = {v: x for v, x in res.items() if v in ST_VARIANTS}
        theirs = {v: x for v, x in res.items() if v not in ST_VARIANTS}
        if not ours or not theirs:
            continue
        a, b = max(ours, key=ours.get), max(theirs, key=theirs.get)
        out[col] = {"st_bitnet_best": a, "alternative_best": b, "ratio": ours[a] / theirs[b]}
    return out


def render(meta: dict, results: dict) -> str:
    lines = [
        f"{machine_line(meta)}, backbone forward tokens/s, "
        f"medians of {meta['repeats']} round-robin passes ({meta['big_repeats']} for the largest shape), load average "
        f"(1/5/15 min) before/after {tuple(round(v, 1) for v in meta['loadavg_before'])} / "
        f"{tuple(round(v, 1) for v in meta['loadavg_after'])}, {meta['seconds']:.0f} s in all",
    ]
    for variant, reason in meta["skipped"].items():
        lines.append(f"skipped {variant}: {reason}")
    for model, r in results.items():
        cols = list(r["tokens_per_s"])
        lines += ["", f"**{model}** ({r['layers']} layers)", "", "| variant | " + " | ".join(cols) + " |",
                  "|---|" + "---:|" * len(cols)]  # fmt: skip
        for variant in r["variants"]:
            lines.append(f"| {variant} | " + " | ".join(f"{r['tokens_per_s'][c][variant]:.0f}" for c in cols) + " |")
        ratio = r["ratio"]
        lines.append("| st_bitnet best / best alternative | " + " | ".join(
            f"{ratio[c]['ratio']:.2f}x ({ratio[c]['alternative_best']})" for c in cols) + " |")  # fmt: skip
        if r.get("memory"):
            lines += ["", f"resident memory ({model}, MiB: after building / peak during one "
                      f"{meta['memory_shape']} forward, fresh process per variant)", "",
                      "| variant | resident | peak |", "|---|---:|---:|"]  # fmt: skip
            for variant, mem in r["memory"].items():
                if "error" in mem:
                    lines.append(f"| {variant} | error: {mem['error']} | |")
                else:
                    lines.append(f"| {variant} | {mem['resident_mib']:.0f} | {mem['peak_forward_mib']:.0f} |")
        if r.get("profile"):
            from bench_profile import render_profile

            lines += ["", *render_profile(model, r["profile"])]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FULL_LAYERS), choices=list(FULL_LAYERS))
    p.add_argument("--layers", type=int, default=None, help="layers per model (default: the real depth)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin passes per column (after one warm-up pass)")
    p.add_argument("--big-repeats", type=int, default=1, help="passes of the largest shape (32x256; no warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of both st_bitnet variants and dynamic int8")
    p.add_argument("--quick", action="store_true", help="2 layers, tiny shapes, 2 repeats: a smoke run in seconds")
    p.add_argument("--out", default="benchmarks/results/side_by_side")
    p.add_argument("--_memory-child", nargs=4, metavar=("MODEL", "LAYERS", "VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_kernels()
    if args._memory_child:
        model, layers, variant, shape = args._memory_child
        print(json.dumps(memory_child(model, int(layers), variant, tuple(int(s) for s in shape.split("x")))))
        return None
    if args.quick:
        args.layers, args.repeats, args.big_repeats = args.layers or 2, 2, 2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    memory_shape = (2, 16) if args.quick else MEMORY_SHAPE
    start = time.perf_counter()
    skipped = backend_skips()
    variants = [v for v in VARIANTS if v not in skipped]
    meta = {
        **machine_meta(), "repeats": args.repeats,
        "big_repeats": args.big_repeats, "shapes": [f"{b}x{s}" for b, s in shapes], "variants": variants,
        "skipped": skipped, "memory_shape": f"{memory_shape[0]}x{memory_shape[1]}", "quick": args.quick,
        "loadavg_before": os.getloadavg(),
    }  # fmt: skip
    results = {}
    for model in args.models:
        layers = args.layers or FULL_LAYERS[model]
        t0, c0 = time.perf_counter(), time.process_time()
        columns = bench_model(model, layers, shapes, args.repeats, args.big_repeats, variants)
        # CPU seconds as well as wall seconds: on a shared machine they are what extrapolates to an idle one
        r = {"layers": layers, "variants": variants, "tokens_per_s": columns, "ratio": best_ratios(columns),
             "seconds_timing": time.perf_counter() - t0, "cpu_seconds_timing": time.process_time() - c0}  # fmt: skip
        gc.collect()
        if args.profile:
            from bench_profile import profile_variants

            r["profile"] = profile_variants(model, layers, ((1, 8), (2, 16)) if args.quick else ((1, 32), (8, 128)))
        if not args.no_memory:
            t0 = time.perf_counter()
            r["memory"] = measure_memory(model, layers, variants, memory_shape, torch.get_num_threads())
            r["seconds_memory"] = time.perf_counter() - t0
        results[model] = r
    meta["loadavg_after"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - start
    write_results(args.out, meta, results, render(meta, results))
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
