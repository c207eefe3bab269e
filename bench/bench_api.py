"""Load benchmark of `loralab api` on loopback: N requests from C concurrent clients, for several C.

Starts the server as a subprocess on 127.0.0.1 (the tiny random Llama by default, or
--model builtin:smollm2-135m-instruct), sends non-streaming chat requests with httpx from C
asyncio clients, and prints per concurrency level: requests/s, aggregate generated tokens/s,
p50/p95 latency and errors. Every level is bounded by --requests and --max-seconds. Results go to
bench/results/api.json. Targets: zero errors; tokens/s at the highest C >= 4x tokens/s at C=1.

    python bench/bench_api.py                                    # tiny model, 200 requests, C = 1, 4, 16
    python bench/bench_api.py --model builtin:smollm2-135m-instruct --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a red fox", "bread", "the moon", "rain", "a small robot", "tea", "mountains", "a library",
          "winter", "a bicycle", "music", "the capital of France", "numbers", "a garden", "the number 42"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch_size: int, threads: int, max_tokens: int) -> subprocess.Popen:
    loralab = Path(sys.executable).with_name("loralab")
    command = [str(loralab)] if loralab.exists() else [sys.executable, "-m", "loralab.cli"]
    command += ["api", f"model_name_or_path={model}", f"torch_threads={threads}", f"max_new_tokens={max_tokens}",
                "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("API_KEY", None)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> dict:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("server did not become ready")


async def run_level(url: str, model: str, n: int, concurrency: int, max_tokens: int, max_seconds: float) -> dict:
    """n requests from `concurrency` clients (each sends its next request when the last one returns)."""
    import httpx

    latencies, tokens, errors = [], [], []
    next_i = 0
    start = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < n and time.perf_counter() - start < max_seconds:
            i = next_i
            next_i += 1
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]}
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                tokens.append(r.json()["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + len(errors),
        "completed": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "generated_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "p50_latency_s": round(statistics.median(lat), 3) if lat else None,
        "p95_latency_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "hit_time_limit": len(latencies) + len(errors) < n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model_name_or_path (default: a tiny random Llama, made now)")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level (default 200)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of client counts (default 1,4,16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="server's --max-batch-size (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="server's torch threads (default 1)")
    parser.add_argument("--max-seconds", type=float, default=180, help="time limit per level (default 180)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "api.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    proc = None
    try:
        model = args.model
        if model is None:
            from loralab.testing import make_tiny_llama

            model = str(make_tiny_llama(tmp / "tiny-llama"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.max_batch_size, args.threads, args.max_tokens)
        import httpx

        health = wait_ready(url, proc)
        served = httpx.get(url + "/v1/models").json()["data"][0]["id"]  # /health names no model (no paths)
        asyncio.run(run_level(url, served, 8, 4, args.max_tokens, 60))  # warm-up, not reported
        results = []
        for c in levels:
            before = httpx.get(url + "/health").json()
            r = asyncio.run(run_level(url, served, args.requests, c, args.max_tokens, args.max_seconds))
            after = httpx.get(url + "/health").json()
            batches = after["batches"] - before["batches"]
            r["mean_batch_size"] = round((after["requests"] - before["requests"]) / batches, 2) if batches else None
            results.append(r)
            print(f"C={c:>3}: {r['completed']:>4} ok, {r['errors']} errors in {r['seconds']:>6.1f}s | "
                  f"{r['requests_per_s']:>6.2f} req/s | {r['tokens_per_s']:>7.1f} tok/s | "
                  f"p50 {r['p50_latency_s']}s p95 {r['p95_latency_s']}s | mean batch {r['mean_batch_size']}"
                  + (" (time limit hit)" if r["hit_time_limit"] else ""), flush=True)
        health = httpx.get(url + "/health").json()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    base = next((r for r in results if r["concurrency"] == 1), None)
    top = max(results, key=lambda r: r["concurrency"])
    speedup = round(top["tokens_per_s"] / base["tokens_per_s"], 2) if base and base["tokens_per_s"] else None
    summary = {
        "model": args.model or "tiny random Llama (loralab.testing.make_tiny_llama)",
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "torch_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "levels": results,
        "server": {"batches": health["batches"], "largest_batch": health["largest_batch"]},
        "tokens_per_s_speedup_top_vs_c1": speedup,
        "targets": {"zero_errors": all(r["errors"] == 0 for r in results),
                    "top_c_tokens_per_s_at_least_4x_c1": bool(speedup and speedup >= 4)},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"tokens/s C={top['concurrency']} vs C=1: {speedup}x; targets: {summary['targets']}; wrote {out}")


if __name__ == "__main__":
    main()
