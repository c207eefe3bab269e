"""Every key LLaMA-Factory 0.9.5 accepts, and what loralab does with it.

lf_keys.json lists the keys (the fields of LLaMA-Factory's argument dataclasses, recorded from
LLaMA-Factory itself by tests/fixtures/lf_reference/record_keys.py) with LLaMA-Factory's defaults.
A key is either *honoured* (a `Config` field with LLaMA-Factory's meaning), *renamed* (LLaMA-Factory's
name for a loralab field), or *noticed*: accepted, with a one-line notice that it has no effect here and
why (NOTICES below, plus config.LLAMAFACTORY_IGNORED_KEYS). tests/test_lf_keys.py fails when a listed
key is none of these. No LLaMA-Factory key is refused.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

KEYS_FILE = Path(__file__).with_name("lf_keys.json")

# LLaMA-Factory's name -> loralab's field with the same meaning.
RENAMED = {"early_stopping_steps": "early_stopping_patience"}


def _same(reason: str, *keys: str) -> dict[str, str]:
    return dict.fromkeys(keys, reason)


NOTICES: dict[str, str] = {
    # model loading
    **_same(
        "the model folder's own tokenizer and files are used as they are",
        "adapter_folder",
        "cache_dir",
        "use_fast_tokenizer",
        "split_special_tokens",
        "add_tokens",
        "add_special_tokens",
        "new_special_tokens_config",
        "init_special_tokens",
        "model_revision",
        "offload_folder",
    ),
    **_same("loading is left to transformers' defaults", "low_cpu_mem_usage", "use_kv_cache", "use_v1_kernels"),
    **_same(
        "the model's own configuration is used (no RoPE scaling, shift attention or mixture of depths)",
        "rope_scaling",
        "shift_attn",
        "mixture_of_depths",
        "moe_aux_loss_coef",
        "train_from_scratch",
    ),
    **_same(
        "gradient checkpointing is set by gradient_checkpointing alone (non-reentrant)",
        "disable_gradient_checkpointing",
        "use_reentrant_gc",
        "use_unsloth_gc",
        "gradient_checkpointing_kwargs",
    ),
    **_same("not needed for the supported models", "upcast_lmhead_output"),
    **_same("only the HF hub token (hf_hub_token / HF_TOKEN) is used", "ms_hub_token", "om_hub_token"),
    **_same("trainable parameters are always counted in the log", "print_param_status"),
    **_same(
        "QLoRA uses 4-bit NF4 with double quantization (bitsandbytes) on the available devices",
        "quantization_type",
        "double_quantization",
        "quantization_device_map",
    ),
    **_same(
        "loralab trains text models only (no images, video or audio)",
        "image_max_pixels",
        "image_min_pixels",
        "image_do_pan_and_scan",
        "crop_to_patches",
        "video_max_pixels",
        "video_min_pixels",
        "video_fps",
        "video_maxlen",
        "use_audio_in_video",
        "audio_sampling_rate",
        "media_dir",
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
    ),
    **_same(
        "`loralab export` writes an unquantized merged model to export_dir; export_gguf=q8_0 (or q4_0) adds "
        "quantized GGUF files for llama.cpp and Ollama",
        "export_quantization_bit",
        "export_quantization_dataset",
        "export_quantization_nsamples",
        "export_quantization_maxlen",
        "export_hub_model_id",
    ),
    **_same(
        "KTransformers is not a loralab backend",
        "use_kt",
        "kt_weight_path",
        "kt_expert_checkpoint_path",
        "kt_use_lora_experts",
        "kt_lora_expert_num",
        "kt_lora_expert_intermediate_size",
    ),
    **_same(
        "vLLM runs with loralab's own settings (infer_backend: vllm)",
        "vllm_maxlen",
        "vllm_gpu_util",
        "vllm_enforce_eager",
        "vllm_max_lora_rank",
        "vllm_config",
    ),
    **_same(
        "SGLang is not a loralab backend",
        "sglang_maxlen",
        "sglang_mem_fraction",
        "sglang_tp_size",
        "sglang_config",
        "sglang_lora_backend",
    ),
    # data
    **_same("datasets are read in memory, not streamed", "buffer_size"),
    **_same("several datasets are concatenated in the order given", "interleave_probs"),
    **_same(
        "tokenization runs in-process, one record at a time", "preprocessing_batch_size", "data_shared_file_system"
    ),
    **_same("validation reports one loss over all eval datasets", "eval_on_each_dataset"),
    **_same("padding never counts in the loss (labels are -100 there)", "ignore_pad_token_for_loss"),
    **_same(
        "qwen3 answers without a thought are learned with an empty one (LLaMA-Factory's default, "
        "enable_thinking: true); earlier thoughts are kept",
        "enable_thinking",
        "preserve_thinking",
    ),
    # methods other than LoRA / full SFT
    **_same(
        "loralab does LoRA or full fine-tuning (finetuning_type), not freeze or OFT tuning",
        "freeze_trainable_layers",
        "freeze_trainable_modules",
        "freeze_extra_modules",
        "module_dropout",
        "oft_rank",
        "oft_block_size",
        "oft_target",
    ),
    **_same(
        "one new adapter is trained on the base model (adapter_name_or_path is for predict/chat/export)",
        "create_new_adapter",
    ),
    **_same(
        "LoRA+ scales the B matrices by loraplus_lr_ratio; embeddings get no separate rate", "loraplus_lr_embedding"
    ),
    **_same(
        "LoRA weights start from peft's default initialisation (no PiSSA)", "pissa_init", "pissa_iter", "pissa_convert"
    ),
    **_same(
        "loralab does supervised fine-tuning only (no DPO/KTO/PPO/reward models)",
        "pref_beta",
        "pref_ftx",
        "pref_bco_weight",
        "pref_loss",
        "dpo_label_smoothing",
        "kto_chosen_weight",
        "kto_rejected_weight",
        "simpo_gamma",
        "ppo_buffer_size",
        "ppo_epochs",
        "ppo_score_norm",
        "ppo_target",
        "ppo_whiten_rewards",
        "ref_model",
        "ref_model_adapters",
        "ref_model_quantization_bit",
        "reward_model",
        "reward_model_adapters",
        "reward_model_quantization_bit",
        "reward_model_type",
        "ld_alpha",
    ),
    **_same(
        "the optimizer is chosen by optim (GaLore/APOLLO/BAdam/Adam-mini/Muon are LLaMA-Factory's own set-ups)",
        "use_galore",
        "galore_target",
        "galore_rank",
        "galore_update_interval",
        "galore_scale",
        "galore_proj_type",
        "galore_layerwise",
        "use_apollo",
        "apollo_target",
        "apollo_rank",
        "apollo_update_interval",
        "apollo_scale",
        "apollo_proj",
        "apollo_proj_type",
        "apollo_scale_type",
        "apollo_layerwise",
        "apollo_scale_front",
        "use_badam",
        "badam_mode",
        "badam_start_block",
        "badam_switch_mode",
        "badam_switch_interval",
        "badam_update_ratio",
        "badam_mask_mode",
        "badam_verbose",
        "use_adam_mini",
        "use_muon",
        "optim_target_modules",
    ),
    **_same(
        "the loss is the standard token cross-entropy",
        "use_dft_loss",
        "use_asft_loss",
        "asft_alpha",
        "use_eaft_loss",
        "eaft_alpha",
        "label_smoothing_factor",
    ),
    **_same(
        "not a loralab method (LLaMA Pro, Megatron core, hyper-parallel)",
        "use_llama_pro",
        "use_mca",
        "use_hyper_parallel",
        "hyper_parallel_args",
    ),
    **_same(
        "validation reports the loss; predict/eval report the generation metrics",
        "compute_accuracy",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
    ),
    **_same(
        "the batch order is loralab's length-grouped shuffle (group_by_length: false = random order)",
        "disable_shuffling",
        "train_sampling_strategy",
        "length_column_name",
        "sortish_sampler",
    ),
    **_same("tokens/s is always logged", "include_effective_tokens_per_second"),
    **_same(
        "SwanLab is not used; loralab writes TensorBoard events and metrics.jsonl",
        "use_swanlab",
        "swanlab_project",
        "swanlab_workspace",
        "swanlab_run_name",
        "swanlab_mode",
        "swanlab_api_key",
        "swanlab_logdir",
        "swanlab_lark_webhook_url",
        "swanlab_lark_secret",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
    ),
    # generation
    **_same(
        "generation is greedy or sampled (do_sample), never beam search",
        "num_beams",
        "length_penalty",
        "eval_num_beams",
        "generation_num_beams",
    ),
    **_same("replies are limited by max_new_tokens", "max_length", "generation_max_length"),
    **_same("special tokens are always left out of the reply text", "skip_special_tokens"),
    **_same("generation settings come from loralab's keys (do_sample, temperature, ...)", "generation_config"),
    # trainer
    **_same("the loss is averaged per device as transformers does by default", "average_tokens_across_devices"),
    **_same("validation runs in the training precision", "bf16_full_eval", "fp16_full_eval"),
    **_same("numerics are left to torch's defaults", "tf32", "full_determinism"),
    **_same("models are not compiled", "torch_compile", "torch_compile_backend", "torch_compile_mode"),
    **_same("Liger kernels are not used", "use_liger_kernel", "liger_kernel_config"),
    **_same("the KV cache is off in training and on in generation", "use_cache"),
    **_same("memory is left to torch's allocator", "torch_empty_cache_steps", "skip_memory_metrics"),
    **_same("the batch size is what per_device_train_batch_size says", "auto_find_batch_size"),
    **_same(
        "the training loss is logged every logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
    ),
    **_same(
        "only the main process logs; -v turns on debug logs",
        "log_on_each_node",
        "log_level",
        "log_level_replica",
        "disable_tqdm",
    ),
    **_same(
        "validation runs every eval_steps from the first interval on",
        "eval_delay",
        "eval_on_start",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "eval_accumulation_steps",
    ),
    **_same(
        "checkpoints are written by the main process, complete or not at all",
        "save_on_each_node",
        "enable_jit_checkpoint",
    ),
    **_same(
        "loralab never uploads to the hub",
        "push_to_hub",
        "hub_token",
        "hub_private_repo",
        "hub_model_id",
        "hub_strategy",
        "hub_always_push",
        "hub_revision",
    ),
    **_same(
        "the best checkpoint is chosen by the lowest validation loss", "metric_for_best_model", "greater_is_better"
    ),
    **_same(
        "a resumed run continues where its checkpoint left off, with its callbacks' state",
        "ignore_data_skip",
        "restore_callback_states_from_checkpoint",
    ),
    **_same("the data order is seeded by seed", "data_seed"),
    **_same("the device is chosen automatically (a GPU when there is one)", "use_cpu", "local_rank"),
    **_same(
        "multi-process settings come from accelerate launch / torchrun",
        "accelerator_config",
        "parallelism_config",
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "ddp_backend",
        "fsdp",
        "fsdp_config",
        "master_addr",
        "master_port",
        "ray_num_workers",
        "ray_init_kwargs",
    ),
    **_same(
        "batches are built in-process; every batch is used",
        "dataloader_drop_last",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
    ),
    **_same("loralab's collator builds input_ids/labels itself", "remove_unused_columns", "label_names"),
    **_same("transformers debug modes are not exposed", "debug"),
    **_same("mixed precision is bf16 or fp16 (no FP8)", "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"),
    **_same(
        "the torch profiler is not wired in",
        "enable_torch_profiler",
        "profiler_output_dir",
        "profiler_wait_steps",
        "profiler_warmup_steps",
        "profiler_active_steps",
        "profiler_repeat",
        "profiler_record_shapes",
        "profiler_profile_memory",
        "profiler_with_stack",
        "profile_modules",
    ),
    # LLaMA-Factory's benchmark evaluation (`llamafactory-cli eval`, MMLU/C-Eval/CMMLU)
    **_same(
        "LLaMA-Factory's multiple-choice benchmarks (llamafactory-cli eval) are not a loralab command; "
        "`loralab eval` scores generated answers",
        "task",
        "task_dir",
        "batch_size",
        "lang",
        "n_shot",
        "save_dir",
        "download_mode",
    ),
}


@cache
def lf_keys() -> dict[str, dict]:
    """{dataclass name: {key: LLaMA-Factory's default}} as recorded from LLaMA-Factory 0.9.5."""
    return json.loads(KEYS_FILE.read_text(encoding="utf-8"))["classes"]


@cache
def lf_defaults() -> dict[str, object]:
    """{key: LLaMA-Factory's default} over all its argument classes."""
    out: dict[str, object] = {}
    for keys in lf_keys().values():
        for key, default in keys.items():
            out.setdefault(key, default)
    return out
