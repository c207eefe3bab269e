"""Benchmark: loralab's generation engine vs an LLaMA-Factory-style baseline, side by side in one run.

Batch predict: the first N records of the reference alpaca test split (alpaca_data_cleaned.json,
sample 10000, split 7000,2000,1000, seed 42; the built-in demo data when the file is absent),
SmolLM2-135M-Instruct + one LoRA adapter, greedy, max_new_tokens 128, torch threads pinned.

- baseline, as LLaMA-Factory's predict runs it: HF `generate` on the PeftModel (adapter unmerged),
  static batches of 8 in the data's order (unsorted), rows padded until the longest row ends;
- loralab: `Engine(merge=True).generate` (continuous batching, adapter merged into the weights).

The records are cut into chunks; each chunk runs in both tools, alternating which goes first, so
both see the same machine load. Outputs must be identical on every record (fp32 greedy).

Single stream (one chat/API client): `Engine.stream` of today's engine (main's generate.py,
adapter unmerged, as `loralab chat` loaded it) vs this engine, a few records, alternating.

The adapter: a random LoRA adapter (r 8, alpha 16, all linear layers, A as peft initialises it,
B ~ N(0, --adapter-std)), so the model stays fluent and stops by itself while the adapter really
changes its output; no record was trained on. Writes bench/results/generate.json.

    python bench/bench_generate.py                          # 100 records, 1 thread
    python bench/bench_generate.py --records 16 --stream-records 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
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
    return cfg, Path(source).name, prompts[:n], labels[:n]


def make_adapter(base: str, out: Path, std: float, seed: int = 0) -> Path:
    """A random LoRA adapter whose B matrices are small (a fluent model, a changed output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loralab.config import load_config
    from loralab.models import load_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(load_config(None, {"model_name_or_path": base})),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(out)
    return out


def old_engine_class():
    """`Engine` of main's generate.py (HF generate over static batches), loaded as its own module."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", "main:src/loralab/generate.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-old-engine-")) / "loralab_generate_main.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("loralab_generate_main", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Engine, module.GenerationSettings


def lf_style_predict(
    model, tokenizer, prompt_ids: list[list[int]], stop_ids: list[int], max_new_tokens: int, batch_size: int = 8
) -> list[tuple[str, int]]:
    """HF generate on the unmerged PeftModel, static batches in data order: (text, generated tokens) per prompt."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = tokenizer.pad({"input_ids": prompt_ids[start : start + batch_size]}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**batch, generation_config=config)
        for row in ids[:, batch["input_ids"].shape[1] :].tolist():
            end = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
            out.append((tokenizer.decode(row[:end], skip_special_tokens=True), end))
    return out


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100, help="test records for batch predict (default 100)")
    parser.add_argument("--chunks", type=int, default=2, help="chunks the records are cut into (default 2)")
    parser.add_argument("--stream-records", type=int, default=4, help="records for the single-stream figure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="loralab's rows in flight (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter-std", type=float, default=0.02, help="std of the random adapter's B matrices")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "generate.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from loralab.generate import Engine, GenerationSettings

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    cfg, source, prompts, _ = test_prompts(
        max(args.records, args.stream_records),
        tmp / "data",
        {"model_name_or_path": args.model, "torch_threads": args.threads},
    )
    adapter = str(make_adapter(args.model, tmp / "adapter", args.adapter_std))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    engine = Engine(cfg, {"adapter": adapter}, merge=True)
    baseline = Engine(cfg, {"adapter": adapter})  # its PeftModel (unmerged) and tokenizer serve the baseline
    ids = [engine.prompt_ids(p) for p in prompts[: args.records]]
    base_engine = Engine(cfg, {})  # how much the adapter changes the output
    result = {
        "benchmark": "generation: loralab engine vs LLaMA-Factory-style HF generate, same run",
        "model": args.model,
        "adapter": f"random LoRA r8 alpha16 all-linear, lora_B ~ N(0, {args.adapter_std})",
        "data": {
            "source": source,
            "split": "test",
            "records": len(ids),
            "prepare": "sample 10000, split 7000,2000,1000, seed 42",
        },
        "settings": {
            "greedy": True,
            "max_new_tokens": args.max_new_tokens,
            "torch_threads": torch.get_num_threads(),
            "dtype": str(next(engine.model.parameters()).dtype),
            "device": str(engine.device),
            "loralab_rows_in_flight": args.batch_size,
            "baseline_batch_size": 8,
        },
    }
    engine.generate(prompts[:2], GenerationSettings(max_new_tokens=4), adapter="adapter")  # warm-up
    lf_style_predict(baseline.model, baseline.tokenizer, ids[:2], baseline.stop_ids, 4)

    # --- batch predict, chunk by chunk, alternating which tool goes first ---
    size = -(-len(ids) // args.chunks)
    size = -(-size // 8) * 8  # whole baseline batches per chunk
    ours, theirs = [], []
    clock = {"loralab": [0.0, 0.0], "baseline": [0.0, 0.0]}
    for k, start in enumerate(range(0, len(ids), size)):
        part = slice(start, start + size)
        runs = [
            (
                "loralab",
                lambda part=part: engine.generate(
                    prompts[part], settings, adapter="adapter", batch_size=args.batch_size
                ),
            ),
            (
                "baseline",
                lambda part=part: lf_style_predict(
                    baseline.model, baseline.tokenizer, ids[part], baseline.stop_ids, args.max_new_tokens
                ),
            ),
        ]
        for name, fn in runs if k % 2 == 0 else runs[::-1]:
            out, wall, cpu = timed(fn)
            clock[name][0] += wall
            clock[name][1] += cpu
            (ours if name == "loralab" else theirs).extend(
                [(c.text, c.completion_tokens) for c in out] if name == "loralab" else out
            )
        print(
            f"chunk {k + 1}: {len(ours)} records; loralab {clock['loralab'][0]:.0f}s, "
            f"baseline {clock['baseline'][0]:.0f}s",
            flush=True,
        )

    def stats(outs, wall, cpu):
        tokens = sum(n for _, n in outs)
        return {
            "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "samples_per_second": round(len(outs) / wall, 3),
            "samples_per_cpu_second": round(len(outs) / cpu, 3),
            "generated_tokens": tokens,
            "generated_tokens_per_second": round(tokens / wall, 2),
        }

    same = [a[0] == b[0] for a, b in zip(ours, theirs)]
    plain = base_engine.generate(prompts[:16], settings)
    result["batch_predict"] = {
        "loralab": stats(ours, *clock["loralab"]),
        "baseline": stats(theirs, *clock["baseline"]),
        "speedup_wall": round(clock["baseline"][0] / clock["loralab"][0], 2),
        "speedup_cpu": round(clock["baseline"][1] / clock["loralab"][1], 2),
        "identical_outputs": sum(same),
        "differing_records": [i for i, s in enumerate(same) if not s],
        "adapter_changes_output_of_first_16": sum(p.text != o[0] for p, o in zip(plain, ours[:16])),
        "target_3x": clock["baseline"][0] / clock["loralab"][0] >= 3,
    }
    del base_engine
    print(json.dumps(result["batch_predict"], indent=1), flush=True)

    # --- single stream: today's engine vs this one, alternating ---
    OldEngine, OldSettings = old_engine_class()
    old = OldEngine(cfg, {"adapter": adapter})  # today's chat: the adapter loaded unmerged
    old_settings = OldSettings(max_new_tokens=args.max_new_tokens)
    stream = {"old": [0.0, 0, 0.0], "new": [0.0, 0, 0.0]}  # wall seconds, tokens, cpu seconds
    texts = {"old": [], "new": []}
    for k, conv in enumerate(prompts[: args.stream_records]):
        runs = [
            ("new", lambda conv=conv: "".join(engine.stream(conv, settings, adapter="adapter"))),
            ("old", lambda conv=conv: "".join(old.stream(conv, old_settings, adapter="adapter"))),
        ]
        for name, fn in runs if k % 2 == 0 else runs[::-1]:
            text, wall, cpu = timed(fn)
            stream[name][0] += wall
            stream[name][1] += len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            stream[name][2] += cpu
            texts[name].append(text)
    result["single_stream"] = {
        name: {"seconds": round(w, 2), "tokens": n, "tokens_per_second": round(n / w, 2)}
        for name, (w, n, _) in stream.items()
    }
    result["single_stream"].update(
        records=args.stream_records,
        identical_text=sum(a == b for a, b in zip(texts["old"], texts["new"])),
        speedup=round(stream["old"][0] / stream["old"][1] * stream["new"][1] / stream["new"][0], 2),
        note="old = main's generate.py Engine.stream (HF generate, adapter unmerged); new = this Engine, merged",
    )
    result["single_stream"]["target_3x"] = result["single_stream"]["speedup"] >= 3
    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result["single_stream"], indent=1), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
