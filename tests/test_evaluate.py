"""predict / eval / compare on the tiny model and a tiny demo split; every bad input is one clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import data
from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.evaluate import (
    compare_evaluations,
    evaluate,
    evaluate_models,
    format_comparison_table,
    load_examples,
    predict,
    read_predictions,
)
from loralab.generate import Engine, GenerationSettings
from loralab.metrics import METRICS, QUALITY_METRICS
from loralab.templates import encode_for_prediction, encode_prompt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaldata") / "data"
    data.prepare("builtin:demo", output_dir=out, split="12,4,5", seed=1)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A random (non-zero) LoRA adapter on the tiny model: nothing trained, just saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "tuned-run"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


def make_cfg(tiny_model, data_dir, tmp_path, **extra):
    return load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "dataset_dir": str(data_dir),
            "output_dir": str(tmp_path / "runs"),
            "max_new_tokens": 8,
            "infer_batch_size": 3,
            "eval_dataset": "alpaca_data_val",
            **extra,
        },
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_writes_llamafactory_jsonl(tiny_model, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    out = predict(cfg, "test", progress=False)
    folder = tmp_path / "runs" / "predict-test-base"
    assert out["dir"] == str(folder)
    rows = read_jsonl(folder / "generated_predictions.jsonl")
    prompts, labels, _ = load_examples(cfg, "test")
    # LLaMA-Factory's three fields (label: the text its metrics score against; Llama 3: nothing after
    # <|eot_id|>, so the clean answer) plus the clean answer
    assert [list(r) for r in rows] == [["prompt", "predict", "label", "answer"]] * 5
    assert [r["answer"] for r in rows] == labels == [r["label"] for r in rows]
    engine = Engine(cfg, {})
    # prompt = the rendered chat-template text, special tokens kept (as LLaMA-Factory writes it)
    assert rows[0]["prompt"] == engine.tokenizer.apply_chat_template(
        prompts[0], tokenize=False, add_generation_prompt=True
    )
    assert rows[0]["prompt"].startswith("<|begin_of_text|><|start_header_id|>user")
    # predictions are exactly what the engine generates, greedy
    assert [r["predict"] for r in rows] == [
        c.text for c in engine.generate(prompts, GenerationSettings(max_new_tokens=8))
    ]
    results = json.loads((folder / "predict_results.json").read_text())
    assert results["samples"] == 5 and results["generated_tokens"] == 40 and results["samples_per_second"] > 0
    assert results["settings"]["max_new_tokens"] == 8 and results["split"] == "test"
    assert (folder / "config.yaml").is_file() and (folder / "run_info.json").is_file()
    with pytest.raises(LoralabError, match="not empty"):
        predict(cfg, "test", progress=False)
    predict(cfg, "val", progress=False)  # another split, another folder
    assert len(read_jsonl(tmp_path / "runs" / "predict-val-base" / "generated_predictions.jsonl")) == 4


def test_a_prompt_longer_than_cutoff_len_is_cut_as_in_llamafactory(tiny_model, data_dir, tmp_path, caplog):
    """LLaMA-Factory's do_predict cuts prompt and label to cutoff_len (infer_seqlen, heads kept): the predictions
    come from the cut prompt, and the file's prompt is that cut prompt (test_lf_token_ids holds the ids to LF's)."""
    import logging

    cfg = make_cfg(tiny_model, data_dir, tmp_path, cutoff_len=16)
    prompts, labels, _ = load_examples(cfg, "test")
    engine = Engine(cfg, {})
    cut = [encode_for_prediction(engine.tokenizer, p, label, cfg.cutoff_len) for p, label in zip(prompts, labels)]
    assert all(len(ids) < len(encode_prompt(engine.tokenizer, p)) for (ids, _), p in zip(cut, prompts))
    with caplog.at_level(logging.WARNING, logger="loralab"):
        out = predict(cfg, "test", progress=False)
    assert "5 of 5 prompts are longer than cutoff_len (16)" in caplog.text
    rows = read_jsonl(tmp_path / "runs" / "predict-test-base" / "generated_predictions.jsonl")
    assert [r["prompt"] for r in rows] == [engine.tokenizer.decode(ids) for ids, _ in cut]
    # the file's label is the text LLaMA-Factory scores against: the cut label (the clean one is `answer`)
    assert [r["label"] for r in rows] == [engine.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in cut]
    settings = GenerationSettings(max_new_tokens=8)
    assert [r["predict"] for r in rows] == [
        c.text for c in engine.generate(prompts, settings, prompt_token_ids=[ids for ids, _ in cut])
    ]
    assert out["results"]["prompt_tokens"] == sum(len(ids) for ids, _ in cut)


def test_eval_writes_metrics_with_cis(tiny_model, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    result = evaluate(cfg, "test", n_boot=200, progress=False)
    folder = tmp_path / "runs" / "eval-test-base"
    saved = json.loads((folder / "metrics.json").read_text())
    assert (
        saved["n_samples"] == 5 and saved["split"] == "test" and set(saved["metrics"]) == {*METRICS, *QUALITY_METRICS}
    )
    for m in saved["metrics"].values():
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["implementation"]
    assert result["metrics"] == saved["metrics"]
    per_sample = read_jsonl(folder / "per_sample_scores.jsonl")
    assert len(per_sample) == 5 and {"predict", "label", "rouge1", "bleu_stats"} <= set(per_sample[0])
    assert "predict_bleu-4" in json.loads((folder / "predict_results.json").read_text())


def test_test_max_samples_scores_the_first_records_and_says_so(tiny_model, adapter, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path, test_max_samples=2, eval_max_samples=3)
    result = evaluate(cfg, "test", n_boot=50, progress=False)
    assert result["n_samples"] == 2 and result["capped_by"] == {"test_max_samples": 2}
    _, labels, _ = load_examples(cfg.model_copy(update={"test_max_samples": None}), "test")
    rows = read_jsonl(tmp_path / "runs" / "eval-test-base" / "generated_predictions.jsonl")
    assert [r["label"] for r in rows] == labels[:2]
    assert json.loads((tmp_path / "runs" / "eval-test-base" / "predict_results.json").read_text())["capped_by"] == {
        "test_max_samples": 2
    }
    summary = evaluate_models(
        cfg, {"base": None, "tuned": str(adapter)}, out_dir=tmp_path / "cmp", n_boot=50, progress=False
    )
    assert summary["n_samples"] == 2 and "(the first 2 records: test_max_samples=2)" in format_comparison_table(summary)
    assert predict(cfg, "val", progress=False)["results"]["capped_by"] == {"eval_max_samples": 3}


def lf_script_scores(rows: list[dict]) -> dict[str, float]:
    """What LLaMA-Factory's scripts/eval_bleu_rouge.py prints for a generated_predictions.jsonl: the mean over
    rows of sentence BLEU-4 on characters (smoothing method 3) and rouge_chinese F on jieba words, x100,
    each rounded to 4 digits, `predict` scored against `label`."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    totals = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for row in rows:
        bleu = sentence_bleu([list(row["label"])], list(row["predict"]), smoothing_function=SmoothingFunction().method3)
        totals["bleu-4"] += round(bleu * 100, 4)
        hyp, ref = " ".join(jieba.cut(row["predict"])), " ".join(jieba.cut(row["label"]))
        if hyp.split() and ref.split():
            for key, value in Rouge().get_scores(hyp, ref)[0].items():
                totals[key] += round(value["f"] * 100, 4)
    return {key: value / len(rows) for key, value in totals.items()}


def test_llamafactory_script_scores_our_file_as_our_predict_results(tiny_chatml_model, data_dir, tmp_path):
    # ChatML: LLaMA-Factory's label text keeps the "\n" after <|im_end|>; its script reads `label` from the file
    cfg = make_cfg(tiny_chatml_model, data_dir, tmp_path, do_predict=True, max_new_tokens=16)
    folder = Path(predict(cfg, progress=False)["dir"])
    rows = read_jsonl(folder / "generated_predictions.jsonl")
    assert all(r["label"] == r["answer"] + "\n" for r in rows)
    ours = json.loads((folder / "predict_results.json").read_text())
    script = lf_script_scores(rows)
    for key, value in script.items():
        assert ours[f"predict_{key}"] == pytest.approx(value, abs=1e-4), key
    assert lf_script_scores([{**r, "label": r["answer"]} for r in rows])["bleu-4"] != pytest.approx(script["bleu-4"])
    # read back, the clean answer is the label again (the standard metrics use it) and LF's text is kept
    assert [(r["label"], r["lf_label"]) for r in read_predictions(folder / "generated_predictions.jsonl")] == [
        (r["answer"], r["label"]) for r in rows
    ]


def test_eval_reads_predictions_file(tiny_model, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    preds = tmp_path / "lf" / "generated_predictions.jsonl"
    preds.parent.mkdir()
    rows = [
        {"prompt": "p", "predict": "The sum of 2 and 2 is 4.", "label": "The sum of 2 and 2 is 4."},
        {"prompt": "q", "predict": "Paris is the capital.", "label": "The capital of France is Paris."},
    ]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(cfg, predictions=str(preds), n_boot=100)
    assert (preds.parent / "metrics.json").is_file() and result["n_samples"] == 2
    assert 50 < result["metrics"]["rouge1"]["value"] < 100
    with pytest.raises(LoralabError, match="already exists"):
        evaluate(cfg, predictions=str(preds), n_boot=100)


def test_eval_reports_exact_match_lengths_and_max_token_hits(tiny_model, data_dir, tmp_path):
    """Tiny model, 8 new tokens: the random model never stops by itself, so every reply hits max_new_tokens."""
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    result = evaluate(cfg, "test", n_boot=100, progress=False)
    folder = tmp_path / "runs" / "eval-test-base"
    per_sample = read_jsonl(folder / "per_sample_scores.jsonl")
    counts = json.loads((folder / "predict_results.json").read_text())["finish_reasons"]
    assert [r["finish_reason"] for r in per_sample].count("length") == counts["length"]
    assert result["metrics"]["hit_max_new_tokens"]["value"] == pytest.approx(100 * counts["length"] / 5)
    assert result["lengths"]["n_hit_max_new_tokens"] == counts["length"]
    assert result["lengths"]["mean_pred_words"] == pytest.approx(sum(len(r["predict"].split()) for r in per_sample) / 5)
    assert result["lengths"]["mean_label_words"] == pytest.approx(sum(len(r["label"].split()) for r in per_sample) / 5)
    assert result["metrics"]["exact_match"]["value"] == 0.0  # a random model answers nothing right
    # the predictions file keeps LLaMA-Factory's three fields (+ the clean answer); the finish reasons live
    # in the score file
    assert [list(r) for r in read_jsonl(folder / "generated_predictions.jsonl")] == [
        ["prompt", "predict", "label", "answer"]
    ] * 5
    from loralab.evaluate import format_metrics_table

    assert "lengths in words: generated" in format_metrics_table(result)


def test_exact_match_of_a_predictions_file(tiny_model, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    preds = tmp_path / "generated_predictions.jsonl"
    rows = [
        {"prompt": "p", "predict": "The sum of 2 and 2 is 4", "label": "the sum of 2 and 2 is 4."},
        {"prompt": "q", "predict": "Paris is the capital.", "label": "The capital of France is Paris."},
    ]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(cfg, predictions=str(preds), n_boot=100)
    assert result["metrics"]["exact_match"]["value"] == 50.0
    assert "hit_max_new_tokens" not in result["metrics"]  # a plain predictions file has no finish reasons
    assert result["lengths"]["hit_max_new_tokens"] is None and result["lengths"]["ratio"] == pytest.approx(12 / 14)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "p", "predict": "x"}', "line 2: missing field `label`"),
        ('{"prompt": "p", "label": "x"}', "line 2: missing field `predict`"),
        ('{"prompt": "p", "predict": 3, "label": "x"}', "line 2: field `predict` must be a string"),
        ('{"prompt": "p", "predict": "x", ', "line 2: invalid JSON"),
        ('["p", "x", "y"]', "line 2: expected a JSON object"),
    ],
)
def test_bad_predictions_file(tmp_path, line, expected):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"prompt": "p", "predict": "a", "label": "b"}\n' + line + "\n")
    with pytest.raises(LoralabError) as err:
        read_predictions(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_split_and_dataset(tiny_model, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    with pytest.raises(LoralabError, match="--split: unknown split 'dev'"):
        predict(cfg, "dev", progress=False)
    with pytest.raises(LoralabError, match="alpaca_data_tset"):
        predict(make_cfg(tiny_model, data_dir, tmp_path, test_dataset="alpaca_data_tset"), "test", progress=False)
    with pytest.raises(LoralabError, match="no data"):
        load_examples(make_cfg(tiny_model, data_dir, tmp_path, eval_dataset=None), "val")
    assert not (tmp_path / "runs").exists()  # nothing written on a bad input


def test_adapter_of_another_base_is_refused(tiny_model, tiny_chatml_model, adapter, data_dir, tmp_path):
    import shutil

    other = tmp_path / "other-adapter"
    shutil.copytree(adapter, other)
    config_file = other / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    config["base_model_name_or_path"] = str(tiny_chatml_model)  # a real model, but not ours
    config_file.write_text(json.dumps(config))
    cfg = make_cfg(tiny_model, data_dir, tmp_path, adapter_name_or_path=str(other))
    with pytest.raises(LoralabError, match="was trained on base model") as err:
        predict(cfg, "test", progress=False)
    assert "model_name_or_path" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LoralabError, match="was trained on base model"):
        evaluate_models(cfg, {"base": None, "other": str(other)}, "test", tmp_path / "cmp", progress=False)


def test_base_vs_adapter_and_compare(tiny_model, adapter, data_dir, tmp_path):
    cfg = make_cfg(tiny_model, data_dir, tmp_path)
    summary = evaluate_models(
        cfg, {"base": None, "tuned": str(adapter)}, "test", tmp_path / "cmp", n_boot=200, progress=False
    )
    base_rows = read_jsonl(tmp_path / "cmp" / "base" / "generated_predictions.jsonl")
    tuned_rows = read_jsonl(tmp_path / "cmp" / "tuned" / "generated_predictions.jsonl")
    # adapter off = the plain base model; adapter on = different (random non-zero LoRA) outputs
    plain = Engine(cfg, {}).generate(load_examples(cfg, "test")[0], GenerationSettings(max_new_tokens=8))
    assert [r["predict"] for r in base_rows] == [c.text for c in plain]
    assert [r["predict"] for r in tuned_rows] != [r["predict"] for r in base_rows]
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    comp = saved["comparisons"]["tuned_vs_base"]
    assert set(comp["metrics"]) == {*METRICS, *QUALITY_METRICS} and saved["models"]["tuned"]["adapter"] == str(adapter)
    for m in comp["metrics"].values():
        assert m["delta"] == pytest.approx(m["value_b"] - m["value_a"]) and 0 < m["p_value"] <= 1
    assert comp["metrics"]["rouge1"]["value_a"] == pytest.approx(
        summary["models"]["base"]["metrics"]["rouge1"]["value"]
    )
    table = format_comparison_table(summary)
    assert "delta" in table and "tuned" in table and "predict_bleu-4" in table and "exact_match" in table
    assert "base lengths in words: generated" in table and "tuned lengths in words" in table

    # `loralab compare` on the two folders gives the same numbers
    again = compare_evaluations(tmp_path / "cmp" / "base", tmp_path / "cmp" / "tuned", n_boot=200, seed=cfg.seed)
    assert again["metrics"] == comp["metrics"]
    other_split = evaluate(cfg, "val", output_dir=str(tmp_path / "val"), n_boot=50, progress=False)
    with pytest.raises(LoralabError, match="same split"):
        compare_evaluations(tmp_path / "cmp" / "base", other_split["dir"])
    with pytest.raises(LoralabError, match="not found"):
        compare_evaluations(tmp_path / "cmp" / "base", tmp_path / "nowhere")


def cli(*args, cwd):
    env_cmd = [sys.executable, "-m", "loralab.cli", *args]
    return subprocess.run(env_cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_end_to_end(tiny_model, adapter, tmp_path):
    records = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."} for i in range(4)
    ]
    (tmp_path / "tiny.json").write_text(json.dumps(records))
    (tmp_path / "cfg.yaml").write_text(f"model_name_or_path: {tiny_model}\nmax_new_tokens: 6\noutput_dir: runs\n")
    out = cli("predict", "cfg.yaml", "--data", "tiny.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(read_jsonl(tmp_path / "runs" / "predict-tiny-base" / "generated_predictions.jsonl")) == 4

    out = cli(
        "eval",
        "cfg.yaml",
        f"adapter_name_or_path={adapter}",
        "--data",
        "tiny.json",
        "--compare-base",
        "--n-boot",
        "100",
        "--output-dir",
        "cmp",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "delta" in out.stdout and "rougeL" in out.stdout and (tmp_path / "cmp" / "comparison.json").is_file()

    out = cli("compare", "cmp/base", "cmp/tuned-run", "--n-boot", "100", "--output", "c.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "p" in out.stdout and json.loads((tmp_path / "c.json").read_text())["n_samples"] == 4

    out = cli(
        "eval",
        "cfg.yaml",
        "--predictions",
        "runs/predict-tiny-base/generated_predictions.jsonl",
        "--n-boot",
        "50",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "95% CI" in out.stdout and (tmp_path / "runs" / "predict-tiny-base" / "metrics.json").is_file()

    # bad inputs: one line on stderr, exit status 2, no traceback
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "predict": "x"}\n')
    for args, expected in [
        (("eval", "cfg.yaml", "--predictions", "bad.jsonl"), "line 1: missing field `label`"),
        (("predict", "cfg.yaml", "--split", "dev"), "unknown split"),
        (("predict", "cfg.yaml", "--data", "tiny.json"), "not empty"),
        (("eval", "cfg.yaml", "--compare-base", "--data", "tiny.json"), "--compare-base"),
        (("compare", "cmp/base", "runs"), "not found"),
    ]:
        out = cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.slow
def test_smollm2_eval_on_real_alpaca(alpaca_file, tmp_path):
    data.prepare(str(alpaca_file), output_dir=tmp_path / "data", seed=42, sample=100, split="80,10,10")
    cfg = load_config(
        None,
        {
            "dataset_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "runs"),
            "max_samples": 6,
            "max_new_tokens": 48,
        },
    )
    result = evaluate(cfg, "test", n_boot=200, progress=False)
    assert result["n_samples"] == 6
    # a real instruct model answers on topic: clearly above the random tiny model's zero overlap
    assert result["metrics"]["rouge1"]["value"] > 10 and result["metrics"]["predict_bleu-4"]["value"] > 5
