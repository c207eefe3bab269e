"""Supervised fine-tuning: LoRA (peft) or full fine-tuning on transformers' Trainer.

The recipe, top to bottom (`train`):
  config -> run folder -> tokenizer (the run's chat template) -> conversations -> input_ids + labels
  (templates.encode_for_training: the prompt is masked, each assistant turn and its closing token are
  learned) -> base model (+ LoRA adapter) -> Trainer (length-grouped batches, validation loss and
  perplexity, best checkpoint, early stopping, resumable atomic checkpoints) -> the best adapter at the
  top of the run folder -> metrics.jsonl, TensorBoard, loss plots, train_results.json.

Everything that the Trainer, peft and accelerate do well (optimizer, schedule, mixed precision,
DDP/DeepSpeed/FSDP through `accelerate launch`, gradient checkpointing, best-model tracking) is theirs;
what is ours is the data encoding, the batch order, the run folder and the user-facing errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from loralab import data, generation_validation, models, runinfo
from loralab.config import Config
from loralab.errors import LoralabError
from loralab.log import log_to_file
from loralab.templates import encode_for_training, with_default_system

log = logging.getLogger(__name__)

GENERATION_KEYS = generation_validation.LOG_KEYS
CHECKPOINT_PREFIX = "checkpoint-"
# Written into checkpoint-N/ once every file of it is on disk; resume only trusts marked checkpoints.
COMPLETE_MARKER = "loralab_complete.json"
# With overwrite_output_dir the replaced run waits here until the new run has finished (never deleted first).
PREVIOUS_RUN = ".previous_run"
# What a training run writes at the top of its folder (loralab's files, LLaMA-Factory's, the model's, the
# tokenizer's, peft's model card): what overwrite_output_dir replaces. Anything else in the folder is the user's
# and stays where it is.
RUN_FILES = (
    CHECKPOINT_PREFIX + "*",
    "last",
    "tensorboard",
    generation_validation.FOLDER,
    "metrics.jsonl",
    "train.log",
    "*_results.json",
    "trainer_log.jsonl",
    "trainer_state.json",
    "training_args.bin",
    "config.yaml",
    "run_info.json",
    "*_manifest.json",
    "chat_template.jinja",
    "training_*.png",
    "adapter_model.*",
    "adapter_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "README.md",
)
# Files of a checkpoint that only the Trainer needs to resume (not part of the model/adapter itself).
TRAINER_ONLY_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
    COMPLETE_MARKER,
)


# --- data ----------------------------------------------------------------------------------------
def encode_split(tokenizer, conversations: list[list[dict]], cfg: Config) -> tuple[list[dict], dict]:
    """Conversations -> [{"input_ids", "labels"}] plus counts of what cutoff_len/masking did."""
    examples, counts = [], {"conversations": len(conversations), "truncated": 0, "dropped_too_long": 0, "no_labels": 0}
    cutoff_len = training_cutoff_len(cfg)
    for messages in conversations:
        messages = with_default_system(messages, cfg.default_system)
        masking = {"train_on_prompt": cfg.train_on_prompt, "mask_history": cfg.mask_history}
        full = encode_for_training(tokenizer, messages, cutoff_len=10**9, **masking)
        if full is None:  # no assistant token at all (e.g. an empty answer)
            counts["no_labels"] += 1
            continue
        if len(full["input_ids"]) > cutoff_len:
            cut = encode_for_training(tokenizer, messages, cutoff_len, cfg.overflow, **masking)
            if cut is None:  # dropped (overflow=drop), or truncation cut away every answer token
                counts["dropped_too_long" if cfg.overflow == "drop" else "no_labels"] += 1
                continue
            counts["truncated"] += 1
            full = cut
        examples.append(full)
    return examples, counts


def training_cutoff_len(cfg: Config) -> int:
    """The longest training sequence: cutoff_len, or with packing cutoff_len - 1, as LLaMA-Factory (its data
    arguments lower cutoff_len by one when packing)."""
    return cfg.cutoff_len - 1 if cfg.packing or cfg.neat_packing else cfg.cutoff_len


@dataclass
class PadCollator:
    """Right-pad a batch: input_ids with the pad id, labels with -100 (never learned), attention mask 0."""

    pad_id: int
    multiple_of: int | None = None  # 8 on GPUs: tensor-core friendly shapes

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(cfg: Config, tokenizer):
    """Padded batches, or with packing/neat_packing LLaMA-Factory's padding-free batches.

    A packed batch is one row of the batch's sequences back to back, with position_ids restarting at 0 for
    each; transformers turns that into a block-diagonal causal mask, so no token attends across sequences
    (what LLaMA-Factory's neat_packing guarantees).
    """
    if cfg.packing or cfg.neat_packing:
        return transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return PadCollator(tokenizer.pad_token_id, 8 if torch.cuda.is_available() else None)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Index order whose consecutive `batch_size` groups have similar lengths (little padding).

    Shuffle with the seed, cut into large chunks, sort each chunk by length, cut into batches, and
    shuffle the batch order. The order depends only on (seed, epoch), so a resumed run sees the same
    batches; a short remainder batch goes last so every other batch stays aligned.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, chunk_batches: int = 64):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.chunk = batch_size * chunk_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        full, remainder = [], []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start : start + self.chunk], key=lambda i: self.lengths[i], reverse=True)
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else remainder).append(batch)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return shuffled + remainder

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])


def tokens_per_pass(cfg: Config, cuda: bool) -> int | None:
    """The token budget of one forward/backward pass (None = whole batches), from max_tokens_per_pass."""
    if cfg.max_tokens_per_pass is None:
        return None if cuda else CPU_TOKENS_PER_PASS
    return cfg.max_tokens_per_pass or None


def batch_layout(cfg: Config, cuda: bool) -> tuple[int, int, int | None]:
    """(rows per batch, accumulation steps, tokens per pass) that the Trainer runs for the user's settings.

    With fill_batches (default on a GPU) the accumulated micro-batches of an optimizer step run as one
    batch, split into passes of at most the tokens one micro-batch could hold (batch x cutoff_len): the
    memory bound the user chose, but LLaMA-Factory's batch 1 x accumulation 8 of ~300-token alpaca rows
    becomes passes of ~6 rows instead of 8 forwards of one row each. The gradient is the same sum over the
    step's label tokens divided by their count; only the order of rows within a step differs."""
    batch, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    per_pass = tokens_per_pass(cfg, cuda)
    sharded = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    fill = cfg.fill_batches if cfg.fill_batches is not None else cuda and not sharded
    if not fill or accumulation == 1 or cfg.packing or cfg.neat_packing:  # packed rows are one sequence
        return batch, accumulation, per_pass
    if cfg.max_tokens_per_pass is None:  # the default budget, at most what one micro-batch could hold
        per_pass = min(per_pass or batch * cfg.cutoff_len, batch * cfg.cutoff_len)
    return batch * accumulation, 1, per_pass


def split_by_token_budget(batch: dict, max_tokens: int) -> list[dict]:
    """A right-padded batch as consecutive groups of whole rows, each of at most max_tokens tokens once
    trimmed to its own longest row (a single longer row is a group of its own)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    groups, start = [], 0
    for end in range(1, len(lengths) + 1):
        if end == len(lengths) or (end + 1 - start) * max(lengths[start : end + 1]) > max_tokens:
            groups.append((start, end))
            start = end
    width = batch["input_ids"].shape[1]
    return [
        {
            k: v[a:b, : max(lengths[a:b])] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == width else v[a:b]
            for k, v in batch.items()
        }
        for a, b in groups
    ]


def padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    """Non-padding tokens / tokens processed, for a batch order (right padding to each batch's longest)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / padded if padded else 1.0


# --- loss ----------------------------------------------------------------------------------------
# Models whose logits are exactly lm_head(last hidden state): no soft-capping, scaling or auxiliary
# (router) loss that the chunked loss below would leave out. Others keep the model's own loss.
PLAIN_LM_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3"}
# max_tokens_per_pass unset on CPU: passes of ~1,000 tokens already run the matmuls at full speed there,
# and keep SmolLM2's LoRA activations near 1.5 GB. GPUs want whole batches (their memory is the user's call).
CPU_TOKENS_PER_PASS = 1024
LOSS_CHUNK_TOKENS = 512  # label positions per chunk: 512 x a 49k vocab = 100 MB of fp32 logits


def chunked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """The causal-LM cross-entropy of transformers' ForCausalLMLoss, from the final hidden states.

    Why: a batch's logits (tokens x vocab, fp32), their log-softmax and their gradient are the largest
    tensors of a LoRA step (8 x 476 tokens x 49,152 = 750 MB each for SmolLM2). Here logits are made only
    for the positions that have a label (the masked prompt needs none), a chunk at a time, and each chunk
    is checkpointed: its logits are dropped after its loss and recomputed in the backward pass, so at most
    one chunk's logits are alive. Same normalisation as the model's loss: the sum over label tokens divided
    by num_items_in_batch (the label tokens of the whole accumulated batch) when given, else their mean.
    """
    from torch.utils.checkpoint import checkpoint

    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]  # position i predicts token i+1
    learned = targets != -100
    hidden, targets = hidden[learned], targets[learned]

    # The head's own dtype: hidden states may come out in fp32 (fp32 LoRA weights, autocast ends with the
    # model's forward) while a bf16/fp16 model's lm_head is half precision.
    head_dtype = next((p.dtype for p in lm_head.parameters() if p.is_floating_point()), hidden.dtype)

    def chunk_loss(h, t):
        return torch.nn.functional.cross_entropy(lm_head(h.to(head_dtype)).float(), t, reduction="sum")

    total = hidden.sum().float() * 0.0  # a zero that is part of the graph, for a batch without labels
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
    if num_items_in_batch is None:
        return total / len(targets)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --- model ---------------------------------------------------------------------------------------
def check_target_modules(model, cfg: Config) -> None:
    """Every name in lora_target must be a module of the model; list the linear ones when not."""
    targets = cfg.target_modules
    if targets == "all-linear":
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in targets if t not in names]
    if missing:
        raise LoralabError(
            f"lora_target: {', '.join(missing)} is not a module of {cfg.model_name_or_path}; "
            f"valid names: all, {', '.join(linear)}"
        )


def check_rank(model, cfg: Config) -> None:
    """A rank above the widest linear layer adds nothing and can ask for terabytes (lora_rank=1e12)."""
    widest = max(
        (max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0
    )
    if widest and cfg.lora_rank > widest:
        raise LoralabError(
            f"lora_rank: {cfg.lora_rank} is larger than the widest layer of {cfg.model_name_or_path} ({widest}); "
            f"expected at most {widest} (8-64 is usual)"
        )


def build_model(cfg: Config):
    """The base model, ready for training: LoRA adapter (peft) or all weights trainable."""
    if cfg.quantization_bit and cfg.finetuning_type != "lora":
        raise LoralabError(
            "quantization_bit: 4/8-bit base models can only be trained with finetuning_type=lora (QLoRA)"
        )
    model = models.load_model(cfg, for_training=True)
    model.config.use_cache = False  # the KV cache is for generation; training does not use it
    if cfg.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if cfg.finetuning_type == "full":
        # Trainable weights stay fp32 (bf16/fp16 is autocast on top), as optimizers and fp16 grad scaling need.
        return model.float() if model.dtype != torch.float32 else model
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, cfg)
    check_rank(model, cfg)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=[m.strip() for m in cfg.additional_target.split(",") if m.strip()]
        if cfg.additional_target
        else None,
    )
    model = get_peft_model(model, lora)  # adapter weights are kept in fp32 even on a bf16 base
    # The adapter names the base model the way the user wrote it (e.g. builtin:smollm2-135m-instruct),
    # so `models.check_adapter_base` and our other commands find the same base again.
    model.peft_config["default"].base_model_name_or_path = cfg.model_name_or_path
    return model


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- run folder and checkpoints ------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [
        p for p in run_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint with a completion marker (a half-written one is never picked)."""
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    return complete[-1] if complete else None


def remove_checkpoint(path: Path) -> None:
    """Marker first: a kill during the delete leaves an unmarked (ignored) folder, never a trusted half one."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prepare_run_dir(cfg: Config, is_main: bool) -> tuple[Path, Path | None]:
    """Check (main process) and return the run folder, plus the checkpoint to resume from, if any.

    Nothing is removed here: with overwrite_output_dir the previous run stays in place until this run has
    loaded its data and model (`set_aside_previous_run`), so a failed start leaves it untouched."""
    run_dir = Path(cfg.output_dir)
    resume = cfg.resume_from_checkpoint
    if resume in (None, False):
        if is_main:
            runinfo.check_output_dir(run_dir, cfg.overwrite_output_dir)
        return run_dir, None
    if resume is True or str(resume).lower() == "true":
        checkpoint = find_resume_checkpoint(run_dir) if run_dir.is_dir() else None
        if checkpoint is None:
            raise LoralabError(
                f"resume_from_checkpoint: {run_dir} has no complete checkpoint to resume from; "
                "run without --resume (with --overwrite to replace the folder)"
            )
    else:
        checkpoint = Path(str(resume))
        if not is_complete(checkpoint):
            raise LoralabError(
                f"resume_from_checkpoint: {checkpoint} is not a complete loralab checkpoint "
                f"(no {COMPLETE_MARKER}: missing, or the save was interrupted)"
            )
    return run_dir, checkpoint


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """overwrite_output_dir, once the new run has started: move the previous run's files (RUN_FILES) into
    RUN/.previous_run/, so the new run's checkpoints and logs never mix with the old ones (or get resumed).

    The previous run is removed only when the new one has finished (`drop_previous_run`); a run that fails
    before its first complete checkpoint puts it back (`restore_previous_run`). If RUN/.previous_run/ is
    already there, an earlier replacement never finished: the finished run is the one set aside then, and
    what the folder holds now is that unfinished attempt, which this run replaces."""
    entries = run_outputs(run_dir)
    if not entries:
        return None
    previous = run_dir / PREVIOUS_RUN
    if previous.is_dir():
        log.info(
            "overwrite_output_dir: replacing the unfinished run in %s (the last finished one stays in %s)",
            run_dir,
            previous,
        )
        for path in entries:
            remove_path(path)
        return previous
    previous.mkdir()
    for path in entries:
        os.replace(path, previous / path.name)
    return previous


def restore_previous_run(run_dir: Path, previous: Path) -> None:
    """The new run failed: with no complete checkpoint of its own, put the previous run back where it was;
    with one, keep both (the new run can be resumed) and say where the previous one is."""
    if find_resume_checkpoint(run_dir) is not None:
        log.warning("the previous run of %s is kept in %s until a run in this folder finishes", run_dir, previous)
        return
    for path in run_outputs(run_dir):
        remove_path(path)
    for path in previous.iterdir():
        os.replace(path, run_dir / path.name)
    previous.rmdir()
    log.info("the previous run in %s is back in place", run_dir)


def run_outputs(run_dir: Path) -> list[Path]:
    """The entries of a run folder that a training run wrote (RUN_FILES), not the user's own files."""
    if not run_dir.is_dir():
        return []
    return [p for p in sorted(run_dir.iterdir()) if any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_FILES)]


def drop_previous_run(run_dir: Path) -> None:
    """The new run has finished: the run it replaced goes."""
    if (run_dir / PREVIOUS_RUN).is_dir():
        shutil.rmtree(run_dir / PREVIOUS_RUN)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_for_resume(run_dir: Path, checkpoint: Path) -> None:
    """Before resuming at checkpoint-N: drop unmarked checkpoints and metrics logged after step N."""
    for path in list_checkpoints(run_dir):
        if not is_complete(path):
            log.info("removing %s: its save was interrupted (no completion marker)", path)
            remove_checkpoint(path)
    step = checkpoint_step(checkpoint)
    for name, step_key in (("metrics.jsonl", "step"), (LlamaFactoryTrainerLog.FILE, "current_steps")):
        path = run_dir / name
        if path.is_file():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)[step_key] <= step]
            path.write_text("".join(line + "\n" for line in kept))


def copy_manifests(cfg: Config, run_dir: Path) -> None:
    """The data split manifest(s) of the dataset folder, so the run says which data it saw."""
    folder = Path(cfg.dataset_dir)
    if folder.is_dir():
        for manifest in folder.glob("*_manifest.json"):
            shutil.copy2(manifest, run_dir / manifest.name)


# --- callbacks -----------------------------------------------------------------------------------
class CompleteCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once it is fully written, then rotate old ones (save_total_limit).

    transformers' Trainer writes checkpoint-N/ file by file, so a kill during a save leaves a folder
    that looks like a checkpoint. The marker is written after every process finished its files; resume
    trusts only marked checkpoints. Rotation is ours so it never deletes before the new one is marked.
    """

    def __init__(self, run_dir: Path, keep: int | None):
        self.run_dir, self.keep = run_dir, keep

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank wrote its part (e.g. its RNG state)
        if not state.is_world_process_zero:
            return
        checkpoint = self.run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        marker = {"step": state.global_step, "time": time.time()}
        tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
        tmp.write_text(json.dumps(marker) + "\n")
        os.replace(tmp, checkpoint / COMPLETE_MARKER)
        if self.keep:
            best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
            complete = [p for p in list_checkpoints(self.run_dir) if is_complete(p)]
            removable = [p for p in complete[:-1] if p.name != best]  # never the newest or the best
            for old in removable[: max(0, len(complete) - self.keep)]:
                remove_checkpoint(old)


class StopOnNonFinite(TrainerCallback):
    """Stop the run with a one-line error once the loss, gradient norm or weights stop being finite.

    Checked after every optimizer step (trainable weights) and every log (loss, grad_norm,
    eval_loss), i.e. before the Trainer saves or picks a best checkpoint, so no NaN adapter is ever
    written. The checkpoints from before are kept for a resume with a lower learning_rate.
    """

    HINT = "lower learning_rate (or raise warmup_steps / lower max_grad_norm); earlier checkpoints are kept"

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, param in model.named_parameters():
                if param.requires_grad and not bool(torch.isfinite(param).all()):
                    raise LoralabError(
                        f"step {state.global_step}: training diverged: weights of {name} are no "
                        f"longer finite (inf/nan); {self.HINT}"
                    )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise LoralabError(f"step {state.global_step}: training diverged: {key} is {value}; {self.HINT}")


def finite_or_none(record: dict) -> dict:
    """JSON has no NaN/Infinity: a non-finite number is written as null, so every line stays strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class RunLog(TrainerCallback):
    """Main process: progress bar (step, loss, tokens/s, ETA), metrics.jsonl, validation log lines."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.step_time = 0.0  # seconds spent in training steps (not validation or saving)
        self._t0 = None
        self._last = (0, 0.0)  # (tokens seen, step_time) at the last training log
        self.last_loss = None
        self.tokens_per_s = None
        self.start_tokens = 0  # tokens seen before this session (a resumed run starts above 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True
            )
        self.start_tokens = state.num_input_tokens_seen
        self._last = (state.num_input_tokens_seen, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_time += time.perf_counter() - self._t0
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training logs carry `loss`, validation logs `eval_loss`, generation-based validation `eval_rougeL`, ...;
        # the end-of-training summary has none of them.
        if not state.is_world_process_zero or not logs or not ({"loss", "eval_loss", *GENERATION_KEYS} & set(logs)):
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", *GENERATION_KEYS):
            if key in logs:
                record[key] = logs[key]
        record["tokens_seen"] = state.num_input_tokens_seen
        if "loss" in logs:
            tokens, seconds = state.num_input_tokens_seen - self._last[0], self.step_time - self._last[1]
            self.tokens_per_s = tokens / seconds if seconds > 0 else None
            self._last = (state.num_input_tokens_seen, self.step_time)
            record["tokens_per_s"] = self.tokens_per_s
            self.last_loss = logs["loss"]
        if "eval_loss" in logs:
            record["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            best = state.best_metric if state.best_metric is not None else logs["eval_loss"]
            log.info(
                "step %d: validation loss %.4f, perplexity %.2f%s",
                state.global_step,
                logs["eval_loss"],
                record["eval_perplexity"],
                " (best so far)" if logs["eval_loss"] <= best else f" (best {best:.4f})",
            )
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        if self.bar is not None and self.last_loss is not None:
            postfix = {"loss": f"{self.last_loss:.4f}"}
            if self.tokens_per_s:
                postfix["tok/s"] = f"{self.tokens_per_s:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LlamaFactoryTrainerLog(TrainerCallback):
    """RUN/trainer_log.jsonl in LLaMA-Factory's format (its LogCallback): one line per log with current_steps,
    total_steps, loss / eval_loss, lr, epoch, percentage, elapsed_time and remaining_time (H:MM:SS), and
    throughput / total_tokens; LLaMA-Factory's web UI and loss-plot scripts read this file."""

    FILE = "trainer_log.jsonl"

    def __init__(self, run_dir: Path):
        self.path = run_dir / self.FILE
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not state.log_history:
            return
        last = state.log_history[-1]
        elapsed = time.time() - self.start
        # As LLaMA-Factory: the time per step is averaged over global_step (a resumed run counts every step).
        per_step = elapsed / state.global_step if state.global_step else 0.0
        record = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"),
            "lr": last.get("learning_rate"),
            "epoch": last.get("epoch"),
            "percentage": round(state.global_step / state.max_steps * 100, 2) if state.max_steps else 100,
            "elapsed_time": str(datetime.timedelta(seconds=int(elapsed))),
            "remaining_time": str(datetime.timedelta(seconds=int((state.max_steps - state.global_step) * per_step))),
        }
        if state.num_input_tokens_seen:
            record["throughput"] = round(state.num_input_tokens_seen / elapsed, 2) if elapsed > 0 else None
            record["total_tokens"] = state.num_input_tokens_seen
        record = finite_or_none({k: v for k, v in record.items() if v is not None})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class LoralabTrainer(transformers.Trainer):
    """transformers' Trainer with our batch order, a memory cap per pass, the chunked loss, and a count of
    the tokens each batch really holds."""

    def __init__(self, *args, lengths: list[int], group_by_length: bool, max_tokens_per_pass: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths, self.group_by_length = lengths, group_by_length
        self.max_tokens_per_pass = max_tokens_per_pass
        self.real_tokens = 0  # this process, this session: non-padding tokens
        self.padded_tokens = 0  # ... and tokens including padding

    def get_train_dataloader(self):
        """Batches in our length-grouped order (the Trainer's public hook for a custom training loader).

        transformers' own `train_sampling_strategy="group_by_length"` groups by batch x accumulation and
        takes its order from the global RNG; ours depends only on (seed, epoch), so a resumed run sees
        the same batches. The loader goes through accelerate like the Trainer's own (sharded under DDP)."""
        if not self.group_by_length:
            return super().get_train_dataloader()
        args = self.args
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=LengthGroupedSampler(self.lengths, args.per_device_train_batch_size, args.seed),
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            drop_last=args.dataloader_drop_last,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training loss through `chunked_lm_loss` (the model returns its final hidden states, no logits);
        validation, other models and sharded (FSDP/DeepSpeed) runs keep the Trainer's own path."""
        unwrapped = self.accelerator.unwrap_model(model)
        if (
            not model.training
            or return_outputs
            or "labels" not in inputs
            or getattr(unwrapped.config, "model_type", None) not in PLAIN_LM_HEAD_MODELS
            or self.label_smoother is not None
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)  # logits_to_keep: no position
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=no_logits)
        loss = chunked_lm_loss(outputs.hidden_states[-1], labels, unwrapped.get_output_embeddings(), num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As the Trainer's compute_loss: num_items_in_batch counts every process's label tokens, and
            # DDP averages the gradients over processes.
            loss = loss * self.accelerator.num_processes
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One batch; above max_tokens_per_pass tokens, as several passes (split_by_token_budget).

        Why: activations grow with the tokens of a pass (about 1.5 MB a token for SmolLM2 with LoRA), so a
        batch of 8 long rows is the memory peak of a run. Every pass's loss is divided by the label tokens
        of the whole (accumulated) batch, so the gradients add up to exactly the one-pass gradients; only
        the last pass syncs DDP gradients. Needs that count (num_items_in_batch) and a padded batch; runs
        sharded by FSDP/DeepSpeed keep one pass."""
        mask = inputs.get("attention_mask")  # none in packed (padding-free) batches: every token is real
        self.real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.padded_tokens += inputs["input_ids"].numel()
        if (
            self.max_tokens_per_pass is None
            or mask is None
            or num_items_in_batch is None
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super().training_step(model, inputs, num_items_in_batch)
        passes = split_by_token_budget(inputs, self.max_tokens_per_pass)
        loss = 0.0
        for i, part in enumerate(passes):
            last = i == len(passes) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = loss + super().training_step(model, part, num_items_in_batch)
        return loss


# --- outputs -------------------------------------------------------------------------------------
def plot_losses(run_dir: Path) -> list[Path]:
    """training_loss.png and training_eval_loss.png (LLaMA-Factory's names) from metrics.jsonl, and
    training_eval_generation.png when the run scored generated replies at each validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():  # nothing was logged (a run shorter than logging_steps)
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    written = []
    for key, name, title in (
        ("loss", "training_loss.png", "training loss"),
        ("eval_loss", "training_eval_loss.png", "validation loss"),
    ):
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{title} — {run_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    generated = [r for r in records if GENERATION_KEYS[0] in r]
    if generated:  # eval_generate_samples: answer quality at each validation, the validation loss beside it
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key in GENERATION_KEYS[:-1]:  # the scores, not the seconds
            ax.plot(
                [r["step"] for r in generated], [r[key] for r in generated], marker="o", label=key.removeprefix("eval_")
            )
        ax.set_xlabel("step")
        ax.set_ylabel("score (x100)")
        losses = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if losses:
            twin = ax.twinx()
            twin.plot(*zip(*losses), color="gray", linestyle="--", label="validation loss")
            twin.set_ylabel("validation loss")
            twin.legend(loc="upper right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"generation on validation records — {run_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "training_eval_generation.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "training_eval_generation.png")
    return written


def copy_model_files(checkpoint: Path, target: Path) -> None:
    """The model/adapter files of a checkpoint (not the optimizer or trainer state) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in TRAINER_ONLY_FILES and not path.name.startswith("rng_state"):
            shutil.copy2(path, target / path.name)


def checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing under the name this transformers has: `activation_checkpointing` in newer
    5.x releases (where `gradient_checkpointing` is a deprecated alias), `gradient_checkpointing` in older
    ones such as 5.17, which rejects the new name."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(cfg: Config, run_dir: Path, has_eval: bool, dtype) -> transformers.TrainingArguments:
    """Our config -> TrainingArguments. With validation, a checkpoint is saved at every validation so the
    best one by validation loss can be kept (and is what the run folder's final adapter is)."""
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    save_steps = cfg.eval_every if eval_strategy == "steps" else cfg.save_steps
    batch, accumulation, _ = batch_layout(cfg, torch.cuda.is_available())
    return transformers.TrainingArguments(
        output_dir=str(run_dir),
        use_cpu=not torch.cuda.is_available(),  # also what makes multi-process CPU runs use DDP (gloo)
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=cfg.lr_scheduler_type,
        optim=cfg.optim,
        optim_args=cfg.optim_args,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        lr_scheduler_kwargs=cfg.lr_scheduler_kwargs,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_every if eval_strategy == "steps" else None,
        save_strategy="epoch" if eval_strategy == "epoch" else "steps",
        save_steps=save_steps,
        save_total_limit=None,  # rotation is done by CompleteCheckpoints, after the new one is marked
        load_best_model_at_end=eval_strategy != "no" and cfg.load_best_model_at_end,
        metric_for_best_model="eval_loss" if eval_strategy != "no" else None,
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **checkpointing_arguments(cfg.gradient_checkpointing),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",  # TensorBoard is added below, writing into RUN/tensorboard
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


# --- the recipe ----------------------------------------------------------------------------------
def train(cfg: Config, callbacks: list | None = None) -> dict:
    """Fine-tune cfg.model_name_or_path on cfg.dataset; returns the summary (also RUN/train_results.json).

    `callbacks`: extra transformers TrainerCallbacks (e.g. Optuna pruning on the validation loss); they
    run before ours. Only the main process of a multi-process run returns the summary (others: {}).
    """
    # What the run holds until this call returns (one process may train many times: sweeps, `loralab run`):
    # its log file (RUN/train.log), attached once the run folder is written to, and a replaced run's return.
    with contextlib.ExitStack() as run_scope:
        return _train(cfg, callbacks, run_scope)


def _train(cfg: Config, callbacks: list | None, run_scope: contextlib.ExitStack) -> dict:
    from accelerate import PartialState
    from transformers.trainer_callback import EarlyStoppingCallback, ProgressCallback

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    # Under accelerate launch / torchrun: one process per device (gloo processes on a CPU-only machine).
    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process

    # 1. Run folder: never overwrite without asking; resume from the newest complete checkpoint.
    #    Nothing is written into it before the data and model below have loaded, so a mistake there
    #    leaves no half run folder behind that would block the corrected command.
    run_dir, resume_from = prepare_run_dir(cfg, is_main)

    # 2. Tokenizer with the run's chat template, and the data encoded through the one template path.
    tokenizer = models.load_tokenizer(cfg)
    train_examples, train_counts = encode_split(tokenizer, data.load_conversations(cfg, "train"), cfg)
    eval_examples, eval_counts = encode_split(tokenizer, data.load_conversations(cfg, "eval"), cfg)
    if not train_examples:
        raise LoralabError(
            f"dataset `{cfg.dataset}`: no training example has a token to learn after masking the prompt and "
            f"cutting to cutoff_len={cfg.cutoff_len} ({train_counts}); raise cutoff_len, set overflow=truncate, "
            "or check that the records have non-empty outputs"
        )

    # 3. Model: LoRA adapter on the base (or full fine-tuning). Seeded so the adapter init is reproducible.
    transformers.set_seed(cfg.seed)
    model = build_model(cfg)
    trainable, total = count_params(model)
    dtype = models.pick_dtype(cfg)
    if is_main and (note := models.cpu_dtype_note(cfg, dtype)):
        log.warning(note)
    facts = {
        "examples": {"train": len(train_examples), "eval": len(eval_examples)},
        "overflow": {"train": train_counts, "eval": eval_counts},
        "parameters": {"trainable": trainable, "total": total},
    }

    # The start succeeded: only now does a replaced run make way. It is kept aside until this run finishes,
    # and put back if this run fails before its first complete checkpoint (the run's ExitStack unwinds
    # after the log file is closed).
    previous = set_aside_previous_run(run_dir) if is_main and resume_from is None else None
    if previous is not None:
        run_scope.push(lambda failed, *_: restore_previous_run(run_dir, previous) if failed else None)

    if is_main:  # the run folder describes itself from here on
        run_scope.enter_context(log_to_file(run_dir / "train.log"))
        if logging.getLogger("loralab").getEffectiveLevel() > logging.INFO:  # called as a library: still log the run
            logging.getLogger("loralab").setLevel(logging.INFO)
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
            clean_for_resume(run_dir, resume_from)
        for name, counts, n in (
            ("train", train_counts, len(train_examples)),
            ("validation", eval_counts, len(eval_examples)),
        ):
            if counts["conversations"]:
                log.info(
                    "%s: %d of %d conversations used; over cutoff_len=%d: %d truncated, %d dropped; "
                    "%d without answer tokens dropped",
                    name,
                    n,
                    counts["conversations"],
                    cfg.cutoff_len,
                    counts["truncated"],
                    counts["dropped_too_long"],
                    counts["no_labels"],
                )
        if cfg.eval_strategy != "no" and not eval_examples:
            log.warning("no validation data (eval_dataset unset/empty and val_size=0): the last step's model is kept")
        log.info(
            "%s fine-tuning of %s: %s trainable of %s parameters (%.2f%%), %s",
            cfg.finetuning_type,
            cfg.model_name_or_path,
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
            str(dtype).removeprefix("torch."),
        )
        runinfo.write_run_info(run_dir, cfg, tokenizer, finetuning_type=cfg.finetuning_type, **facts)
        copy_manifests(cfg, run_dir)
    state.wait_for_everyone()

    # 4. Trainer: our collator and batch order; validation loss picks the best checkpoint.
    has_eval = cfg.eval_strategy != "no" and bool(eval_examples)
    args = training_arguments(cfg, run_dir, has_eval, dtype)
    optimizers = (None, None)
    if cfg.loraplus_lr_ratio and cfg.finetuning_type == "lora":
        from peft.optimizers import create_loraplus_optimizer

        optimizers = (
            create_loraplus_optimizer(
                model,
                torch.optim.AdamW,
                lr=cfg.learning_rate,
                loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                weight_decay=cfg.weight_decay,
            ),
            None,
        )
    extra = [CompleteCheckpoints(run_dir, cfg.save_total_limit), RunLog(run_dir), LlamaFactoryTrainerLog(run_dir)]
    if has_eval and cfg.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        extra.append(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    trainer = LoralabTrainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples if has_eval else None,
        data_collator=make_collator(cfg, tokenizer),
        # The divergence check first (nothing may act on a NaN), then the caller's: they may act on a
        # validation result.
        callbacks=[StopOnNonFinite(), *(callbacks or [])] + extra,
        optimizers=optimizers,
        lengths=[len(e["input_ids"]) for e in train_examples],
        group_by_length=cfg.group_by_length,
        max_tokens_per_pass=batch_layout(cfg, torch.cuda.is_available())[2],
    )
    trainer.remove_callback(ProgressCallback)  # RunLog draws the progress bar
    if has_eval and cfg.eval_generate_samples and is_main:  # replies scored beside each validation loss
        trainer.add_callback(generation_validation.GenerationValidation(trainer, cfg, tokenizer, run_dir))

    # 5. Train. Running out of memory is a settings problem, said in one line.
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except (torch.OutOfMemoryError, MemoryError):
        raise LoralabError(
            f"per_device_train_batch_size: a batch of {cfg.per_device_train_batch_size} sequences of up to "
            f"{cfg.cutoff_len} tokens does not fit in memory; set max_tokens_per_pass (tokens per "
            "forward/backward pass, same results) or lower per_device_train_batch_size (raise "
            "gradient_accumulation_steps to keep the effective batch), lower cutoff_len, or set "
            "gradient_checkpointing=true"
        ) from None

    # 6. The final model, loss plots and the summary.
    return finish_run(trainer, result, cfg, tokenizer, run_dir, is_main, resume_from, facts)


def finish_run(
    trainer: LoralabTrainer,
    result,
    cfg: Config,
    tokenizer,
    run_dir: Path,
    is_main: bool,
    resume_from: Path | None,
    facts: dict,
) -> dict:
    """The final model at the top of the run folder: the best checkpoint by validation loss (loaded back
    by the Trainer), else the last step's; then the loss plots and RUN/train_results.json (the summary).
    save_model gathers sharded (DeepSpeed/FSDP) weights, so every process calls it; only the main process
    writes the rest and returns the summary (others: {})."""
    st = trainer.state
    last_checkpoint = run_dir / f"{CHECKPOINT_PREFIX}{st.global_step}"
    trainer.save_model(str(run_dir))
    if not is_main:
        return {}
    tokenizer.save_pretrained(run_dir)
    if st.best_model_checkpoint and cfg.load_best_model_at_end:
        log.info(
            "final %s in %s = %s (best validation loss %.4f at step %d of %d)",
            "adapter" if cfg.finetuning_type == "lora" else "model",
            run_dir,
            Path(st.best_model_checkpoint).name,
            st.best_metric,
            st.best_global_step,
            st.global_step,
        )
    else:
        log.info(
            "final model in %s = the last step's (%d; %s)",
            run_dir,
            st.global_step,
            "load_best_model_at_end is false" if st.best_model_checkpoint else "no validation data",
        )
    if cfg.save_last and last_checkpoint.is_dir():
        copy_model_files(last_checkpoint, run_dir / "last")
        tokenizer.save_pretrained(run_dir / "last")
        log.info("last step's model also kept in %s", run_dir / "last")
    plot_losses(run_dir)

    run_log = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunLog))
    session_tokens = st.num_input_tokens_seen - run_log.start_tokens
    best_loss = st.best_metric if st.best_model_checkpoint else None
    summary = {
        "run_dir": str(run_dir),
        "finetuning_type": cfg.finetuning_type,
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "epochs": round(st.epoch or 0.0, 4),
        "stopped_early": st.global_step < st.max_steps,
        "best_step": st.best_global_step if best_loss is not None else None,
        "best_eval_loss": best_loss,
        "best_eval_perplexity": math.exp(min(best_loss, 50.0)) if best_loss is not None else None,
        "train_loss": result.training_loss,
        "examples": facts["examples"],
        "overflow": {"cutoff_len": cfg.cutoff_len, "mode": cfg.overflow, **facts["overflow"]},
        "parameters": facts["parameters"],
        "runtime_s": result.metrics.get("train_runtime"),
        "train_step_time_s": run_log.step_time,
        "tokens_seen": st.num_input_tokens_seen,
        "tokens_per_s": session_tokens / run_log.step_time if run_log.step_time > 0 else None,
        "padding_efficiency": trainer.real_tokens / trainer.padded_tokens if trainer.padded_tokens else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "eval_max_samples": cfg.eval_max_samples,
        "eval_generation": generation_validation.summary(
            cfg, run_dir, st.best_global_step if best_loss is not None else None
        ),
    }
    # LLaMA-Factory's bookkeeping beside ours: the Trainer's train metrics (epoch, total_flos, train_loss,
    # train_runtime, train_samples_per_second, train_steps_per_second) also in train_results.json and in
    # all_results.json, and the Trainer's state in trainer_state.json, as its `save_metrics` / `save_state`.
    trainer_metrics = dict(result.metrics)
    runinfo.write_json(run_dir / "train_results.json", {**summary, **trainer_metrics})
    runinfo.update_all_results(run_dir, trainer_metrics)
    trainer.save_state()
    drop_previous_run(run_dir)  # this run is complete: the one it replaced goes
    log.info(
        "done: %d steps, best validation loss %s, %s tokens/s; results in %s",
        st.global_step,
        f"{best_loss:.4f}" if best_loss is not None else "n/a",
        f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "n/a",
        run_dir / "train_results.json",
    )
    return summary
