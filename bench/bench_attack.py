"""`loralab api` under attack on loopback: how long a small request takes while the server is abused.

Starts `loralab api` as a subprocess (the real command: its uvicorn settings, header/body timeouts,
connection limit), its log captured. Then, all at once:
  - 6 streaming replies in flight (sampling, one adapter-free batch),
  - 200 connections stalled in their headers and 20 stalled in their bodies,
  - 30 prompts of ~0.95 MB each (far over the context, just under the 1 MB body limit),
  - 4 requests whose tool parameters nest 900 deep,
  - 6 requests with sampling values the sampler cannot use (temperature 1e-40, top_p 1e-45, 5e-324),
and meanwhile a 3-token request is sent again and again (also timed before the attack, with the 6
streams already decoding). Reports that request's latency (idle and
under attack), the 5xx count over everything sent, whether the 6 streams finished without an error
event, how many stalled connections the server closed (header timeout) and the tracebacks in its log;
then SIGTERMs the server with a half-sent body open and times the shutdown. Writes
bench/results/attack.json.

    python bench/bench_attack.py                                    # builtin:smollm2-135m-instruct
    python bench/bench_attack.py --model /path/to/model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loralab.testing import free_port, stalled_connections

REPO = Path(__file__).resolve().parents[1]


def start_server(model: str, port: int, log_path: Path, threads: int) -> subprocess.Popen:
    loralab = Path(sys.executable).with_name("loralab")
    command = [str(loralab)] if loralab.exists() else [sys.executable, "-m", "loralab.cli"]
    command += ["api", f"model_name_or_path={model}", f"torch_threads={threads}", "--port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env.pop("API_KEY", None)
    log = log_path.open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(url + "/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("server did not become ready")


def closed_by_server(s: socket.socket) -> bool:
    """True when the server has closed the connection (after an answer such as a 408, or without one)."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1, help="server's torch threads (default 1)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "attack.json"))
    args = parser.parse_args()
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-attack-"))
    log_path = tmp / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, log_path, args.threads)
    try:
        wait_ready(url, proc)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        small = {"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 3}

        def small_latency() -> tuple[float, int]:
            t0 = time.perf_counter()
            status = httpx.post(url + "/v1/chat/completions", json=small, timeout=120).status_code
            return time.perf_counter() - t0, status

        idle = [small_latency()[0] for _ in range(6)][1:]
        statuses: list[int] = []
        stream_errors: list[str] = []
        streams_done: list[bool] = []
        streaming = threading.Barrier(7)

        def stream(i: int) -> None:
            body = small | {"max_tokens": 200, "stream": True, "temperature": 0.8, "seed": i}
            body["messages"] = [{"role": "user", "content": f"Tell a story about the number {i}."}]
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
                statuses.append(r.status_code)
                n, waited = 0, False
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if '"error"' in line:
                        stream_errors.append(line[:200])
                    if n == 3 and not waited:
                        waited = True
                        streaming.wait(timeout=120)
                    if line == "data: [DONE]":
                        streams_done.append(True)
                if not waited:
                    streaming.wait(timeout=120)

        def send(content: bytes) -> None:
            r = httpx.post(
                url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=300
            )
            statuses.append(r.status_code)

        big = json.dumps(small | {"messages": [{"role": "user", "content": "apple banana cherry " * 47_000}]}).encode()
        deep = '{"type": "object", "properties": {"a": ' * 450 + '{"type": "string"}' + "}}" * 450
        deep_tools = (
            json.dumps(small | {"tools": [{"type": "function", "function": {"name": "f", "parameters": "@"}}]})
            .replace('"@"', deep)
            .encode()
        )
        bad = [
            json.dumps(small | b).encode()
            for b in ({"temperature": 1e-40}, {"top_p": 1e-45}, {"temperature": 5e-324, "top_p": 5e-324})
        ] * 2
        streamers = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in streamers:
            t.start()
        streaming.wait(timeout=120)  # the 6 streams have text out
        with_streams = [small_latency()[0] for _ in range(3)]  # the baseline under the same batch: no attack yet
        t_attack = time.perf_counter()
        heads, bodies = stalled_connections(port, 200), stalled_connections(port, 20, body=True)
        under_attack: list[float] = []
        with ThreadPoolExecutor(48) as pool:
            jobs = [pool.submit(send, big) for _ in range(30)]
            jobs += [pool.submit(send, deep_tools) for _ in range(4)]
            jobs += [pool.submit(send, b) for b in bad]
            while not all(j.done() for j in jobs) or len(under_attack) < 5:
                latency, status = small_latency()
                under_attack.append(latency)
                statuses.append(status)
            for j in jobs:
                j.result()
        attack_s = time.perf_counter() - t_attack
        for t in streamers:
            t.join(timeout=300)
        time.sleep(max(0.0, 12 - (time.perf_counter() - t_attack)))  # past the 10 s header timeout
        closed_heads = sum(closed_by_server(s) for s in heads)
        time.sleep(max(0.0, 32 - (time.perf_counter() - t_attack)))  # past the 30 s body timeout
        closed_bodies = sum(closed_by_server(s) for s in bodies)
        for s in heads + bodies:
            s.close()
        # A bounded shutdown: SIGTERM with a half-sent body open.
        holdout = stalled_connections(port, 1, body=True)
        time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        shutdown_s = time.perf_counter() - t0
        holdout[0].close()
        log_text = log_path.read_text(errors="replace")
        result = {
            "model": args.model,
            "small_request_idle_ms_median": round(statistics.median(idle) * 1000),
            "small_request_with_6_streams_no_attack_ms_median": round(statistics.median(with_streams) * 1000),
            "small_request_under_attack_ms_median": round(statistics.median(under_attack) * 1000),
            "small_request_under_attack_ms_max": round(max(under_attack) * 1000),
            "small_requests_under_attack": len(under_attack),
            "attack_seconds": round(attack_s, 1),
            "responses": len(statuses),
            "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "server_errors_5xx": sum(s >= 500 for s in statuses),
            "streams_finished": len(streams_done),
            "stream_error_events": len(stream_errors),
            "stalled_header_connections_closed_after_12s": f"{closed_heads}/200",
            "stalled_body_connections_closed_after_32s": f"{closed_bodies}/20",
            "shutdown_seconds_with_a_half_sent_body": round(shutdown_s, 1),
            "tracebacks_in_server_log": log_text.count("Traceback"),
            "server_log_lines": len(log_text.splitlines()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work while measured)",
        }
        print(json.dumps(result, indent=2))
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    main()
