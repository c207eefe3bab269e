"""Load benchmark of `loralab api` on loopback: C concurrent streaming clients, for several C.

Starts the server as a subprocess on 127.0.0.1 with the base model and two random LoRA adapters
(`--adapter`; r 8, all linear layers, small random B so the model stays fluent), and sends
streaming chat requests with httpx from C asyncio clients; each request picks the base model or an
adapter in turn, so every load mixes adapters in the running batch. Every level is bounded by
--requests-per-client and --max-seconds. Per level it reports aggregate generated tokens/s, p50/p95
time-to-first-token, p50/p95 tokens/s per request (a client's view) and errors; the figure of merit
is aggregate tokens/s at 16 clients over 1 client (target >= 8x, 0 errors). Writes
bench/results/api.json.

    python bench/bench_api.py                                   # tiny random Llama, C = 1, 4, 16
    python bench/bench_api.py --model builtin:smollm2-135m-instruct --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TOPICS = [
    "the sea",
    "a red fox",
    "bread",
    "the moon",
    "rain",
    "a small robot",
    "tea",
    "mountains",
    "a library",
    "winter",
    "a bicycle",
    "music",
    "the capital of France",
    "numbers",
    "a garden",
    "the number 42",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, adapters: dict[str, str], port: int, max_batch_size: int, threads: int, max_tokens: int
) -> subprocess.Popen:
    loralab = Path(sys.executable).with_name("loralab")
    command = [str(loralab)] if loralab.exists() else [sys.executable, "-m", "loralab.cli"]
    command += [
        "api",
        f"model_name_or_path={model}",
        f"torch_threads={threads}",
        f"max_new_tokens={max_tokens}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
    ]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
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


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


async def run_level(url: str, models: list[str], n: int, concurrency: int, max_tokens: int, max_seconds: float) -> dict:
    """n streaming requests from `concurrency` clients (each sends its next request when the last one ends)."""
    import httpx

    ttft, rates, tokens, errors, used = [], [], [], [], []
    next_i = 0
    start = time.perf_counter()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        model = models[i % len(models)]
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}],
        }
        t0 = time.perf_counter()
        first, usage = None, None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(str(chunk["error"])[:200])
                    return
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        seconds = time.perf_counter() - t0
        tokens.append(usage["completion_tokens"])
        rates.append(usage["completion_tokens"] / seconds)
        used.append(model)
        if first is not None:
            ttft.append(first)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < n and time.perf_counter() - start < max_seconds:
            i = next_i
            next_i += 1
            try:
                await one(client, i)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(tokens) + len(errors),
        "completed": len(tokens),
        "errors": len(errors),
        "error_samples": errors[:3],
        # the base model's id is its path: recorded as "base" (results name no machine paths)
        "models_used": {("base" if i == 0 else m): used.count(m) for i, m in enumerate(models)},
        "seconds": round(seconds, 2),
        "generated_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / seconds, 2),
        "p50_ttft_s": pct(ttft, 0.5),
        "p95_ttft_s": pct(ttft, 0.95),
        "p50_tokens_per_s_per_request": pct(rates, 0.5),
        "p5_tokens_per_s_per_request": pct(rates, 0.05),
        "hit_time_limit": len(tokens) + len(errors) < n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model_name_or_path (default: a tiny random Llama, made now)")
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=6,
        help="requests per client and level, at most (default 6; few make the ramp-up and tail dominate)",
    )
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of client counts (default 1,4,16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="server's --max-batch-size (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="server's torch threads (default 1)")
    parser.add_argument("--max-seconds", type=float, default=180, help="time limit per level (default 180)")
    parser.add_argument("--adapter-std", type=float, default=0.02, help="std of the random adapters' B matrices")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "api.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    from bench_generate import make_adapter

    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    proc = None
    try:
        model = args.model
        if model is None:
            from loralab.testing import make_tiny_llama

            model = str(make_tiny_llama(tmp / "tiny-llama"))
        adapters = {f"lora{i}": str(make_adapter(model, tmp / f"lora{i}", args.adapter_std, seed=i)) for i in (1, 2)}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, adapters, port, args.max_batch_size, args.threads, args.max_tokens)
        import httpx

        wait_ready(url, proc)
        # base model first, then the adapters (/health names no model: no paths)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        asyncio.run(run_level(url, models, 6, 3, args.max_tokens, 60))  # warm-up, not reported
        results = []
        for c in levels:
            before = httpx.get(url + "/health").json()
            r = asyncio.run(run_level(url, models, args.requests_per_client * c, c, args.max_tokens, args.max_seconds))
            after = httpx.get(url + "/health").json()
            steps = after["steps"] - before["steps"]
            r["mean_rows_per_step"] = round((after["row_steps"] - before["row_steps"]) / steps, 2) if steps else None
            results.append(r)
            print(
                f"C={c:>3}: {r['completed']:>4} ok, {r['errors']} errors in {r['seconds']:>6.1f}s | "
                f"{r['tokens_per_s']:>7.1f} tok/s | TTFT p50 {r['p50_ttft_s']}s p95 {r['p95_ttft_s']}s | "
                f"per request p50 {r['p50_tokens_per_s_per_request']} tok/s | rows/step {r['mean_rows_per_step']}"
                + (" (time limit hit)" if r["hit_time_limit"] else ""),
                flush=True,
            )
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
        "adapters": f"2 random LoRA adapters (r8 alpha16 all-linear, lora_B ~ N(0, {args.adapter_std})); "
        "requests cycle base, lora1, lora2",
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "torch_threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "levels": results,
        "server": {"steps": health["steps"], "largest_batch": health["largest_batch"]},
        "tokens_per_s_top_c_over_c1": speedup,
        "targets": {
            "zero_errors": all(r["errors"] == 0 for r in results),
            "top_c_tokens_per_s_at_least_8x_c1": bool(speedup and speedup >= 8),
        },
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"tokens/s C={top['concurrency']} vs C=1: {speedup}x; targets: {summary['targets']}; wrote {out.name}")


if __name__ == "__main__":
    main()
