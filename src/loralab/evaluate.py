"""Predict, score and compare: `loralab predict`, `loralab eval`, `loralab compare`.

A prediction folder holds what LLaMA-Factory writes for `do_predict`, so its tools read ours:

    generated_predictions.jsonl   one {"prompt", "predict", "label", "answer"} per line; prompt = rendered
                                  chat-template text (special tokens kept), predict = plain text, label =
                                  the text LLaMA-Factory scores against, answer = the clean reference
    predict_results.json          samples, seconds, samples/s, generated tokens/s, settings
    config.yaml, run_info.json    what ran (runinfo)

`eval` adds metrics.json (every metric with its 95% bootstrap CI and the implementation that made
it, from metrics.py) and per_sample_scores.jsonl. Base vs tuned (`evaluate_models`) generates with
one loaded model, the adapter switched off for the base, and adds comparison.json.

Default folders, under output_dir: predict-SPLIT-TAG/, eval-SPLIT-TAG/, eval-SPLIT-base-vs-TAG/
(TAG = the adapter's folder name or `base`); nothing is overwritten without --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from loralab import data, metrics
from loralab.config import Config
from loralab.errors import LoralabError
from loralab.generate import Engine, GenerationSettings
from loralab.runinfo import check_output_dir, update_all_results, write_json, write_run_info
from loralab.templates import encode_for_prediction, encode_prompt, with_default_system

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "val": "eval", "test": "test"}  # --split -> data.load_conversations' name
PREDICTIONS = "generated_predictions.jsonl"
PREDICT_RESULTS = "predict_results.json"
METRICS = "metrics.json"
PER_SAMPLE = "per_sample_scores.jsonl"
COMPARISON = "comparison.json"
PRED_FIELDS = ("prompt", "predict", "label")
# In memory a prediction row's `label` is the clean answer (what the standard metrics use) and `lf_label` the
# label text LLaMA-Factory scores against (with the template's text after the closing token, e.g. "\n" after
# <|im_end|>). In generated_predictions.jsonl `label` is LLaMA-Factory's text, so LLaMA-Factory's own
# scripts (scripts/eval_bleu_rouge.py) get our predict_* numbers from our file, and `answer` keeps the clean
# answer. (Files written before this kept the clean answer in `label` and LLaMA-Factory's in `lf_label`.)
LF_LABEL = "lf_label"
ANSWER = "answer"


def _sha(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


# --- data ----------------------------------------------------------------------------------------
def load_examples(cfg: Config, split: str = "test", data_file: str | None = None) -> tuple[list, list[str], dict]:
    """(prompt conversations, labels, source) of a split or a data file.

    The label is the content of the last assistant message; the prompt is every message before it.
    """
    if data_file:
        records, fmt = data.load_records(data_file)
        if cfg.max_samples is not None:
            records = records[: cfg.max_samples]
        convs = [data.to_messages(r) for r in records]
        where, source = str(data_file), {"split": None, "data": str(data_file), "format": fmt}
    else:
        if split not in SPLITS:
            raise LoralabError(f"--split: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        dataset = {"train": cfg.dataset, "val": cfg.eval_dataset, "test": cfg.test_dataset}[split]
        convs = data.load_conversations(cfg, SPLITS[split])
        where = f"dataset {dataset}" if dataset else f"split {split}"
        if not convs:
            raise LoralabError(
                f"--split {split}: no data (eval_dataset is unset and val_size is 0); "
                "set eval_dataset or val_size, or use --data FILE"
            )
        source = {"split": split, "dataset": dataset, "dataset_dir": cfg.dataset_dir}
        cap = data.subset_cap(cfg, SPLITS[split])
        if cap:  # the numbers are on the first N records of the split: say so wherever they are written
            source["capped_by"] = {cap[0]: cap[1]}
    prompts, labels = [], []
    for i, conv in enumerate(convs):
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            raise LoralabError(f"{where}: record {i}: expected a prompt followed by the assistant's reply (the label)")
        prompts.append(conv[:-1])
        labels.append(conv[-1]["content"])
    source["n_samples"] = len(labels)
    source["labels_sha256"] = _sha(labels)
    return prompts, labels, source


def split_tag(split: str, data_file: str | None) -> str:
    return Path(data_file).stem if data_file else split


def adapter_tag(path: str | None) -> str:
    """A folder-name tag for an adapter path: runs/exp1 -> exp1, runs/exp1/checkpoint-500 -> exp1-checkpoint-500."""
    if not path:
        return "base"
    p = Path(path).resolve()
    if p.name in ("best", "last", "adapter") or p.name.startswith("checkpoint-"):
        return f"{p.parent.name}-{p.name}"
    return p.name or "adapter"


# --- predictions files ---------------------------------------------------------------------------
def read_predictions(path: str | Path) -> list[dict]:
    """A generated_predictions.jsonl (ours or LLaMA-Factory's) -> rows with prompt, predict, label."""
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"--predictions: {path} not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoralabError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LoralabError(f"{path}: line {n}: expected a JSON object with {', '.join(PRED_FIELDS)}")
            for key in PRED_FIELDS:
                if key not in row:
                    raise LoralabError(
                        f"{path}: line {n}: missing field `{key}`; expected "
                        '{"prompt", "predict", "label"} per line (LLaMA-Factory\'s format)'
                    )
                if not isinstance(row[key], str):
                    raise LoralabError(
                        f"{path}: line {n}: field `{key}` must be a string, got {type(row[key]).__name__}"
                    )
            rows.append({k: row[k] for k in PRED_FIELDS})
            if isinstance(row.get(ANSWER), str):  # written by loralab: `label` is LLaMA-Factory's text
                rows[-1].update({"label": row[ANSWER], LF_LABEL: row["label"]})
            elif isinstance(row.get(LF_LABEL), str):  # written by an earlier loralab
                rows[-1][LF_LABEL] = row[LF_LABEL]
    if not rows:
        raise LoralabError(f"{path}: no predictions (the file is empty)")
    return rows


def write_predictions(path: Path, rows: list[dict]) -> None:
    """LLaMA-Factory's {"prompt", "predict", "label"} with its label text, plus the clean `answer`."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            line = {"prompt": row["prompt"], "predict": row["predict"], "label": row.get(LF_LABEL, row["label"])}
            f.write(json.dumps({**line, ANSWER: row["label"]}, ensure_ascii=False) + "\n")


# --- predict -------------------------------------------------------------------------------------
def _prediction_ids(tokenizer, cfg: Config, prompts: list, labels: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, label ids) per record as LLaMA-Factory's do_predict makes them.

    A prompt that does not fit cutoff_len beside its label is cut as LLaMA-Factory cuts it (its head kept,
    templates.encode_for_prediction), so the predictions are made from what LLaMA-Factory's are; said once.
    """
    encoded, cut = [], 0
    for i, (prompt, label) in enumerate(zip(prompts, labels)):
        messages = with_default_system(prompt, cfg.default_system)
        prompt_ids, label_ids = encode_for_prediction(tokenizer, messages, label, cfg.cutoff_len)
        if not prompt_ids:
            raise LoralabError(
                f"cutoff_len: {cfg.cutoff_len} leaves no prompt token for record {i} beside its label; raise cutoff_len"
            )
        if prompt_ids != encode_prompt(tokenizer, messages):
            cut += 1
        encoded.append((prompt_ids, label_ids))
    if cut:
        log.warning(
            "%d of %d prompts are longer than cutoff_len (%d) beside their label and are cut as LLaMA-Factory "
            "cuts them (their end goes, the assistant header included); raise cutoff_len to predict from whole prompts",
            cut,
            len(prompts),
            cfg.cutoff_len,
        )
    return encoded


def predict_into(
    engine: Engine,
    cfg: Config,
    prompts: list,
    labels: list[str],
    source: dict,
    out_dir: Path,
    adapter: str | None,
    adapter_path: str | None = None,
    progress: bool = True,
    preparation_seconds: float | None = None,
) -> dict:
    """Generate for every prompt, write generated_predictions.jsonl + predict_results.json into out_dir.

    `preparation_seconds`: how long loading the model (and merging the adapter) took, when the caller timed it
    (LLaMA-Factory's predict_model_preparation_time)."""
    import math

    import torch

    settings = GenerationSettings.from_config(cfg)
    log.info(
        "predicting %d samples with %s%s (batch %d, %s)",
        len(prompts),
        cfg.model_name_or_path,
        f" + {adapter_path}" if adapter else " (base)",
        cfg.infer_batch_size,
        "greedy" if not settings.do_sample else "sampling",
    )
    encoded = _prediction_ids(engine.tokenizer, cfg, prompts, labels)
    start = time.perf_counter()
    completions = engine.generate(
        prompts,
        settings,
        adapter=adapter,
        batch_size=cfg.infer_batch_size,
        progress=progress,
        prompt_token_ids=[prompt_ids for prompt_ids, _ in encoded],
    )
    seconds = time.perf_counter() - start
    # finish_reason stays in memory for scoring (hit_max_new_tokens); the file keeps LLaMA-Factory's three
    # fields (its label text, from the same cut ids) plus the clean answer (write_predictions)
    decode = engine.tokenizer.decode
    rows = [
        {
            "prompt": decode(prompt_ids, skip_special_tokens=False),  # as LLaMA-Factory writes it
            "predict": c.text,
            "label": label,
            "finish_reason": c.finish_reason,
            LF_LABEL: decode(label_ids, skip_special_tokens=True),
        }
        for (prompt_ids, label_ids), c, label in zip(encoded, completions, labels)
    ]
    write_predictions(out_dir / PREDICTIONS, rows)
    generated = sum(c.completion_tokens for c in completions)
    reasons = {r: sum(c.finish_reason == r for c in completions) for r in ("stop", "length")}
    results = {
        **source,
        "model": cfg.model_name_or_path,
        "adapter": adapter_path if adapter else None,
        "backend": engine.backend,
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.infer_batch_size,
        "settings": settings.as_dict(),
        "samples": len(rows),
        "seconds": round(seconds, 3),
        "samples_per_second": round(len(rows) / seconds, 4),
        "prompt_tokens": sum(c.prompt_tokens for c in completions),
        "generated_tokens": generated,
        "generated_tokens_per_second": round(generated / seconds, 2),
        "finish_reasons": reasons,
        # LLaMA-Factory's names for the same timing (a step: a batch of infer_batch_size prompts)
        "predict_runtime": round(seconds, 4),
        "predict_samples_per_second": round(len(rows) / seconds, 3),
        "predict_steps_per_second": round(math.ceil(len(rows) / cfg.infer_batch_size) / seconds, 3),
    }
    if preparation_seconds is not None:
        results["predict_model_preparation_time"] = round(preparation_seconds, 4)
    write_json(out_dir / PREDICT_RESULTS, results)
    if not (out_dir / "train_results.json").is_file():  # a training run's folder keeps its own description
        write_run_info(
            out_dir,
            cfg,
            engine.tokenizer,
            stage="predict",
            split=source.get("split"),
            data=source.get("data"),
            adapter=results["adapter"],
        )
    log.info(
        "%d samples in %.1fs: %.2f samples/s, %.1f generated tokens/s (%d hit max_new_tokens)",
        len(rows),
        seconds,
        results["samples_per_second"],
        results["generated_tokens_per_second"],
        reasons["length"],
    )
    return {"dir": str(out_dir), "rows": rows, "results": results}


def _default_dir(cfg: Config, kind: str, split: str, data_file: str | None, tag: str) -> Path:
    return Path(cfg.output_dir) / f"{kind}-{split_tag(split, data_file)}-{tag}"


def _single_adapter(cfg: Config) -> str | None:
    paths = cfg.adapter_paths
    if len(paths) > 1:
        raise LoralabError(
            "adapter_name_or_path: predict/eval score one adapter at a time; give a single folder "
            "(or use `loralab eval --compare-base` / evaluate_models for several)"
        )
    return paths[0] if paths else None


def predict(
    cfg: Config,
    split: str | None = None,
    data_file: str | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """`loralab predict`: the configured model (+ adapter) on a split or file -> a prediction folder.

    With `do_predict: true` and neither --split nor --data, it does what LLaMA-Factory's do_predict does.
    """
    if cfg.do_predict and split is None and data_file is None:
        return predict_like_llamafactory(cfg, output_dir, overwrite, progress)
    split = split or "test"
    adapter_path = _single_adapter(cfg)
    prompts, labels, source = load_examples(cfg, split, data_file)
    out = Path(output_dir) if output_dir else _default_dir(cfg, "predict", split, data_file, adapter_tag(adapter_path))
    out = check_output_dir(out, overwrite)
    return predict_one_model(cfg, adapter_path, adapter_tag(adapter_path), prompts, labels, source, out, progress)


def predict_one_model(
    cfg: Config,
    adapter_path: str | None,
    tag: str,
    prompts: list,
    labels: list[str],
    source: dict,
    out: Path,
    progress: bool,
) -> dict:
    """predict_into with the base model or one adapter, merged into the weights (no LoRA work per token)."""
    start = time.perf_counter()
    engine = Engine(cfg, {tag: adapter_path} if adapter_path else {}, merge=True)
    preparation = time.perf_counter() - start
    adapter = engine.adapter_names[0] if adapter_path else None
    return predict_into(engine, cfg, prompts, labels, source, out, adapter, adapter_path, progress, preparation)


def predict_like_llamafactory(
    cfg: Config, output_dir: str | None = None, overwrite: bool = False, progress: bool = True
) -> dict:
    """LLaMA-Factory's `do_predict`: predict on eval_dataset and score, straight into output_dir.

    output_dir then holds generated_predictions.jsonl and predict_results.json (with the predict_*
    metrics) where LLaMA-Factory writes them, plus loralab's metrics.json (95% CIs) and per-sample scores.
    """
    if not cfg.eval_dataset and not cfg.val_size:
        raise LoralabError(
            "do_predict: predicts on eval_dataset, which is unset; set eval_dataset to the "
            "dataset to predict on (as in LLaMA-Factory), or pass --split/--data"
        )
    result = evaluate(
        cfg,
        "val",
        output_dir=output_dir or cfg.output_dir,
        overwrite=overwrite or cfg.overwrite_output_dir,
        progress=progress,
    )
    results = json.loads((Path(result["dir"]) / PREDICT_RESULTS).read_text(encoding="utf-8"))
    update_all_results(result["dir"], {k: v for k, v in results.items() if k.startswith("predict_")})
    return {"dir": result["dir"], "results": results, "metrics": result["metrics"]}


def predict_after_training(cfg: Config, run_dir: str, progress: bool = True) -> dict:
    """LLaMA-Factory's do_train + do_predict: the model just trained (the run folder's adapter, or its model for
    full fine-tuning) predicts on eval_dataset, into the run folder (predict_results.json, all_results.json)."""
    trained = {"adapter_name_or_path": run_dir} if cfg.finetuning_type == "lora" else {"model_name_or_path": run_dir}
    return predict_like_llamafactory(cfg.model_copy(update=trained), run_dir, overwrite=True, progress=progress)


# --- score ---------------------------------------------------------------------------------------
def score_into(out_dir: Path, rows: list[dict], info: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Score prediction rows, write metrics.json and per_sample_scores.jsonl; return metrics.json's content."""
    reasons = [r["finish_reason"] for r in rows] if all("finish_reason" in r for r in rows) else None
    # predict_* use LLaMA-Factory's label text (rows from a prediction run carry it as lf_label; a
    # generated_predictions.jsonl read back has LLaMA-Factory's own label, or ours when we wrote it).
    scored = metrics.score_predictions(
        [r["predict"] for r in rows],
        [r["label"] for r in rows],
        n_boot=n_boot,
        seed=seed,
        lf_labels=[r.get(LF_LABEL, r["label"]) for r in rows],
        finish_reasons=reasons,
    )
    per_sample = scored.pop("per_sample")
    result = {**info, "labels_sha256": _sha([r["label"] for r in rows]), **scored}
    write_json(out_dir / METRICS, result)
    with (out_dir / PER_SAMPLE).open("w", encoding="utf-8") as f:
        for i, (row, scores) in enumerate(zip(rows, per_sample)):
            f.write(json.dumps({"index": i, **row, **scores}, ensure_ascii=False) + "\n")
    return result


def _lf_metrics(result: dict) -> dict:
    """LLaMA-Factory's flat predict_* keys, as in its predict_results.json."""
    return {k: round(result["metrics"][k]["value"], 4) for k in metrics.LF_METRICS}


def evaluate(
    cfg: Config,
    split: str = "test",
    data_file: str | None = None,
    predictions: str | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict:
    """`loralab eval`: predict (or read --predictions FILE) and score; returns metrics.json's content + dir."""
    if predictions:
        rows = read_predictions(predictions)
        out = Path(output_dir) if output_dir else Path(predictions).parent
        if output_dir:
            out = check_output_dir(out, overwrite)
        elif not overwrite:
            for name in (METRICS, PER_SAMPLE):
                if (out / name).exists():
                    raise LoralabError(f"{out / name}: already exists; pass --overwrite or --output-dir")
        info = {"split": None, "predictions": str(Path(predictions).resolve())}
        result = score_into(out, rows, info, n_boot=n_boot, seed=cfg.seed)
    else:
        adapter_path = _single_adapter(cfg)
        prompts, labels, source = load_examples(cfg, split, data_file)
        tag = adapter_tag(adapter_path)
        out = check_output_dir(
            Path(output_dir) if output_dir else _default_dir(cfg, "eval", split, data_file, tag), overwrite
        )
        pred = predict_one_model(cfg, adapter_path, tag, prompts, labels, source, out, progress)
        info = {**source, "model": cfg.model_name_or_path, "adapter": adapter_path, "predictions": PREDICTIONS}
        result = score_into(out, pred["rows"], info, n_boot=n_boot, seed=cfg.seed)
        write_json(out / PREDICT_RESULTS, {**pred["results"], **_lf_metrics(result)})
    return {"dir": str(out), **result}


def evaluate_models(
    cfg: Config,
    adapters: dict[str, str | None],
    split: str = "test",
    out_dir: str | Path | None = None,
    data_file: str | None = None,
    overwrite: bool = False,
    n_boot: int = 1000,
    progress: bool = True,
    pairs: list[tuple[str, str]] | None = None,
) -> dict:
    """Score several models on the same split with one loaded base model; the first is the reference.

    `adapters` maps a name to an adapter folder, or None for the base model, e.g.
    {"base": None, "tuned": "runs/exp1"}. Writes OUT/NAME/ (predictions, metrics) for each, and
    OUT/comparison.json: each later model against the first (delta, paired bootstrap CI, p-value), or
    the (a, b) `pairs` given (b - a), e.g. every other model against a sweep's winner.
    """
    if not adapters:
        raise LoralabError("evaluate_models: expected at least one model, e.g. {'base': None}")
    for name in adapters:
        if not name or "/" in name or name in (".", ".."):
            raise LoralabError(f"evaluate_models: model name {name!r} must be a plain folder name")
    for pair in pairs or []:
        if len(pair) != 2 or not set(pair) <= set(adapters):
            raise LoralabError(f"evaluate_models: pair {pair!r} must name two of the models {list(adapters)}")
    prompts, labels, source = load_examples(cfg, split, data_file)
    if out_dir is None:
        tags = [adapter_tag(p) for p in adapters.values()]
        out_dir = Path(cfg.output_dir) / f"eval-{split_tag(split, data_file)}-{'-vs-'.join(tags)}"
    out = check_output_dir(out_dir, overwrite)
    # A lone adapter is merged into the weights; with the base or other adapters to score, they stay apart.
    start = time.perf_counter()
    engine = Engine(cfg, {name: path for name, path in adapters.items() if path}, merge=len(adapters) == 1)
    preparation = time.perf_counter() - start  # one model for all: each folder reports its loading time
    models, per_sample = {}, {}
    for name, path in adapters.items():
        sub = out / name
        sub.mkdir(exist_ok=True)
        pred = predict_into(
            engine, cfg, prompts, labels, source, sub, name if path else None, path, progress, preparation
        )
        info = {**source, "model": cfg.model_name_or_path, "adapter": path, "predictions": PREDICTIONS}
        result = score_into(sub, pred["rows"], info, n_boot=n_boot, seed=cfg.seed)
        write_json(sub / PREDICT_RESULTS, {**pred["results"], **_lf_metrics(result)})
        per_sample[name] = read_per_sample(sub)
        models[name] = {
            "adapter": path,
            "dir": str(sub),
            "metrics": result["metrics"],
            "lengths": result.get("lengths"),
            "timing": {k: pred["results"][k] for k in ("seconds", "samples_per_second", "generated_tokens_per_second")},
        }
    names = list(adapters)
    comparisons = {}
    for a, b in pairs if pairs is not None else [(names[0], name) for name in names[1:]]:
        comparisons[f"{b}_vs_{a}"] = {
            "a": a,
            "b": b,
            **metrics.paired_compare(
                per_sample[a],
                per_sample[b],
                n_boot=n_boot,
                seed=cfg.seed,
                labels=([r["label"] for r in per_sample[a]], [r["label"] for r in per_sample[b]]),
            ),
        }
    summary = {
        **source,
        "model": cfg.model_name_or_path,
        "dir": str(out),
        "reference": names[0],
        "models": models,
        "comparisons": comparisons,
    }
    write_json(out / COMPARISON, summary)
    return summary


# --- compare -------------------------------------------------------------------------------------
def read_per_sample(folder: str | Path) -> list[dict]:
    path = Path(folder)
    if path.is_dir():
        path = path / PER_SAMPLE
    if not path.is_file():
        raise LoralabError(f"compare: {path} not found; expected an evaluation folder made by `loralab eval`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LoralabError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
    missing = [k for k in (*metrics.AVERAGED_METRICS, "bleu_stats", "label") if rows and k not in rows[0]]
    if not rows or missing:
        raise LoralabError(f"{path}: not a per-sample score file (missing {', '.join(missing) or 'rows'})")
    return rows


def _eval_info(folder: Path) -> dict:
    path = folder / METRICS if folder.is_dir() else folder.parent / METRICS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def compare_evaluations(run_a: str | Path, run_b: str | Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """B vs A, sample by sample, for two evaluations of the same split (`loralab compare A B`)."""
    a, b = read_per_sample(run_a), read_per_sample(run_b)
    info_a, info_b = _eval_info(Path(run_a)), _eval_info(Path(run_b))
    split_a, split_b = info_a.get("split"), info_b.get("split")
    if split_a and split_b and (split_a, info_a.get("dataset")) != (split_b, info_b.get("dataset")):
        raise LoralabError(
            f"compare: {run_a} is split {split_a} ({info_a.get('dataset')}) but {run_b} is split "
            f"{split_b} ({info_b.get('dataset')}); expected two evaluations of the same split"
        )
    result = metrics.paired_compare(
        a, b, n_boot=n_boot, seed=seed, labels=([r["label"] for r in a], [r["label"] for r in b])
    )
    return {"a": str(run_a), "b": str(run_b), "split": split_a or split_b, **result}


# --- tables --------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    return f"{value:.2f}"


def format_metrics_table(result: dict) -> str:
    """metric | value | 95% CI, one row per metric (then the lengths line)."""
    lines = [f"{'metric':<16} {'value':>8}  95% CI", "-" * 42]
    for name, m in result["metrics"].items():
        lines.append(f"{name:<16} {_fmt(m['value']):>8}  [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]")
    if result.get("lengths"):
        lines.append(format_lengths(result["lengths"]))
    return "\n".join(lines)


def format_lengths(lengths: dict, name: str = "") -> str:
    """'lengths (words): generated 23.1 vs reference 25.4 (x0.91); 3% hit max_new_tokens'."""
    if not lengths:
        return ""
    ratio = f" (x{lengths['ratio']:.2f})" if lengths.get("ratio") is not None else ""
    cut = lengths.get("hit_max_new_tokens")
    cut = f"; {cut:.0f}% hit max_new_tokens" if cut is not None else "; max_new_tokens hits unknown"
    return (
        f"{name + ' ' if name else ''}lengths in words: generated {lengths['mean_pred_words']:.1f} vs reference "
        f"{lengths['mean_label_words']:.1f}{ratio}{cut}"
    )


def format_paired_table(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """metric | A | B | B-A | 95% CI of B-A | p, from a metrics.paired_compare result."""
    wa, wb = max(10, len(name_a)), max(10, len(name_b))  # a recipe's whole name (llamafactory_example)
    head = f"{'metric':<16} {name_a:>{wa}} {name_b:>{wb}} {'delta':>8}  {'95% CI of delta':<18} {'p':>6}"
    lines = [head, "-" * len(head)]
    for name, m in result["metrics"].items():
        ci = f"[{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]"
        lines.append(
            f"{name:<16} {_fmt(m['value_a']):>{wa}} {_fmt(m['value_b']):>{wb}} {m['delta']:>+8.2f}  "
            f"{ci:<18} {m['p_value']:>6.3f}"
        )
    return "\n".join(lines)


def format_comparison_table(summary: dict) -> str:
    """Side-by-side table of an `evaluate_models` result: each model against the reference."""
    parts = []
    for comp in summary["comparisons"].values():
        parts.append(format_paired_table(comp, comp["a"], comp["b"]))
    if not parts:  # a single model: its own table
        for name, model in summary["models"].items():
            parts.append(f"{name}\n" + format_metrics_table(model))
    lengths = [format_lengths(m.get("lengths"), name) for name, m in summary["models"].items() if m.get("lengths")]
    if lengths and summary["comparisons"]:
        parts.append("\n".join(lengths))
    n = summary.get("n_samples")
    capped = "".join(f" (the first {n} records: {k}={v})" for k, v in (summary.get("capped_by") or {}).items())
    head = (
        f"{summary.get('split') or summary.get('data')}: {n} samples{capped}, 95% CIs by bootstrap, "
        "p by paired randomization"
    )
    return head + "\n" + "\n\n".join(parts)
