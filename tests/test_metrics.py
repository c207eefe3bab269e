"""Scoring: LLaMA-Factory-compatible numbers pinned, standard metrics checked against their libraries,
bootstrap CIs and the paired comparison."""

import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from loralab.errors import LoralabError
from loralab.metrics import (
    LF_METRICS,
    METRICS,
    bleu_from_stats,
    bootstrap_weights,
    lf_scores,
    paired_compare,
    rouge_scores,
    score_predictions,
)

PREDS = [
    "",  # empty prediction
    "   ",  # empty after strip: rouge 0, but nltk still sees three space characters
    "The cat sat on the mat.",  # identical to its label
    "今天天气很好",
    "A quick brown fox jumps over the lazy dog. It was fast.",
    "Paris is the capital of France.",
    "I don't know.",
    "Water boils at 100 degrees Celsius at sea level.",
]
LABELS = [
    "Hello there.",
    "Some answer.",
    "The cat sat on the mat.",
    "今天天气不错",
    "The quick brown fox jumped over the lazy dogs. It was quick.",
    "The capital of France is Paris.",
    "Photosynthesis converts light into chemical energy.",
    "At sea level, water boils at 100 degrees Celsius.",
]

# LLaMA-Factory per-sample scores: (bleu-4, rouge-1, rouge-2, rouge-l), computed once and checked by hand:
# - identical strings give 100 everywhere; an empty (or whitespace-only) side gives rouge 0;
# - "   " vs "Some answer.": 1 of 3 chars matches, smoothed precisions 1/3, 1/4, 1/4, 1/8,
#   brevity penalty exp(1 - 12/3): 100 * exp(-3) * (1/384)**0.25 = 1.1247;
# - 今天天气很好 vs 今天天气不错: jieba gives [今天天气, 很, 好] vs [今天天气, 不错], so rouge-1 = rouge-l
#   = F(1/3, 1/2) = 40, rouge-2 = 0; char BLEU = (4/6 * 3/5 * 2/4 * 1/3) ** 0.25 = 50.8133.
LF_PER_SAMPLE = [
    (0.0, 0.0, 0.0, 0.0),
    (1.1247, 0.0, 0.0, 0.0),
    (100.0, 100.0, 100.0, 100.0),
    (50.8133, 40.0, 0.0, 40.0),
    (74.7969, 72.0, 46.1538, 71.4286),
    (83.0239, 85.7143, 33.3333, 57.1429),
    (0.5587, 15.3846, 0.0, 15.3846),
    (87.2143, 80.0, 52.6316, 57.1429),
]
LF_MEANS = {
    "predict_bleu-4": 49.691475,
    "predict_rouge-1": 49.1373625,
    "predict_rouge-2": 29.0148375,
    "predict_rouge-l": 42.637375,
}


@pytest.fixture(scope="module")
def scored():
    return score_predictions(PREDS, LABELS, n_boot=500, seed=0)


def test_lf_per_sample_scores_are_pinned():
    for pred, label, expected in zip(PREDS, LABELS, LF_PER_SAMPLE):
        got = lf_scores(pred, label)
        assert [got[k] for k in LF_METRICS] == pytest.approx(expected, abs=1e-4), (pred, label)


def test_lf_means_are_pinned(scored):
    for name, expected in LF_MEANS.items():
        assert scored["metrics"][name]["value"] == pytest.approx(expected, abs=1e-4)
    assert "LLaMA-Factory compatible" in scored["metrics"]["predict_bleu-4"]["implementation"]


def test_jieba_is_quiet_and_offline():
    code = "from loralab.metrics import lf_scores; print(lf_scores('今天天气很好', '今天天气不错'))"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stderr == ""
    assert "'predict_rouge-1': 40.0" in out.stdout


def test_sacrebleu_equals_corpus_bleu(scored):
    reference = sacrebleu.corpus_bleu(PREDS, [LABELS])
    assert scored["metrics"]["sacrebleu"]["value"] == reference.score
    bleu = BLEU()
    bleu.corpus_score(PREDS, [LABELS])
    assert str(bleu.get_signature()) in scored["metrics"]["sacrebleu"]["implementation"]
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in scored["metrics"]["sacrebleu"]["implementation"]


def test_summed_stats_give_corpus_bleu_of_any_resample(scored):
    # what the bootstrap relies on: a resample's summed per-sample statistics == corpus BLEU of it
    stats = np.array([r["bleu_stats"] for r in scored["per_sample"]])
    for w in bootstrap_weights(len(PREDS), 5, np.random.default_rng(1)):
        idx = np.repeat(np.arange(len(PREDS)), w)
        expected = sacrebleu.corpus_bleu([PREDS[i] for i in idx], [[LABELS[i] for i in idx]]).score
        assert bleu_from_stats(w @ stats) == pytest.approx(expected, abs=1e-9)


def test_sentence_bleu_matches_sacrebleu_sentence_score(scored):
    bleu = BLEU(effective_order=True)
    for pred, label, row in zip(PREDS, LABELS, scored["per_sample"]):
        assert row["sentence_bleu"] == pytest.approx(bleu.sentence_score(pred, [label]).score, abs=1e-9)


def test_rouge_score_values():
    got = rouge_scores("Paris is the capital of France.", "The capital of France is Paris.")
    assert got["rouge1"] == pytest.approx(100.0)  # same bag of words
    assert got["rouge2"] == pytest.approx(60.0)  # 3 of 5 bigrams
    assert got["rougeL"] == pytest.approx(400 / 6)  # LCS "the capital of france"
    # the stemmer is on: cats/cat and running/run match, are/is do not
    assert rouge_scores("The cats are running", "the cat is run")["rouge1"] == pytest.approx(75.0)
    # rougeLsum works per sentence: swapped sentences are a perfect summary, not for rougeL
    swapped = rouge_scores("The cat sat. The dog ran.", "The dog ran. The cat sat.")
    assert swapped["rougeLsum"] == pytest.approx(100.0)
    assert swapped["rougeL"] == pytest.approx(50.0)


def test_rouge_means_match_rouge_score_directly(scored):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        direct = np.mean([scorer.score(label, pred)[name].fmeasure * 100 for pred, label in zip(PREDS, LABELS)])
        assert scored["metrics"][name]["value"] == pytest.approx(direct, abs=1e-9)


def test_output_structure(scored):
    assert set(scored["metrics"]) == {
        *METRICS,
        "exact_match",
        "pred_words",
    }  # no finish reasons: no max_new_tokens share
    assert len(scored["per_sample"]) == len(PREDS)
    for entry in scored["metrics"].values():
        assert set(entry) == {"value", "ci_low", "ci_high", "implementation"}
    for row in scored["per_sample"]:
        assert {*LF_METRICS, "rouge1", "rouge2", "rougeL", "rougeLsum", "sentence_bleu", "bleu_stats"} <= set(row)


def test_ci_contains_value_and_shrinks_with_more_samples(scored):
    for name, entry in scored["metrics"].items():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name
        assert entry["ci_low"] < entry["ci_high"], name
    bigger = score_predictions(PREDS * 8, LABELS * 8, n_boot=500, seed=0)["metrics"]
    for name, entry in bigger.items():
        assert entry["value"] == pytest.approx(scored["metrics"][name]["value"], abs=1e-9)
        width = entry["ci_high"] - entry["ci_low"]
        assert width < 0.6 * (scored["metrics"][name]["ci_high"] - scored["metrics"][name]["ci_low"]), name


def test_ci_is_reproducible_and_seeded(scored):
    again = score_predictions(PREDS, LABELS, n_boot=500, seed=0)["metrics"]
    other = score_predictions(PREDS, LABELS, n_boot=500, seed=1)["metrics"]
    assert again == scored["metrics"]
    assert other["sacrebleu"]["ci_low"] != scored["metrics"]["sacrebleu"]["ci_low"]


def test_single_sample_has_a_degenerate_ci():
    entry = score_predictions(["same words"], ["same words"], n_boot=50)["metrics"]["predict_bleu-4"]
    assert entry["value"] == entry["ci_low"] == entry["ci_high"] == 100.0


def test_bad_inputs_are_user_errors():
    with pytest.raises(LoralabError, match="2 predictions for 1 labels"):
        score_predictions(["a", "b"], ["a"])
    with pytest.raises(LoralabError, match="nothing to score"):
        score_predictions([], [])
    with pytest.raises(LoralabError, match="sample 1"):
        score_predictions(["a", None], ["a", "b"])
    with pytest.raises(LoralabError, match="n_boot"):
        score_predictions(["a"], ["a"], n_boot=0)


def test_paired_compare_identical_inputs(scored):
    result = paired_compare(scored["per_sample"], scored["per_sample"], n_boot=300, seed=0)
    assert set(result["metrics"]) == {*METRICS, "exact_match", "pred_words"}
    for entry in result["metrics"].values():
        assert entry["delta"] == 0.0
        assert entry["ci_low"] == entry["ci_high"] == 0.0
        assert entry["p_value"] == 1.0


def test_paired_compare_clearly_better_b(scored):
    perfect = score_predictions(LABELS, LABELS, n_boot=10)["per_sample"]
    result = paired_compare(scored["per_sample"], perfect, n_boot=500, seed=0, labels=(LABELS, LABELS))
    for name in ("predict_bleu-4", "predict_rouge-l", "sacrebleu", "rougeL"):
        entry = result["metrics"][name]
        assert entry["value_b"] > entry["value_a"]
        assert entry["delta"] == pytest.approx(entry["value_b"] - entry["value_a"])
        assert 0 < entry["ci_low"] <= entry["delta"] <= entry["ci_high"], name
        assert entry["p_value"] < 0.05, name
    # swapping the roles flips the sign
    back = paired_compare(perfect, scored["per_sample"], n_boot=500, seed=0)
    assert back["metrics"]["sacrebleu"]["delta"] == pytest.approx(-result["metrics"]["sacrebleu"]["delta"])


def test_paired_compare_refuses_different_splits(scored):
    with pytest.raises(LoralabError, match="A has 8 samples, B has 7"):
        paired_compare(scored["per_sample"], scored["per_sample"][:7])
    other_labels = LABELS[:3] + ["something else"] + LABELS[4:]
    with pytest.raises(LoralabError, match="labels differ at sample 3"):
        paired_compare(scored["per_sample"], scored["per_sample"], labels=(LABELS, other_labels))
    with pytest.raises(LoralabError, match="prompts differ at sample 0"):
        paired_compare(scored["per_sample"], scored["per_sample"], prompts=(["p"] * 8, ["q"] * 8))


# --- format-proof metrics: exact match, lengths, max_new_tokens hits ------------------------------------------


@pytest.mark.parametrize(
    "pred, label, same",
    [
        ("Paris", "paris.", True),  # case and punctuation
        ("The answer is 42!", "answer is 42", True),  # articles and punctuation
        ("  an apple,  a pear ", "apple pear", True),  # whitespace
        ("«Bonjour» — dit-il.", "bonjour ditil", True),  # Unicode punctuation goes too
        ("There are 6 words.", "There are 7 words.", False),  # the demo's miscount: right format, wrong answer
        ("bridge, quartz, pepper", "bridge, pepper, quartz", False),  # wrong order is wrong
        ("Theatre", "atre", False),  # articles only as whole words
    ],
)
def test_exact_match_uses_squad_normalization(pred, label, same):
    from loralab.metrics import exact_match, normalize_answer

    assert exact_match(pred, label) == (100.0 if same else 0.0)
    assert (normalize_answer(pred) == normalize_answer(label)) is same


def test_exact_match_and_lengths_in_scores():
    preds = ["Paris.", "There are 6 words.", "one two three four five six seven eight"]
    labels = ["paris", "There are 7 words.", "short answer"]
    scored = score_predictions(preds, labels, n_boot=200, seed=0, finish_reasons=["stop", "stop", "length"])
    em = scored["metrics"]["exact_match"]
    assert em["value"] == pytest.approx(100 / 3) and em["ci_low"] <= em["value"] <= em["ci_high"]
    assert "SQuAD" in em["implementation"]
    assert scored["metrics"]["pred_words"]["value"] == pytest.approx((1 + 4 + 8) / 3)
    assert scored["metrics"]["hit_max_new_tokens"]["value"] == pytest.approx(100 / 3)
    lengths = scored["lengths"]
    assert lengths["unit"] == "words (whitespace-separated)"
    assert lengths["mean_pred_words"] == pytest.approx(13 / 3) and lengths["mean_label_words"] == pytest.approx(7 / 3)
    assert lengths["ratio"] == pytest.approx(13 / 7)
    assert lengths["hit_max_new_tokens"] == pytest.approx(100 / 3) and lengths["n_hit_max_new_tokens"] == 1
    rows = scored["per_sample"]
    assert [r["exact_match"] for r in rows] == [100.0, 0.0, 0.0]
    assert [(r["pred_words"], r["label_words"], r["hit_max_new_tokens"]) for r in rows] == [
        (1, 1, 0.0),
        (4, 4, 0.0),
        (8, 2, 100.0),
    ]
    with pytest.raises(LoralabError, match="2 finish reasons for 3 predictions"):
        score_predictions(preds, labels, finish_reasons=["stop", "stop"])


def test_without_finish_reasons_the_max_tokens_share_is_unknown():
    scored = score_predictions(["a b", "c"], ["a b", "d"], n_boot=20)
    assert "hit_max_new_tokens" not in scored["metrics"]
    assert scored["lengths"]["hit_max_new_tokens"] is None and scored["lengths"]["n_hit_max_new_tokens"] is None


def test_paired_compare_of_exact_match_and_old_score_files(scored):
    right = score_predictions(LABELS, LABELS, n_boot=10)["per_sample"]
    result = paired_compare(scored["per_sample"], right, n_boot=500, seed=0)
    em = result["metrics"]["exact_match"]
    assert em["value_a"] == pytest.approx(100 / 8) and em["value_b"] == 100.0  # only "The cat sat on the mat." matched
    assert em["delta"] == pytest.approx(87.5) and em["ci_low"] > 0 and em["p_value"] < 0.05
    # a per-sample file written before these metrics existed still compares, on the metrics both have
    old = [{k: v for k, v in r.items() if k not in ("exact_match", "pred_words", "label_words")} for r in right]
    assert set(paired_compare(scored["per_sample"], old, n_boot=50)["metrics"]) == set(METRICS)
