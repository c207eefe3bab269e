"""Benchmark: loralab's generation engine vs an LLaMA-Factory-style baseline, side by side in one run.

Batch predict: the first N records of the reference alpaca test split (alpaca_data_cleaned.json,
sample 10000, split 7000,2000,1000, seed 42; the built-in demo data when the file is absent),
SmolLM2-135M-Instruct + one LoRA adapter, greedy, max_new_tokens 128, torch threads pinned.

- baseline, as LLaMA-Factory's predict runs it: HF `generate` on the PeftModel (adapter unmerged),
  static batches of 8 in the data's order (unsorted), rows padded until the longest row ends;
- loralab: `Engine(merge=True).generate` (continuous batching, adapter merged into the weights).

The records are cut into chunks; each chunk runs in both tools, alternating which goes first, so
both see the same machine load. Outputs must be identical on every record (fp32 greedy).

Single stream (one chat/API client) is measured by bench_llamacpp.py, beside llama.cpp.

The adapter: a random LoRA adapter (r 8, alpha 16, all linear layers, A as peft initialises it,
B ~ N(0, --adapter-std)), so the model stays fluent and stops by itself while the adapter really
changes its output; no record was trained on. Writes bench/results/generate.json.

    python bench/bench_generate.py                          # 100 records, 1 thread
    python bench/bench_generate.py --records 16
    taskset -c 0 python bench/bench_generate.py --lf-venv ../lf-venv --lf-core 1 --rows 16,32,64

With --lf-venv, LLaMA-Factory 0.9.5's own predict (`llamafactory-cli train`, do_predict) runs on the
same records and adapter in its own process pinned to --lf-core, side by side with the loralab/baseline
chunks (pin this process to another core with taskset); its replies must equal loralab's and its own
predict_samples_per_second is the figure the 3x target is measured against. Both use LF's smollm2 template.
"""

from __future__ import annotations

import argparse
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


def start_lf_predict(lf_venv: Path, cfg, adapter: str, n: int, workdir: Path, batch_size: int, core: int | None):
    """LLaMA-Factory's own predict (`llamafactory-cli train` with do_predict) on the same test records and
    adapter, greedy, fp32 on the CPU, one thread, in its own process (pinned to `core` when given). LF is
    never imported: it runs from its own venv (`bash ../shared/peers/lf-install.sh VENV`)."""
    import yaml

    from loralab.models import resolve_model_path

    cli = lf_venv / "bin" / "llamafactory-cli"
    if not cli.is_file():
        sys.exit(f"--lf-venv: {cli} not found; build the venv with `bash ../shared/peers/lf-install.sh {lf_venv}`")
    model_dir, gguf = resolve_model_path(cfg.model_name_or_path)
    if gguf:
        sys.exit("--lf-venv: LLaMA-Factory needs a model folder, not a .gguf file")
    test_file = Path(cfg.dataset_dir) / f"{cfg.test_dataset or 'alpaca_data_test'}.json"
    lf_data = workdir / "data"
    lf_data.mkdir(parents=True, exist_ok=True)
    (lf_data / "dataset_info.json").write_text(json.dumps({"bench_test": {"file_name": str(test_file)}}))
    args = {
        "model_name_or_path": model_dir,
        "adapter_name_or_path": adapter,
        "stage": "sft",
        "do_predict": True,
        "finetuning_type": "lora",
        "eval_dataset": "bench_test",
        "dataset_dir": str(lf_data),
        "template": cfg.template,
        "cutoff_len": cfg.cutoff_len,
        "max_samples": n,
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": False,
        "per_device_eval_batch_size": batch_size,
        "predict_with_generate": True,
        "output_dir": str(workdir / "out"),
        "overwrite_output_dir": True,
        "report_to": "none",
        "preprocessing_num_workers": 1,
    }
    (workdir / "predict.yaml").write_text(yaml.safe_dump(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    command = [str(cli), "train", str(workdir / "predict.yaml")]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    log = open(workdir / "lf.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def finish_lf_predict(process, started: float, workdir: Path) -> tuple[list[str], dict]:
    """Wait for LF's predict; its replies in record order and its own timing (predict_results.json)."""
    if process.wait() != 0:
        tail = (workdir / "lf.log").read_text()[-3000:]
        sys.exit(f"LLaMA-Factory's predict failed (log {workdir / 'lf.log'}):\n{tail}")
    wall = time.perf_counter() - started
    out = workdir / "out"
    replies = [json.loads(line)["predict"] for line in (out / "generated_predictions.jsonl").open()]
    own = json.loads((out / "predict_results.json").read_text())
    timing = {k: v for k, v in own.items() if k.endswith(("runtime", "per_second"))}  # not its BLEU/ROUGE
    return replies, {"process_seconds_with_loading": round(wall, 2), **timing}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100, help="test records for batch predict (default 100)")
    parser.add_argument("--chunks", type=int, default=2, help="chunks the records are cut into (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="loralab's rows in flight (default: infer_batch_size's default)"
    )
    parser.add_argument(
        "--rows", default="", help="also time loralab alone over all records at these rows in flight, e.g. 16,32,64"
    )
    parser.add_argument("--lf-venv", type=Path, help="an LLaMA-Factory 0.9.5 venv: also run LF's own predict")
    parser.add_argument("--lf-core", type=int, default=1, help="CPU core LF's process is pinned to (default 1)")
    parser.add_argument("--lf-batch-size", type=int, default=8, help="LF's per_device_eval_batch_size (default 8)")
    parser.add_argument("--template", help="chat template (default: the tokenizer's; smollm2 with --lf-venv)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter", help="a trained LoRA adapter folder (default: a random one, see above)")
    parser.add_argument("--adapter-std", type=float, default=0.02, help="std of the random adapter's B matrices")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "generate.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from loralab.config import Config
    from loralab.generate import Engine, GenerationSettings

    args.batch_size = args.batch_size or Config.model_fields["infer_batch_size"].default
    template = args.template or ("smollm2" if args.lf_venv else None)

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    cfg, source, prompts, _ = test_prompts(
        args.records,
        tmp / "data",
        {
            "model_name_or_path": args.model,
            "torch_threads": args.threads,
            "template": template,
            "max_new_tokens": args.max_new_tokens,
        },
    )
    adapter = args.adapter or str(make_adapter(args.model, tmp / "adapter", args.adapter_std))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    engine = Engine(cfg, {"adapter": adapter}, merge=True)
    baseline = Engine(cfg, {"adapter": adapter})  # its PeftModel (unmerged) and tokenizer serve the baseline
    ids = [engine.prompt_ids(p) for p in prompts[: args.records]]
    base_engine = Engine(cfg, {})  # how much the adapter changes the output
    result = {
        "benchmark": "generation: loralab engine vs LLaMA-Factory-style HF generate, same run",
        "model": args.model,
        "adapter": args.adapter or f"random LoRA r8 alpha16 all-linear, lora_B ~ N(0, {args.adapter_std})",
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
            "template": template or "the tokenizer's own",
        },
    }
    engine.generate(prompts[:2], GenerationSettings(max_new_tokens=4), adapter="adapter")  # warm-up
    lf_style_predict(baseline.model, baseline.tokenizer, ids[:2], baseline.stop_ids, 4)

    lf = None
    if args.lf_venv:  # LLaMA-Factory itself runs side by side, on its own core, while the chunks below run
        lf = start_lf_predict(args.lf_venv, cfg, adapter, len(ids), tmp / "lf", args.lf_batch_size, args.lf_core)

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
    if lf is not None:
        lf_replies, lf_clock = finish_lf_predict(*lf, tmp / "lf")
        ours_sps = len(ours) / clock["loralab"][0]
        lf_sps = len(lf_replies) / lf_clock["predict_runtime"]  # LF's own clock: generation, no loading
        result["batch_predict"]["llamafactory"] = {
            "version": "0.9.5 (its own `llamafactory-cli train` predict, fp32 CPU, one thread, own core)",
            "per_device_eval_batch_size": args.lf_batch_size,
            **lf_clock,
            "identical_to_loralab": sum(a[0] == b for a, b in zip(ours, lf_replies)),
            "differing_records": [i for i, (a, b) in enumerate(zip(ours, lf_replies)) if a[0] != b],
            "loralab_speedup": round(ours_sps / lf_sps, 2),
            "target_3x": ours_sps / lf_sps >= 3,
        }
    rows = {}
    for n in [int(x) for x in args.rows.split(",") if x.strip()]:  # which rows-in-flight default is fastest
        _, wall, _ = timed(lambda n=n: engine.generate(prompts[: len(ids)], settings, adapter="adapter", batch_size=n))
        rows[n] = round(len(ids) / wall, 3)
    if rows:
        result["batch_predict"]["rows_in_flight_samples_per_second"] = rows
        result["batch_predict"]["fastest_rows_in_flight"] = max(rows, key=rows.get)
    print(json.dumps(result["batch_predict"], indent=1), flush=True)

    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
