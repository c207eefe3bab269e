"""GPU speed, side by side in one run (issue 23): training tokens/s and MFU, generation tokens/s.

A prepared call for a GPU machine without hub access (the wheels of bench/gpu_wheels.sh carried, as for
gpu_check.sh): the model is made there, randomly initialised with Llama-3.2-1B's shape (bf16), and the data
are the first records of the real alpaca file (the demo data when absent).

  training    loralab's GPU defaults (bf16, fill_batches, chunked loss) vs a plain transformers Trainer +
              peft LoRA, both at LLaMA-Factory's example recipe: batch 1 x accumulation 8, cutoff 2048,
              LoRA r8 on all linear layers; non-padding tokens/s over steps 3..N and MFU against a bf16
              matmul measured in the same process (the formula of gpu_check: 4 N_matmul + 2 N_trainable
              FLOPs a token)
  generation  128 alpaca test prompts, 128 new tokens, greedy, adapter merged: loralab's engine at 128 and
              32 rows, transformers' `generate` on the unmerged PeftModel in batches of 8 (as LLaMA-Factory
              predicts) and 64, transformers' continuous batching (`generate_batch`), and one stream alone;
              generated tokens/s, and how many replies equal the engine's

    python bench/gpu_speed.py --out $OUT/gpu_speed.json            # on the GPU, ~5 minutes
    python bench/gpu_speed.py --tiny --out /tmp/gpu_speed.json      # the same code on a CPU, tiny sizes (CI)

Targets (issue 23, H200): training >= 30% of the measured bf16 matmul and >= 2x the baseline; generation
>= 40,000 tokens/s at 128 rows, single stream >= 200 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (its model maker, data slice and FLOP arithmetic)

LF_RECIPE = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "cutoff_len": 2048}


def sizes(tiny: bool) -> dict:
    if tiny:
        return {
            "shape": gpu_check.TINY_LLAMA_SHAPE,
            "steps": 4,
            "prompts": 6,
            "new_tokens": 8,
            "rows": (6, 2),
            "hf_batches": (2, 4),
        }
    return {
        "shape": gpu_check.LLAMA_3_2_1B_SHAPE,
        "steps": 30,
        "prompts": 128,
        "new_tokens": 128,
        "rows": (128, 32),
        "hf_batches": (8, 64),
    }


def measured_matmul_flops(device: str) -> float:
    import torch

    n = 8192 if device == "cuda" else 512
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(8):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --- training ------------------------------------------------------------------------------------
def train_loralab(model: Path, data_dir: Path, out: Path, steps: int) -> dict:
    """`loralab train` with its defaults for the device (bf16 and fill_batches on a GPU) at LF's recipe."""
    from loralab.config import load_config
    from loralab.train import train

    cfg = load_config(
        None,
        {
            "model_name_or_path": str(model),
            "dataset_dir": str(data_dir),
            "dataset": "alpaca_data_train",
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "max_steps": steps,
            "lora_rank": 8,
            "lora_target": "all",
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "save_steps": 10**6,
            "seed": 42,
            **LF_RECIPE,
        },
    )
    summary = train(cfg)
    return {"tokens_per_s": summary["tokens_per_s"], "steps": summary["steps"], "train_loss": summary["train_loss"]}


def train_baseline(model: Path, data_dir: Path, out: Path, steps: int, bf16: bool) -> dict:
    """transformers Trainer + peft, LLaMA-Factory's recipe, the model's own loss, random order, dynamic padding."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from loralab import data
    from loralab.config import load_config
    from loralab.models import load_tokenizer
    from loralab.train import encode_split

    cfg = load_config(
        None,
        {"model_name_or_path": str(model), "dataset_dir": str(data_dir), "dataset": "alpaca_data_train", **LF_RECIPE},
    )
    tokenizer = load_tokenizer(cfg)
    examples, _ = encode_split(tokenizer, data.load_conversations(cfg, "train"), cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    peft_model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    )
    timer = StepTimer()
    trainer = transformers.Trainer(
        model=peft_model,
        args=transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            learning_rate=1e-4,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=42,
            include_num_input_tokens_seen="non_padding",
            per_device_train_batch_size=LF_RECIPE["per_device_train_batch_size"],
            gradient_accumulation_steps=LF_RECIPE["gradient_accumulation_steps"],
        ),
        train_dataset=examples,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[timer],
    )
    result = trainer.train()
    return {"tokens_per_s": timer.tokens_per_s(), "steps": steps, "train_loss": result.training_loss}


class StepTimer:
    """Seconds of optimizer steps 3..N and the non-padding tokens they consumed (from the Trainer's count)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.start = self.tokens_at_start = None
                self.seconds = 0.0
                self.tokens = 0

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if state.global_step == 2:
                    self.start, self.tokens_at_start = now, state.num_input_tokens_seen
                elif self.start is not None:
                    self.seconds, self.tokens = now - self.start, state.num_input_tokens_seen - self.tokens_at_start

            def tokens_per_s(self):
                return self.tokens / self.seconds if self.seconds else None

        return Timer()


# --- generation ----------------------------------------------------------------------------------
def generation(
    model: Path,
    adapter: Path,
    prompts: list,
    new_tokens: int,
    rows: tuple,
    hf_batches: tuple,
    bf16: bool,
    continuous: bool = True,
):
    import torch

    from loralab.config import load_config
    from loralab.generate import Engine, GenerationSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(None, {"model_name_or_path": str(model), "bf16": bf16, "seed": 42})
    settings = GenerationSettings(max_new_tokens=new_tokens)
    results: dict = {}

    def timed(name: str, fn) -> list[str]:
        sync(device)
        start = time.perf_counter()
        texts, tokens = fn()
        sync(device)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
        return texts

    engine = Engine(cfg, {"tuned": str(adapter)}, merge=True)
    engine.generate(prompts[:2], settings, adapter="tuned")  # warm-up (kernels, allocator)
    reference = None
    for n in rows:
        texts = timed(
            f"engine_{n}_rows",
            lambda n=n: _completions(engine.generate(prompts, settings, adapter="tuned", batch_size=n)),
        )
        reference = reference or texts
    timed("engine_single_stream", lambda: _completions(engine.generate(prompts[:1], settings, adapter="tuned")))
    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    engine = None  # its merged model's memory back before transformers' runs

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
    tokenizer = load_tokenizer_for(cfg)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    stop = gen_stop_ids(tokenizer)
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
    )
    for b in hf_batches:
        texts = timed(f"hf_generate_batch_{b}", lambda b=b: _hf_generate(peft_model, tokenizer, prompt_ids, b, config))
        results[f"hf_generate_batch_{b}"]["identical_to_engine"] = _identical(texts, reference)
    if not continuous:
        return results
    merged = peft_model.merge_and_unload()
    try:
        texts = timed("hf_generate_batch_continuous", lambda: _hf_continuous(merged, tokenizer, prompt_ids, config))
        results["hf_generate_batch_continuous"]["identical_to_engine"] = _identical(texts, reference)
    except Exception as e:  # an API that changed between transformers releases: reported, not fatal
        results["hf_generate_batch_continuous"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return results


def load_tokenizer_for(cfg):
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    tokenizer.padding_side = "left"
    return tokenizer


def gen_stop_ids(tokenizer) -> list[int]:
    from loralab.templates import stop_token_ids

    return sorted(stop_token_ids(tokenizer))


def _completions(done) -> tuple[list[str], int]:
    return [c.text for c in done], sum(c.completion_tokens for c in done)


def _hf_generate(model, tokenizer, prompt_ids: list[list[int]], batch: int, config) -> tuple[list[str], int]:
    import torch

    texts, tokens = [], 0
    stop = set(config.eos_token_id)
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            reply = []
            for t in row:
                if t in stop:
                    break
                reply.append(t)
            tokens += len(reply)
            texts.append(tokenizer.decode(reply, skip_special_tokens=True))
    return texts, tokens


def _hf_continuous(model, tokenizer, prompt_ids: list[list[int]], config) -> tuple[list[str], int]:
    """transformers' continuous batching (paged attention): `generate_batch` over all prompts at once."""
    outputs = model.generate_batch(inputs=prompt_ids, generation_config=config)
    stop = set(config.eos_token_id)
    texts, tokens = [], 0
    for i in range(len(prompt_ids)):
        out = outputs[f"req_{i}"] if isinstance(outputs, dict) and f"req_{i}" in outputs else list(outputs.values())[i]
        reply = [t for t in out.generated_tokens if t not in stop]
        tokens += len(reply)
        texts.append(tokenizer.decode(reply, skip_special_tokens=True))
    return texts, tokens


def _identical(texts: list[str], reference: list[str] | None) -> float | None:
    return sum(a == b for a, b in zip(texts, reference)) / len(reference) if reference else None


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="Tiny model and sizes: the same code on a CPU, in seconds.")
    p.add_argument("--data", default=str(gpu_check.DEFAULT_DATA), help="alpaca-cleaned JSON (demo data if absent).")
    p.add_argument("--workdir", default=None, help="Folder for the model, data and runs (default: a temp folder).")
    p.add_argument(
        "--skip-continuous",
        action="store_true",
        help="Leave out generate_batch (on a CPU it polls: 74 s for 6 tiny prompts here).",
    )
    p.add_argument("--out", default=None, help="Result JSON (default: $OUT/gpu_speed.json, else WORKDIR).")
    args = p.parse_args(argv)

    import torch

    from loralab.testing import make_random_adapter

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    size = sizes(args.tiny)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_speed-"))
    data_dir = work / "data"
    facts = {"tool": "bench/gpu_speed.py", "device": torch.cuda.get_device_name(0) if bf16 else "cpu"}
    facts["data"] = gpu_check.prepare_data(Path(args.data), data_dir)
    model = gpu_check.make_random_llama(work / "model", size["shape"], device)
    from transformers import LlamaConfig

    n_matmul = gpu_check.matmul_params(LlamaConfig(**size["shape"]))
    n_lora = gpu_check.lora_params(LlamaConfig(**size["shape"]), rank=8)
    facts["matmul_flops"] = measured_matmul_flops(device)
    per_token = gpu_check.flops_per_token(n_matmul, n_lora)

    training = {
        "loralab_defaults": train_loralab(model, data_dir, work / "run-loralab", size["steps"]),
        "hf_trainer_peft_baseline": train_baseline(model, data_dir, work / "run-baseline", size["steps"], bf16),
    }
    for row in training.values():
        row["mfu_of_measured_matmul"] = (
            row["tokens_per_s"] * per_token / facts["matmul_flops"] if row["tokens_per_s"] else None
        )
    base = training["hf_trainer_peft_baseline"]["tokens_per_s"]
    training["speedup"] = training["loralab_defaults"]["tokens_per_s"] / base if base else None

    adapter = make_random_adapter(model, work / "adapter", seed=1)
    from loralab import data
    from loralab.config import load_config

    cfg = load_config(None, {"dataset_dir": str(data_dir), "test_dataset": "alpaca_data_test"})
    prompts = [c[:-1] for c in data.load_conversations(cfg, "test")[: size["prompts"]]]
    gen = generation(
        model, adapter, prompts, size["new_tokens"], size["rows"], size["hf_batches"], bf16, not args.skip_continuous
    )

    result = {
        **facts,
        "sizes": {k: v for k, v in size.items() if k != "shape"},
        "training": training,
        "generation": gen,
    }
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", work)) / "gpu_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"training (LF recipe, {size['steps']} steps)          tokens/s   MFU of measured matmul")
    for name in ("loralab_defaults", "hf_trainer_peft_baseline"):
        row = training[name]
        mfu = row["mfu_of_measured_matmul"]
        print(f"  {name:<32} {row['tokens_per_s'] or 0:>10,.0f}   {100 * mfu if mfu else 0:5.1f}%")
    print(f"  speedup {training['speedup'] or 0:.2f}x")
    print(f"generation ({size['prompts']} prompts, {size['new_tokens']} new tokens)   tokens/s   identical to engine")
    for name, row in gen.items():
        shown = "" if row.get("identical_to_engine") is None else f"{100 * row['identical_to_engine']:.0f}%"
        print(f"  {name:<32} {row.get('tokens_per_s', 0):>10,.0f}   {shown or row.get('error', '')}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
