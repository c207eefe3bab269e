"""Benchmark: batched greedy generation vs one prompt at a time, same engine, same prompts.

SmolLM2-135M-Instruct (builtin) on the first N records of the reference alpaca test split
(alpaca_data_cleaned.json, sample 10000, split 7000,2000,1000, seed 42; the built-in demo data when
the file is absent), greedy, max_new_tokens 128, torch threads pinned. Prints samples/s and
generated tokens/s for both modes, how many of the N outputs are identical, and writes
bench/results/generate.json.

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
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    batched, t_batched = timed(lambda: engine.generate(prompts, settings, batch_size=args.batch_size, progress=True))
    single, t_single = timed(lambda: [engine.generate([p], settings, batch_size=1)[0] for p in prompts])

    def stats(outs, seconds):
        tokens = sum(c.completion_tokens for c in outs)
        return {"seconds": round(seconds, 2), "samples_per_second": round(len(outs) / seconds, 3),
                "generated_tokens": tokens, "generated_tokens_per_second": round(tokens / seconds, 2),
                "hit_max_new_tokens": sum(c.finish_reason == "length" for c in outs)}

    differ = [i for i, (a, b) in enumerate(zip(batched, single)) if a.text != b.text]
    divergence = []
    for i in differ:  # where the texts part: a near-tie between two tokens, decided differently in fp32
        a, b = batched[i].text, single[i].text
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        divergence.append({"index": i, "first_diff_char": at, "batched_len": len(a), "single_len": len(b)})
    result = {
        "benchmark": "batched vs one-at-a-time greedy generation (loralab.generate.Engine)",
        "model": args.model,
        "data": {"source": source, "split": "test", "records": len(prompts),
                 "prepare": "sample 10000, split 7000,2000,1000, seed 42" if source != "builtin:demo" else "demo"},
        "settings": {"greedy": True, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "torch_threads": torch.get_num_threads(), "dtype": str(next(engine.model.parameters()).dtype),
                     "device": str(engine.device)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "batched": stats(batched, t_batched),
        "one_at_a_time": stats(single, t_single),
        "speedup_samples_per_second": round(t_single / t_batched, 2),
        "identical_outputs": len(prompts) - len(differ),
        "differing_outputs": divergence,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    b, s = result["batched"], result["one_at_a_time"]
    print(f"{len(prompts)} records, {args.model}, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{result['settings']['torch_threads']} thread(s), {result['settings']['device']}")
    print(f"batched (bs {args.batch_size}): {b['samples_per_second']:.3f} samples/s, {b['generated_tokens_per_second']:.1f} tokens/s")
    print(f"one at a time:     {s['samples_per_second']:.3f} samples/s, {s['generated_tokens_per_second']:.1f} tokens/s")
    print(f"speedup {result['speedup_samples_per_second']:.2f}x; identical outputs {result['identical_outputs']}/{len(prompts)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
