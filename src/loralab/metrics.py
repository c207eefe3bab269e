"""Scoring predictions against labels: pure functions on strings, no model.

Two families of metrics, each with a 95% bootstrap confidence interval:

- LLaMA-Factory compatible (`predict_bleu-4`, `predict_rouge-1/2/l`): the numbers LLaMA-Factory's
  `ComputeSimilarity` reports. Per sample: jieba word segmentation + rouge-chinese F-scores, and nltk
  character-level BLEU-4 with smoothing method3; each x100 rounded to 4 decimals, then the mean.
  Fine for Chinese; for English the jieba/character tricks make them hard to compare with papers.
- Standard: sacreBLEU corpus BLEU (13a tokenizer, with its signature) and rouge-score ROUGE-1/2/L/Lsum
  F-measure with the Porter stemmer, averaged over samples, x100.

Format-proof metrics beside them (a reply can score well on ROUGE by copying the answer's shape):
normalized exact match, the generated length in words against the reference's, and the share of
replies cut at max_new_tokens (when the finish reasons are known).

`paired_compare` tests two evaluations of the same split against each other, sample by sample.
"""

import logging
import re
import string
import unicodedata
from functools import cache
from importlib.metadata import version

import numpy as np

from loralab.errors import LoralabError

LF_METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
AVERAGED_METRICS = LF_METRICS + ROUGE_TYPES  # mean of a per-sample score
METRICS = LF_METRICS + ("sacrebleu",) + ROUGE_TYPES


# --- per-sample scores ----------------------------------------------------------------------------


@cache
def _jieba():
    import jieba

    jieba.setLogLevel(logging.CRITICAL)  # it logs "Building prefix dict..." to stderr otherwise
    jieba.initialize()  # the dictionary ships inside the package: no download
    return jieba


def lf_scores(pred: str, label: str) -> dict[str, float]:
    """One sample's LLaMA-Factory scores (ComputeSimilarity): rouge on jieba words, BLEU-4 on chars."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hyp_words = " ".join(jieba.cut(pred))
    ref_words = " ".join(jieba.cut(label))
    if not hyp_words.split() or not ref_words.split():
        # rouge-chinese raises on an empty side; LLaMA-Factory scores it 0
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(hyp_words, ref_words)[0]
        rouge = {k: scores[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    out = {"predict_bleu-4": float(round(bleu * 100, 4))}
    out.update({f"predict_{k}": float(round(v * 100, 4)) for k, v in rouge.items()})
    return out


def split_sentences(text: str) -> str:
    """Put each sentence on its own line, as rougeLsum expects (ends: . ! ? 。！？ or a newline)."""
    parts = re.split(r"(?<=[.!?。！？])\s+|\n+", text.strip())
    return "\n".join(p.strip() for p in parts if p.strip())


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(pred: str, label: str) -> dict[str, float]:
    """One sample's rouge-score F-measures x100 (English tokenizer + Porter stemmer)."""
    scores = _rouge_scorer().score(split_sentences(label), split_sentences(pred))  # target first
    return {k: float(scores[k].fmeasure * 100) for k in ROUGE_TYPES}


def _bleu_metric():
    from sacrebleu.metrics import BLEU

    return BLEU()  # the defaults of sacrebleu.corpus_bleu: 13a, mixed case, exp smoothing


def bleu_stats(bleu, pred: str, label: str) -> list[int]:
    """BLEU sufficient statistics of one sample: [hyp_len, ref_len, matches 1-4, totals 1-4].

    Corpus BLEU only sums these over sentences, so sums over any subset (a bootstrap resample)
    give that subset's corpus BLEU exactly, without re-tokenizing.
    """
    s = bleu.corpus_score([pred], [[label]])
    return [s.sys_len, s.ref_len, *s.counts, *s.totals]


def bleu_from_stats(stats, effective_order: bool = False) -> float:
    """BLEU from summed statistics, with sacrebleu's own formula (defaults of BLEU())."""
    from sacrebleu.metrics import BLEU

    s = [int(x) for x in stats]
    return BLEU.compute_bleu(s[2:6], s[6:10], s[0], s[1], smooth_method="exp", effective_order=effective_order).score


def score_samples(preds: list[str], labels: list[str], lf_labels: list[str] | None = None) -> tuple[list[dict], str]:
    """Per-sample scores of every metric, and the sacreBLEU signature.

    `lf_labels`: the label text LLaMA-Factory scores against (templates.lf_label_text), used for the
    predict_* metrics only; the standard metrics always use the clean `labels`.
    """
    bleu = _bleu_metric()
    per_sample = []
    for pred, label, lf_label in zip(preds, labels, lf_labels or labels):
        row = lf_scores(pred, lf_label) | rouge_scores(pred, label)
        row["bleu_stats"] = bleu_stats(bleu, pred, label)
        # sentence BLEU as sacrebleu's sentence_score computes it (effective order on)
        row["sentence_bleu"] = bleu_from_stats(row["bleu_stats"], effective_order=True)
        per_sample.append(row)
    return per_sample, str(bleu.get_signature())


# --- format-proof metrics: exact match, lengths, replies cut at max_new_tokens ----------------------

QUALITY_METRICS = ("exact_match", "pred_words", "hit_max_new_tokens")  # per-sample means, like AVERAGED_METRICS
LENGTH_UNIT = "words (whitespace-separated)"
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation (ASCII and Unicode), drop a/an/the, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, label: str) -> float:
    """100 when prediction and label are equal after `normalize_answer`, else 0."""
    return 100.0 if normalize_answer(pred) == normalize_answer(label) else 0.0


def word_count(text: str) -> int:
    return len(text.split())


def quality_scores(pred: str, label: str, finish_reason: str | None = None) -> dict:
    """One sample's exact match and lengths; hit_max_new_tokens (0/100) only when the finish reason is known."""
    row = {"exact_match": exact_match(pred, label), "pred_words": word_count(pred), "label_words": word_count(label)}
    if finish_reason is not None:
        row["hit_max_new_tokens"] = 100.0 if finish_reason == "length" else 0.0
    return row


def add_quality_scores(
    per_sample: list[dict], preds: list[str], labels: list[str], finish_reasons: list[str] | None = None
) -> None:
    """Add `quality_scores` to each per-sample row (in place)."""
    if finish_reasons is not None and len(finish_reasons) != len(preds):
        raise LoralabError(f"predictions: {len(finish_reasons)} finish reasons for {len(preds)} predictions")
    for i, row in enumerate(per_sample):
        row.update(quality_scores(preds[i], labels[i], finish_reasons[i] if finish_reasons is not None else None))


def quality_metric_names(*per_sample_lists: list[dict]) -> tuple[str, ...]:
    """The QUALITY_METRICS every row of every list has (files scored before they existed have none)."""
    return tuple(
        name for name in QUALITY_METRICS if all(rows and all(name in r for r in rows) for rows in per_sample_lists)
    )


def length_summary(per_sample: list[dict]) -> dict:
    """Mean generated vs reference length (in words) and the share of replies cut at max_new_tokens."""
    if not per_sample or "pred_words" not in per_sample[0]:
        return {}
    n = len(per_sample)
    pred = sum(r["pred_words"] for r in per_sample) / n
    label = sum(r["label_words"] for r in per_sample) / n
    cut = [r["hit_max_new_tokens"] for r in per_sample if "hit_max_new_tokens" in r]
    return {
        "unit": LENGTH_UNIT,
        "mean_pred_words": pred,
        "mean_label_words": label,
        "ratio": pred / label if label else None,
        "hit_max_new_tokens": sum(cut) / len(cut) if len(cut) == n else None,  # % of samples; None = unknown
        "n_hit_max_new_tokens": round(sum(cut) / 100) if len(cut) == n else None,
    }


def _quality_implementations() -> dict[str, str]:
    return {
        "exact_match": "normalized exact match, % of samples (SQuAD normalization: lowercase, punctuation and "
        "the articles a/an/the removed, whitespace collapsed)",
        "pred_words": f"mean generated length in {LENGTH_UNIT}; the reference's is in `lengths`",
        "hit_max_new_tokens": "% of replies cut at max_new_tokens (finish reason `length`)",
    }


# --- resampling -----------------------------------------------------------------------------------


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) counts: how often each sample is drawn in each resample with replacement."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = idx + n * np.arange(n_boot)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n)


def _vector(per_sample: list[dict], name: str) -> np.ndarray:
    if name == "sacrebleu":
        return np.array([r["bleu_stats"] for r in per_sample], dtype=np.int64)  # (n, 10)
    return np.array([r[name] for r in per_sample], dtype=np.float64)  # (n,)


def _full(name: str, vec: np.ndarray) -> float:
    """The metric on all samples: corpus BLEU of the summed stats, or the mean score."""
    return bleu_from_stats(vec.sum(axis=0)) if name == "sacrebleu" else float(vec.mean())


def _resampled(name: str, vec: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The metric on every resample: summed stats for corpus BLEU, weighted mean otherwise."""
    if name == "sacrebleu":
        return np.array([bleu_from_stats(s) for s in weights @ vec])
    return weights @ vec / weights.shape[1]


def _implementations(signature: str) -> dict[str, str]:
    nltk, rc, jb = version("nltk"), version("rouge-chinese"), version("jieba")
    rs, sb = version("rouge-score"), version("sacrebleu")
    lf_rouge = f"rouge-chinese {rc} F on jieba {jb} words, x100 rounded to 4 decimals, mean (LLaMA-Factory compatible)"
    rouge = f"rouge-score {rs} F-measure, use_stemmer=True, mean x100"
    return {
        "predict_bleu-4": f"nltk {nltk} sentence_bleu on characters, smoothing method3, x100 rounded "
        "to 4 decimals, mean (LLaMA-Factory compatible)",
        "predict_rouge-1": lf_rouge,
        "predict_rouge-2": lf_rouge,
        "predict_rouge-l": lf_rouge,
        "sacrebleu": f"sacrebleu {sb} corpus BLEU, signature {signature}",
        "rouge1": rouge,
        "rouge2": rouge,
        "rougeL": rouge + " (whole text as one sequence)",
        "rougeLsum": rouge + " (sentences split on . ! ? 。！？ and newlines)",
    }


def _check_pairs(preds, labels) -> None:
    if len(preds) != len(labels):
        raise LoralabError(f"predictions: {len(preds)} predictions for {len(labels)} labels; expected one per label")
    if not preds:
        raise LoralabError("predictions: nothing to score; expected at least one prediction/label pair")
    for i, (pred, label) in enumerate(zip(preds, labels)):
        if not isinstance(pred, str) or not isinstance(label, str):
            raise LoralabError(f"predictions: sample {i}: prediction and label must be strings")


def _check_n_boot(n_boot: int) -> None:
    if not isinstance(n_boot, int) or n_boot < 1:
        raise LoralabError(f"n_boot: got {n_boot!r}; expected a positive number of bootstrap resamples")


def score_predictions(
    preds: list[str],
    labels: list[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    lf_labels: list[str] | None = None,
    finish_reasons: list[str] | None = None,
) -> dict:
    """Every metric with a 95% percentile-bootstrap CI over samples, plus per-sample scores.

    `lf_labels` (optional, one per label): LLaMA-Factory's label text for the predict_* metrics.
    `finish_reasons` (one "stop"/"length" per prediction, from generation) adds hit_max_new_tokens.
    """
    _check_pairs(preds, labels)
    if lf_labels is not None:
        _check_pairs(preds, lf_labels)
    _check_n_boot(n_boot)
    per_sample, signature = score_samples(preds, labels, lf_labels)
    add_quality_scores(per_sample, preds, labels, finish_reasons)
    implementations = _implementations(signature) | _quality_implementations()
    weights = bootstrap_weights(len(preds), n_boot, np.random.default_rng(seed))
    metrics = {}
    for name in METRICS + quality_metric_names(per_sample):
        vec = _vector(per_sample, name)
        value = _full(name, vec)
        low, high = np.percentile(_resampled(name, vec, weights), [2.5, 97.5])
        metrics[name] = {
            "value": value,
            "ci_low": float(low),
            "ci_high": float(high),
            "implementation": implementations[name],
        }
    return {
        "n_samples": len(preds),
        "n_boot": n_boot,
        "seed": seed,
        "ci": "95% percentile bootstrap, samples resampled with replacement",
        "metrics": metrics,
        "lengths": length_summary(per_sample),
        "per_sample": per_sample,
    }


# --- paired comparison ----------------------------------------------------------------------------


def _check_same_split(per_sample_a, per_sample_b, labels, prompts) -> None:
    if len(per_sample_a) != len(per_sample_b):
        raise LoralabError(
            f"compare: A has {len(per_sample_a)} samples, B has {len(per_sample_b)}; "
            "expected two evaluations of the same split"
        )
    for what, pair in (("labels", labels), ("prompts", prompts)):
        if pair is None:
            continue
        a, b = pair
        if list(a) != list(b):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise LoralabError(f"compare: {what} differ at sample {first}; expected two evaluations of the same split")


def _swapped_deltas(name: str, a: np.ndarray, b: np.ndarray, swaps: np.ndarray) -> np.ndarray:
    """B-A after swapping A and B on the samples marked in each row of `swaps` (the null hypothesis)."""
    if name == "sacrebleu":
        moved = swaps @ (b - a)  # statistics that move from B to A
        sum_a, sum_b = a.sum(axis=0) + moved, b.sum(axis=0) - moved
        return np.array([bleu_from_stats(sb) - bleu_from_stats(sa) for sa, sb in zip(sum_a, sum_b)])
    return (1 - 2 * swaps) @ (b - a) / len(a)  # a swap flips the sign of that sample's difference


def paired_compare(
    per_sample_a: list[dict],
    per_sample_b: list[dict],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    labels: tuple[list[str], list[str]] | None = None,
    prompts: tuple[list[str], list[str]] | None = None,
) -> dict:
    """B versus A on the same samples: delta (B-A), paired bootstrap 95% CI, two-sided p-value.

    The CI resamples the same sample indices for A and B. The p-value is a paired approximate
    randomization test: each sample's A and B scores (BLEU: statistics) are swapped at random
    n_boot times; p = (1 + #|delta_perm| >= |delta|) / (1 + n_boot).
    `labels`/`prompts`, if given as (a, b), must be identical: it is the same split.
    """
    _check_same_split(per_sample_a, per_sample_b, labels, prompts)
    _check_n_boot(n_boot)
    n = len(per_sample_a)
    if n == 0:
        raise LoralabError("compare: no samples to compare")
    rng = np.random.default_rng(seed)
    weights = bootstrap_weights(n, n_boot, rng)
    swaps = rng.integers(0, 2, size=(n_boot, n))  # 1 = swap A and B for that sample
    out = {}
    for name in METRICS + quality_metric_names(per_sample_a, per_sample_b):
        a, b = _vector(per_sample_a, name), _vector(per_sample_b, name)
        value_a, value_b = _full(name, a), _full(name, b)
        delta = value_b - value_a
        boot = _resampled(name, b, weights) - _resampled(name, a, weights)
        perm = _swapped_deltas(name, a, b, swaps)
        low, high = np.percentile(boot, [2.5, 97.5])
        extreme = np.sum(np.abs(perm) >= abs(delta) - 1e-9)  # tolerance: float noise on ties
        out[name] = {
            "value_a": value_a,
            "value_b": value_b,
            "delta": delta,
            "ci_low": float(low),
            "ci_high": float(high),
            "p_value": float((1 + extreme) / (1 + n_boot)),
        }
    return {
        "n_samples": n,
        "n_boot": n_boot,
        "seed": seed,
        "ci": "95% paired percentile bootstrap of B-A (same resampled samples for A and B)",
        "test": "two-sided paired approximate randomization (swap A/B per sample)",
        "metrics": out,
    }
