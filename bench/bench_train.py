"""Benchmark: LoRA training throughput, padding and memory, loralab's setup vs the common baseline.

SmolLM2-135M-Instruct (builtin), LoRA r=8 on all linear projections, batch 8, cutoff_len 512, a fixed
number of optimizer steps on the first N records of the real alpaca data (the built-in demo data when
the file is absent), torch threads pinned. Two configurations, each in its own subprocess (so peak
RSS is per configuration):

  baseline  what LLaMA-Factory users get by default: random batch order, per-batch dynamic padding,
            gradient checkpointing on, 8 sequences per forward pass, the model's own loss (all logits)
  loralab   loralab's defaults: length-grouped batches (seeded), no gradient checkpointing (no
            recomputation), the batch of 8 in passes of at most 1,024 tokens (max_tokens_per_pass unset
            on CPU: the same optimizer step and loss), and the chunked cross-entropy (logits only for
            label positions, a checkpointed chunk at a time: train.chunked_lm_loss)

For each: non-padding tokens/s (steps 2..N; step 1 is warm-up), padding efficiency (non-padding /
all tokens processed), peak RSS, and model FLOP/s as a fraction of this machine's fp32 matmul FLOP/s
at the same thread count (a 2048^3 torch.matmul, measured in the same subprocess right before).
Peak RSS is measured twice per configuration, each in its own subprocess: over the timed steps, and
over one step on the 8 longest records (the worst batch an epoch can hold, whatever the order), so a
short random sample of batches cannot hide the memory a long batch needs.

Model FLOPs per non-padding token (LoRA, honest count): forward 2*N + backward activation gradients
2*N + LoRA weight gradients 2*N_lora, where N = all parameters (base + LoRA; the tied embedding counts
once, as the lm_head matmul) and N_lora = trainable parameters. Recomputation by gradient
checkpointing, attention-score FLOPs and padding tokens are not counted (they are not model FLOPs).

    python bench/bench_train.py                    # 2000 records, 10 steps, 1 thread
    python bench/bench_train.py --records 500 --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("LORALAB_ALPACA", REPO.parent / "shared" / "data" / "alpaca_data_cleaned.json"))
# The data file as the results record it: as given in LORALAB_ALPACA, else relative to the repo (no
# absolute path of the machine that ran it).
ALPACA_SHOWN = os.environ.get("LORALAB_ALPACA") or os.path.relpath(ALPACA, REPO)
CONFIGS = {  # batch 8 = per_device_train_batch_size x gradient_accumulation_steps in both
    "baseline": {
        "group_by_length": False,
        "gradient_checkpointing": True,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_tokens_per_pass": 0,  # the whole batch in one pass
    },
    "loralab": {  # the defaults of loralab's config, written out
        "group_by_length": True,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
    },
}
FORMULA = "model FLOPs = non-padding tokens * (4 * N_all + 2 * N_trainable)"


def matmul_flops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps fp32 FLOP/s of an n x n x n torch.matmul at the given thread count."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def write_records(n: int, folder: Path, model: str, batch: int, cutoff: int) -> tuple[Path, Path, str, dict]:
    """The first n records of the real alpaca data (or the demo data) as one JSON file, the `batch`
    longest of them (in tokens, as trained) as another, and their length statistics."""
    from loralab import data
    from loralab.config import load_config
    from loralab.models import load_tokenizer
    from loralab.train import encode_split

    source = str(ALPACA) if ALPACA.is_file() else data.DEMO_SOURCE
    if source == data.DEMO_SOURCE:
        print(f"note: {ALPACA} not found, using the built-in demo data", file=sys.stderr)
    records, spec, _ = data.load_source(source)
    records = records[:n]
    cfg = load_config(None, {"model_name_or_path": model, "cutoff_len": cutoff})
    tokenizer = load_tokenizer(cfg)
    lengths = [
        len(encode_split(tokenizer, [c], cfg)[0][0]["input_ids"]) for c in data.to_conversations(records, spec, source)
    ]
    longest = sorted(range(len(records)), key=lambda i: lengths[i])[-batch:]
    path, worst = folder / "records.json", folder / "longest.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    worst.write_text(json.dumps([records[i] for i in longest], ensure_ascii=False))
    stats = {
        "mean_tokens": sum(lengths) / len(lengths),
        "max_tokens": max(lengths),
        "longest_batch_tokens": [lengths[i] for i in longest],
    }
    return path, worst, source, stats


def worker(args) -> dict:
    """One configuration: measure matmul FLOP/s, train, report (runs in its own process)."""
    import torch

    from loralab import train as train_module
    from loralab.config import load_config
    from loralab.train import train

    peak_flops = 0.0 if args.probe else matmul_flops(args.threads)
    if args.worker == "baseline":  # LLaMA-Factory's loss: the model's own cross-entropy over all logits
        train_module.PLAIN_LM_HEAD_MODELS = frozenset()
    cfg = load_config(
        None,
        {
            "model_name_or_path": args.model,
            "dataset": args.data,
            "eval_dataset": None,
            "eval_strategy": "no",
            "output_dir": args.output_dir,
            "overwrite_output_dir": True,
            "max_steps": args.steps,
            "cutoff_len": args.cutoff,
            "lora_rank": 8,
            "lora_target": "all",
            "logging_steps": 1,
            "save_steps": 10**6,
            "torch_threads": args.threads,
            "learning_rate": 1e-4,
            "seed": 42,
            **CONFIGS[args.worker],
        },
    )
    summary = train(cfg)
    if args.probe:  # the worst-batch memory probe: only the peak RSS matters
        return {
            "config": args.worker,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": summary["tokens_seen"],
        }
    steps = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    # Steps 2..N: per-step tokens and time from the per-step log (tokens_per_s = tokens / step time).
    tokens = seconds = 0.0
    for prev, cur in zip(steps, steps[1:]):
        n = cur["tokens_seen"] - prev["tokens_seen"]
        tokens += n
        seconds += n / cur["tokens_per_s"]
    # The machine is shared: take the better of two matmul measurements (a conservative fraction).
    peak_flops = max(peak_flops, matmul_flops(args.threads))
    n_all, n_trainable = summary["parameters"]["total"], summary["parameters"]["trainable"]
    model_flops = tokens * (4 * n_all + 2 * n_trainable)
    return {
        "config": args.worker,
        **CONFIGS[args.worker],
        "steps": summary["steps"],
        "tokens_per_s": tokens / seconds,
        "padding_efficiency": summary["padding_efficiency"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_flops_per_s": model_flops / seconds,
        "matmul_flops_per_s": peak_flops,
        "flops_fraction": model_flops / seconds / peak_flops,
        "parameters": summary["parameters"],
        "measured_steps": len(steps) - 1,
        "measured_tokens": tokens,
        "measured_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="first N records of the data (default 2000)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "train.json"))
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import logging

        from loralab.log import setup_logging

        setup_logging()
        logging.getLogger("loralab").setLevel(logging.WARNING)
        print(json.dumps(worker(args)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    batch = 8
    with tempfile.TemporaryDirectory() as tmp:
        data_file, longest_file, source, stats = write_records(args.records, Path(tmp), args.model, batch, args.cutoff)
        print(
            f"{args.records} records: mean {stats['mean_tokens']:.0f} tokens, longest {stats['max_tokens']}",
            file=sys.stderr,
        )

        def run_worker(name: str, data: Path, steps: int) -> dict:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--data",
                str(data),
                "--output-dir",
                str(Path(tmp) / f"{name}-{steps}"),
                "--steps",
                str(steps),
                "--threads",
                str(args.threads),
                "--cutoff",
                str(args.cutoff),
                "--model",
                args.model,
            ] + (["--probe"] if steps == 1 else [])
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.exit(f"{name} failed:\n{run.stderr[-4000:]}")
            return json.loads(run.stdout.strip().splitlines()[-1])

        for name in CONFIGS:
            print(f"running {name} ({args.steps} steps, {args.threads} thread(s)) ...", file=sys.stderr, flush=True)
            results[name] = run_worker(name, data_file, args.steps)
            print(f"running {name} on the {batch} longest records (peak memory) ...", file=sys.stderr, flush=True)
            results[name]["worst_batch_peak_rss_mb"] = run_worker(name, longest_file, 1)["peak_rss_mb"]

    base, ours = results["baseline"], results["loralab"]
    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    targets = {
        "padding_efficiency >= 0.95": ours["padding_efficiency"] >= 0.95,
        "tokens/s >= 3x baseline": speedup >= 3,
        "peak RSS <= baseline (timed steps)": ours["peak_rss_mb"] <= base["peak_rss_mb"],
        "peak RSS <= baseline (longest batch)": ours["worst_batch_peak_rss_mb"] <= base["worst_batch_peak_rss_mb"],
        "model FLOP/s >= 50% of matmul": ours["flops_fraction"] >= 0.5,
    }
    report = {
        "benchmark": "train",
        "model": args.model,
        "data": {"source": ALPACA_SHOWN if source == str(ALPACA) else source, "records": args.records, **stats},
        "settings": {
            "steps": args.steps,
            "batch_size": batch,
            "cutoff_len": args.cutoff,
            "lora_rank": 8,
            "lora_target": "all",
            "threads": args.threads,
        },
        "flops_formula": FORMULA,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "results": results,
        "speedup_tokens_per_s": speedup,
        "targets": targets,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{'config':<10} {'tokens/s':>9} {'pad eff':>8} {'RSS MB':>7} {'RSS MB longest':>15} "
        f"{'model GFLOP/s':>14} {'matmul GFLOP/s':>15} {'fraction':>9}"
    )
    for r in (base, ours):
        print(
            f"{r['config']:<10} {r['tokens_per_s']:>9.1f} {r['padding_efficiency']:>8.3f} {r['peak_rss_mb']:>7.0f} "
            f"{r['worst_batch_peak_rss_mb']:>15.0f} {r['model_flops_per_s'] / 1e9:>14.2f} "
            f"{r['matmul_flops_per_s'] / 1e9:>15.2f} {r['flops_fraction']:>9.2f}"
        )
    print(f"speedup (non-padding tokens/s): {speedup:.2f}x   formula: {FORMULA}")
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
