"""Benchmark: infer_backend llamacpp (the exported f16 and q8_0 GGUFs) vs the HF engine, side by side in one run.

SmolLM2-135M-Instruct + one LoRA adapter (--adapter: a trained one, e.g. the demo's `runs/demo/adapter`;
default: bench_generate's random adapter), merged and exported with `export_gguf=f16,q8_0`. The first N
records of the reference alpaca test split, greedy, max_new_tokens 128, one thread per backend (pin the
process to one core: `taskset -c 0`).

- parity: each GGUF's greedy replies on llama.cpp vs the HF engine's (fp32, adapter merged): identical
  replies, mean common prefix (characters, and as a share of the HF reply), prompt ids identical;
- batch predict samples/s: the records in chunks, each chunk run by all three backends in rotating order
  (same machine load for each); the HF engine at the infer_batch_size default, llama.cpp one row at a time;
- single stream tokens/s: `Engine.stream` of a few records by each backend, rotating order.

Targets (issue 22): f16 identical replies >= 90%; single stream q8_0 >= 5x the HF engine.
Writes bench/results/llamacpp.json.

    taskset -c 0 python bench/bench_llamacpp.py --adapter runs/demo/adapter
    python bench/bench_llamacpp.py --records 8 --stream-records 1 --max-new-tokens 16    # a quick check
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import REPO, make_adapter, test_prompts, timed  # noqa: E402

BACKENDS = ("huggingface", "llamacpp_f16", "llamacpp_q8_0")


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100, help="test records (default 100)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks the records are cut into (default 4)")
    parser.add_argument("--stream-records", type=int, default=4, help="records for the single-stream figure")
    parser.add_argument("--threads", type=int, default=1, help="threads per backend (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter", help="a trained LoRA adapter folder (default: a random one, see bench_generate)")
    parser.add_argument("--adapter-std", type=float, default=0.02, help="std of the random adapter's B matrices")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "llamacpp.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from loralab.config import load_config
    from loralab.export import export
    from loralab.generate import Engine, GenerationSettings

    tmp = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    values = {"model_name_or_path": args.model, "torch_threads": args.threads, "max_new_tokens": args.max_new_tokens}
    cfg, source, prompts, _ = test_prompts(max(args.records, args.stream_records), tmp / "data", values)
    adapter = args.adapter or str(make_adapter(args.model, tmp / "adapter", args.adapter_std))

    started = time.perf_counter()
    folder = export(
        load_config(
            None,
            {**values, "adapter_name_or_path": adapter, "export_dir": str(tmp / "export"), "export_gguf": "f16,q8_0"},
        )
    )
    export_seconds = time.perf_counter() - started
    engines = {
        "huggingface": (Engine(cfg, {"adapter": adapter}, merge=True), "adapter"),
        **{
            f"llamacpp_{kind}": (
                Engine(
                    cfg.model_copy(
                        update={"model_name_or_path": str(folder / f"model-{kind}.gguf"), "infer_backend": "llamacpp"}
                    ),
                    {},
                ),
                None,
            )
            for kind in ("f16", "q8_0")
        },
    }
    tokenizer = engines["huggingface"][0].tokenizer
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    records = prompts[: args.records]
    same_prompt_ids = {
        name: sum(engine.prompt_ids(p) == engines["huggingface"][0].prompt_ids(p) for p in records)
        for name, (engine, _) in engines.items()
    }
    for engine, adapter_name in engines.values():  # warm-up
        engine.generate(records[:1], GenerationSettings(max_new_tokens=4), adapter=adapter_name)

    # --- batch predict, chunk by chunk, rotating which backend goes first ---
    replies = {name: [] for name in BACKENDS}
    clock = {name: 0.0 for name in BACKENDS}
    size = -(-len(records) // args.chunks)
    for k, start in enumerate(range(0, len(records), size)):
        order = BACKENDS[k % 3 :] + BACKENDS[: k % 3]
        for name in order:
            engine, adapter_name = engines[name]
            out, wall, _ = timed(
                lambda engine=engine, adapter_name=adapter_name, start=start: engine.generate(
                    records[start : start + size], settings, adapter=adapter_name, batch_size=cfg.infer_batch_size
                )
            )
            clock[name] += wall
            replies[name].extend(out)
        print(f"chunk {k + 1}: " + ", ".join(f"{n} {clock[n]:.0f}s" for n in BACKENDS), flush=True)

    hf = [c.text for c in replies["huggingface"]]
    result = {
        "benchmark": "llama.cpp (exported f16 / q8_0 GGUF) vs loralab's HF engine, same run",
        "model": args.model,
        "adapter": args.adapter or f"random LoRA r8 alpha16 all-linear, lora_B ~ N(0, {args.adapter_std})",
        "data": {"source": source, "split": "test", "records": len(records)},
        "settings": {
            "greedy": True,
            "max_new_tokens": args.max_new_tokens,
            "threads": args.threads,
            "huggingface": f"fp32, adapter merged, infer_batch_size {cfg.infer_batch_size}",
            "llamacpp": "llama-cpp-python, merged model GGUF, one row at a time",
        },
        "export_seconds": round(export_seconds, 1),
        "prompt_ids_identical_to_hf": same_prompt_ids,
        "batch_predict": {},
        "parity": {},
    }
    for name in BACKENDS:
        tokens = sum(c.completion_tokens for c in replies[name])
        result["batch_predict"][name] = {
            "seconds": round(clock[name], 2),
            "samples_per_second": round(len(records) / clock[name], 3),
            "generated_tokens_per_second": round(tokens / clock[name], 2),
        }
        if name == "huggingface":
            continue
        texts = [c.text for c in replies[name]]
        prefixes = [common_prefix(a, b) for a, b in zip(hf, texts)]
        same = [a == b for a, b in zip(hf, texts)]
        result["parity"][name] = {
            "identical_replies": sum(same),
            "identical_share": round(sum(same) / len(same), 3),
            "mean_common_prefix_chars": round(sum(prefixes) / len(prefixes), 1),
            "mean_common_prefix_share_of_hf_reply": round(
                sum(p / max(len(a), 1) for p, a in zip(prefixes, hf)) / len(hf), 3
            ),
            "differing_records": [i for i, s in enumerate(same) if not s],
            "where_they_part": {  # the text around the first differing character, HF's and this backend's
                i: {"hf": hf[i][max(0, p - 40) : p + 40], name: texts[i][max(0, p - 40) : p + 40]}
                for i, (p, s) in enumerate(zip(prefixes, same))
                if not s
            },
        }
        result["batch_predict"][name]["speedup_vs_hf"] = round(clock["huggingface"] / clock[name], 2)
    result["parity"]["target_f16_90pct"] = result["parity"]["llamacpp_f16"]["identical_share"] >= 0.9
    print(json.dumps({"parity": result["parity"], "batch_predict": result["batch_predict"]}, indent=1), flush=True)

    # --- single stream, rotating order ---
    stream = {name: [0.0, 0] for name in BACKENDS}
    for k, conv in enumerate(prompts[: args.stream_records]):
        for name in BACKENDS[k % 3 :] + BACKENDS[: k % 3]:
            engine, adapter_name = engines[name]
            text, wall, _ = timed(
                lambda engine=engine, adapter_name=adapter_name, conv=conv: "".join(
                    engine.stream(conv, settings, adapter=adapter_name)
                )
            )
            stream[name][0] += wall
            stream[name][1] += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    rate = {name: n / w for name, (w, n) in stream.items()}
    result["single_stream"] = {
        name: {
            "seconds": round(w, 2),
            "tokens": n,
            "tokens_per_second": round(rate[name], 2),
            "speedup_vs_hf": round(rate[name] / rate["huggingface"], 2),
        }
        for name, (w, n) in stream.items()
    }
    result["single_stream"]["records"] = args.stream_records
    result["single_stream"]["target_q8_0_5x"] = rate["llamacpp_q8_0"] / rate["huggingface"] >= 5
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
