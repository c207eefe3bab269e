"""Generation-based validation during training (`eval_generate_samples: N`).

The validation loss says how well the model predicts the reference answers token by token; it does
not say whether the answers it writes are any good. With `eval_generate_samples: N`, every validation
also generates greedy replies (max_new_tokens) for the first N validation records with the model
being trained and logs their rougeL, predict_rouge-l (LLaMA-Factory's) and normalized exact match
beside the validation loss: metrics.jsonl, TensorBoard (eval/rougeL, ...), training_eval_generation.png
and train_results.json. The replies and per-sample scores of each validation stay in
RUN/eval_generation/step-N.jsonl, so every number can be checked.

Generation goes through the one engine (`Engine.from_model`: the model in memory, no copy, no
merge) and is scored by metrics.py like `loralab eval`. Afterwards the model is back in the mode it
was in; the engine brings its own KV cache and passes use_cache itself, so the model's config,
gradient checkpointing and the random state are untouched (greedy decoding draws no random numbers):
training continues exactly as without this option. The best checkpoint is still chosen by validation
loss. Only the main process generates (a multi-process run's other ranks wait at the next step).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from loralab import evaluate, metrics
from loralab.config import Config
from loralab.generate import Engine, GenerationSettings

log = logging.getLogger(__name__)

FOLDER = "eval_generation"
# metric (metrics.py name) -> key logged beside eval_loss (TensorBoard shows eval_X as eval/X)
LOGGED = {"rougeL": "eval_rougeL", "predict_rouge-l": "eval_predict_rouge-l", "exact_match": "eval_exact_match"}
LOG_KEYS = (*LOGGED.values(), "eval_generate_seconds")


class GenerationValidation(TrainerCallback):
    """After each validation loss: greedy replies for the first N validation records, scored and logged."""

    def __init__(self, trainer, cfg: Config, tokenizer, run_dir: Path):
        self.trainer, self.cfg, self.tokenizer = trainer, cfg, tokenizer
        self.folder = Path(run_dir) / FOLDER
        prompts, labels, _ = evaluate.load_examples(cfg, "val")
        n = cfg.eval_generate_samples
        if n > len(labels):
            log.warning(
                "eval_generate_samples: %d, but only %d validation records; generating for all of them", n, len(labels)
            )
        self.prompts, self.labels = prompts[:n], labels[:n]
        self.settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)  # greedy: reproducible
        self.sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        if self.sharded:  # the main process alone does not hold the whole model
            log.warning("eval_generate_samples: skipped, the weights are sharded (DeepSpeed/FSDP)")
            return
        logs = self.generate_and_score(model, state.global_step)
        self.trainer.log(logs)  # metrics.jsonl, TensorBoard and log_history, like the validation loss

    def generate_and_score(self, model, step: int) -> dict:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            engine = Engine.from_model(self.cfg, model, self.tokenizer, name="trained")
            adapter = "trained" if engine.adapter_names else None
            completions = engine.generate(
                self.prompts, self.settings, adapter=adapter, batch_size=self.cfg.infer_batch_size
            )
        finally:
            model.train(was_training)
        preds = [c.text for c in completions]
        scored = metrics.score_predictions(
            preds, self.labels, n_boot=200, seed=self.cfg.seed, finish_reasons=[c.finish_reason for c in completions]
        )
        seconds = time.perf_counter() - start
        self.write_samples(step, preds, completions, scored["per_sample"])
        values = {name: scored["metrics"][name]["value"] for name in LOGGED}
        log.info(
            "step %d: generation on %d validation records: rougeL %.2f, predict_rouge-l %.2f, exact match "
            "%.1f%% (%.0fs)",
            step,
            len(preds),
            values["rougeL"],
            values["predict_rouge-l"],
            values["exact_match"],
            seconds,
        )
        return {**{LOGGED[name]: v for name, v in values.items()}, "eval_generate_seconds": round(seconds, 3)}

    def write_samples(self, step: int, preds: list[str], completions, per_sample: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"step-{step}.jsonl").open("w", encoding="utf-8") as f:
            for i, (prompt, pred, label, c, scores) in enumerate(
                zip(self.prompts, preds, self.labels, completions, per_sample)
            ):
                row = {
                    "index": i,
                    "prompt": prompt[-1]["content"],
                    "predict": pred,
                    "label": label,
                    "finish_reason": c.finish_reason,
                    **{k: scores[k] for k in LOGGED},
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def summary(cfg: Config, run_dir: Path, best_step: int | None) -> dict | None:
    """train_results.json's `eval_generation`: the scores at the best step (the run's model) and at the
    last validation, read back from metrics.jsonl (which a resumed run keeps)."""
    if not cfg.eval_generate_samples:
        return None
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    points = [r for r in records if LOGGED["rougeL"] in r]
    if not points:
        return None

    def scores(record: dict) -> dict:
        return {"step": record["step"], **{name: record[key] for name, key in LOGGED.items()}}

    at_best = next((scores(r) for r in points if r["step"] == best_step), None)
    last_file = Path(run_dir) / FOLDER / f"step-{points[-1]['step']}.jsonl"
    n = sum(1 for line in last_file.open(encoding="utf-8") if line.strip()) if last_file.is_file() else None
    return {
        "samples": n,
        "eval_generate_samples": cfg.eval_generate_samples,
        "max_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
        "records": f"the first {n} validation records",
        "at_best_step": at_best,
        "last": scores(points[-1]),
        "validations": len(points),
        "seconds": round(sum(r.get("eval_generate_seconds", 0.0) for r in points), 2),
        "files": f"{FOLDER}/step-N.jsonl",
    }
