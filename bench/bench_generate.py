"""Benchmark: batched greedy generation vs one prompt at a time, same engine, same prompts.

SmolLM2-135M-Instruct (builtin) on the first N records of the reference alpaca test split
(alpaca_data_cleaned.json, sample 10000, split 7000,2000,1000, seed 42; the built-in demo data when
the file is absent), greedy, max_new_tokens 128, torch threads pinned. Prints samples/s and
generated tokens/s for both modes, how many of the N outputs are identical, and writes
bench/results/generate.json (after every batch, so a long run leaves partial figures).

The engine's batches (prompts sorted by length, batch_size at a time) are timed one by one, each
followed by the same prompts one at a time, so both modes run under the same machine load. Besides
wall-clock time, the process CPU time is reported: with pinned threads it does not depend on other
programs sharing the machine.

    python bench/bench_generate.py                 # 200 records, 1 thread
    python bench/bench_generate.py --records 40 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("LORALAB_ALPACA", REPO.parent / "shared" / "data" / "alpaca_data_cleaned.json"))


def test_prompts(n: int, workdir: Path, cfg_values: dict):
    """The first n (prompt, label) pairs of the reference test split, prepared into workdir."""
    from loralab import data
    from loralab.config import load_config
    from loralab.evaluate import load_examples

    source = str(ALPACA) if ALPACA.is_file() else data.DEMO_SOURCE
    if source == data.DEMO_SOURCE:
        print(f"note: {ALPACA} not found, using the built-in demo data", file=sys.stderr)
        data.prepare(source, output_dir=workdir, seed=42, split="0.7,0.2,0.1")
    else:
        data.prepare(source, output_dir=workdir, seed=42, sample=10000, split="7000,2000,1000")
    cfg = load_config(None, {**cfg_values, "dataset_dir": str(workdir), "max_samples": n})
    prompts, labels, _ = load_examples(cfg, "test")
    return cfg, source, prompts[:n], labels[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200, help="test records to generate for (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the batched run (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "generate.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from loralab.generate import Engine, GenerationSettings

    with tempfile.TemporaryDirectory() as tmp:
        cfg, source, prompts, _ = test_prompts(args.records, Path(tmp), {"model_name_or_path": args.model})
    engine = Engine(cfg, {})
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:2], GenerationSettings(max_new_tokens=4), batch_size=2)  # warm-up (one-time costs)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    # The engine's own batching order: longest prompt first, batch_size at a time.
    order = sorted(range(len(prompts)), key=lambda i: -len(engine.prompt_ids(prompts[i])))
    batched, single = [None] * len(prompts), [None] * len(prompts)
    clock = {"batched": [0.0, 0.0], "one_at_a_time": [0.0, 0.0]}  # [wall, cpu] seconds
    done = 0
    for start in range(0, len(order), args.batch_size):
        chunk = order[start: start + args.batch_size]
        outs, wall, cpu = timed(lambda: engine.generate([prompts[i] for i in chunk], settings, batch_size=args.batch_size))
        clock["batched"][0] += wall
        clock["batched"][1] += cpu
        for i, o in zip(chunk, outs):
            batched[i] = o
        for i in chunk:
            (o,), wall, cpu = timed(lambda: engine.generate([prompts[i]], settings, batch_size=1))
            clock["one_at_a_time"][0] += wall
            clock["one_at_a_time"][1] += cpu
            single[i] = o
        done += len(chunk)
        report(args, engine, source, order[:done], [batched[i] for i in order[:done]],
               [single[i] for i in order[:done]], clock, torch, final=done == len(order))


def report(args, engine, source, records, batched, single, clock, torch, final: bool) -> None:
    """Write bench/results/generate.json for the records done so far; print the summary at the end."""

    def stats(outs, wall, cpu):
        tokens = sum(c.completion_tokens for c in outs)
        return {"seconds": round(wall, 2), "samples_per_second": round(len(outs) / wall, 3),
                "generated_tokens": tokens, "generated_tokens_per_second": round(tokens / wall, 2),
                "cpu_seconds": round(cpu, 2), "samples_per_cpu_second": round(len(outs) / cpu, 3),
                "generated_tokens_per_cpu_second": round(tokens / cpu, 2),
                "hit_max_new_tokens": sum(c.finish_reason == "length" for c in outs)}

    differ = [i for i, (a, b) in enumerate(zip(batched, single)) if a.text != b.text]
    divergence = []
    for i in differ:  # where the texts part: a near-tie between two tokens, decided differently in fp32
        a, b = batched[i].text, single[i].text
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        divergence.append({"record": records[i], "first_diff_char": at, "batched_len": len(a), "single_len": len(b)})
    result = {
        "benchmark": "batched vs one-at-a-time greedy generation (loralab.generate.Engine)",
        "complete": final,
        "model": args.model,
        "data": {"source": source, "split": "test", "records": len(batched), "records_requested": args.records,
                 "prepare": "sample 10000, split 7000,2000,1000, seed 42" if source != "builtin:demo" else "demo"},
        "settings": {"greedy": True, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "torch_threads": torch.get_num_threads(), "dtype": str(next(engine.model.parameters()).dtype),
                     "device": str(engine.device)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__},
        "batched": stats(batched, *clock["batched"]),
        "one_at_a_time": stats(single, *clock["one_at_a_time"]),
        "speedup_wall": round(clock["one_at_a_time"][0] / clock["batched"][0], 2),
        "speedup_cpu": round(clock["one_at_a_time"][1] / clock["batched"][1], 2),
        "identical_outputs": len(batched) - len(differ),
        "differing_outputs": divergence,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    b, s = result["batched"], result["one_at_a_time"]
    print(f"{len(batched)}/{args.records} records, {args.model}, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{result['settings']['torch_threads']} thread(s), {result['settings']['device']}", flush=True)
    if not final:
        return
    for name, x in (("batched (bs %d)" % args.batch_size, b), ("one at a time", s)):
        print(f"{name:<16} {x['samples_per_second']:.3f} samples/s, {x['generated_tokens_per_second']:.1f} tokens/s "
              f"(per CPU second: {x['samples_per_cpu_second']:.3f} samples, {x['generated_tokens_per_cpu_second']:.1f} tokens)")
    print(f"speedup {result['speedup_wall']:.2f}x wall clock, {result['speedup_cpu']:.2f}x CPU time; "
          f"identical outputs {result['identical_outputs']}/{len(batched)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
