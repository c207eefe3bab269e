"""LLaMA-Factory's own example YAMLs run unchanged with the matching loralab command.

The fixtures in tests/fixtures/lf_examples/ are LLaMA-Factory's examples (v0.9.5, and v0.9.3 for the
llama3 names) with only the model path swapped to a tiny model; dataset names, output paths and every
other key are as LLaMA-Factory publishes them. Each test runs the chain a user runs: train, predict,
chat with the adapter, merge it.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loralab.cli import app
from loralab.config import load_config
from loralab.errors import LoralabError

FIXTURES = Path(__file__).parent / "fixtures" / "lf_examples"
IDENTITY = [
    {"instruction": q, "input": "", "output": a}
    for q, a in [
        ("hi", "Hello! I am {{name}}, an AI assistant developed by {{author}}."),
        ("Who are you?", "I am {{name}}, an AI assistant developed by {{author}}."),
        ("What is your name?", "You may refer to me as {{name}}."),
        ("hello", "Hello! How can I help you today?"),
    ]
]
ALPACA_DEMO = [
    {"instruction": "What is the sum of 12 and 30?", "input": "", "output": "The sum of 12 and 30 is 42."},
    {"instruction": "Write the word in uppercase.", "input": "apple", "output": "APPLE"},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
]


@pytest.fixture
def lf_workdir(tmp_path, tiny_model, tiny_chatml_model, monkeypatch):
    """A folder laid out like a LLaMA-Factory checkout: data/dataset_info.json with identity and alpaca_en_demo."""
    (tmp_path / "tiny-llama3").symlink_to(tiny_model)
    (tmp_path / "tiny-chatml").symlink_to(tiny_chatml_model)
    data = tmp_path / "data"
    data.mkdir()
    (data / "identity.json").write_text(json.dumps(IDENTITY))
    (data / "alpaca_en_demo.json").write_text(json.dumps(ALPACA_DEMO))
    (data / "dataset_info.json").write_text(
        json.dumps({"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}})
    )
    for name in FIXTURES.iterdir():
        (tmp_path / name.name).write_text(name.read_text())
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def run(*args, stdin: str | None = None):
    result = CliRunner().invoke(app, list(args), input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_every_fixture_is_an_lf_example():
    names = sorted(p.name for p in FIXTURES.glob("*.yaml"))
    assert len(names) == 11
    for name in names:
        text = (FIXTURES / name).read_text()
        assert "tiny-llama3" in text or "tiny-chatml" in text or "lora_eval" in name


def test_llama3_examples_train_predict_chat_merge(lf_workdir):
    # examples/train_lora/llama3_lora_sft.yaml: no eval_dataset -> no validation, as in LLaMA-Factory
    out = run("train", "v093_train_lora_llama3_lora_sft.yaml")
    run_dir = lf_workdir / "saves/llama3-8b/lora/sft"
    assert "trained 3 steps" in out and (run_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "train_results.json").read_text())
    assert summary["examples"] == {"train": 8, "eval": 0} and summary["best_eval_loss"] is None

    # examples/extras/loraplus: same output_dir, overwrite_output_dir: true replaces it
    run("train", "v095_extras_loraplus_llama3_lora_sft.yaml")
    assert (run_dir / "adapter_model.safetensors").is_file()

    # examples/extras/nlg_eval: do_predict on eval_dataset, LLaMA-Factory's files straight into output_dir
    out = run("predict", "v095_extras_nlg_eval_llama3_lora_predict.yaml", "max_new_tokens=8")
    pred_dir = lf_workdir / "saves/llama3-8b/lora/predict"
    rows = [json.loads(line) for line in (pred_dir / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"prompt", "predict", "label", "answer"}
    assert rows[0]["answer"] == rows[0]["label"]  # Llama 3: nothing after <|eot_id|>
    assert rows[0]["answer"] == IDENTITY[0]["output"] and rows[4]["answer"] == ALPACA_DEMO[0]["output"]
    results = json.loads((pred_dir / "predict_results.json").read_text())
    lf_predict_keys = {
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
        "predict_runtime",
        "predict_samples_per_second",
        "predict_steps_per_second",
        "predict_model_preparation_time",
    }
    assert lf_predict_keys <= set(results)
    all_results = json.loads((pred_dir / "all_results.json").read_text())  # LLaMA-Factory's combined file
    assert set(all_results) == lf_predict_keys and all(results[k] == v for k, v in all_results.items())
    assert "ci_low" in json.loads((pred_dir / "metrics.json").read_text())["metrics"]["predict_bleu-4"]
    assert "predict_bleu-4" in out

    # LLaMA-Factory runs this file with `llamafactory-cli train` (do_predict, no do_train): so does `loralab train`
    out = run("train", "v095_extras_nlg_eval_llama3_lora_predict.yaml", "max_new_tokens=8")
    assert "predict_bleu-4" in out and "trained" not in out
    again = [json.loads(line) for line in (pred_dir / "generated_predictions.jsonl").read_text().splitlines()]
    assert again == rows  # greedy: the same predictions as `loralab predict`

    # examples/inference: chat with the adapter; examples/merge_lora: merged model in export_dir
    out = run("chat", "v093_inference_llama3_lora_sft.yaml", "max_new_tokens=4", stdin="hello\n")
    assert out.strip()
    run("export", "v093_merge_lora_llama3_lora_sft.yaml")
    assert (lf_workdir / "output/llama3_lora_sft/config.json").is_file()


def test_do_train_and_do_predict_train_then_predict_into_the_run(lf_workdir):
    # LLaMA-Factory with both: trains, then the trained model predicts on eval_dataset into output_dir
    args = ["do_predict=true", "eval_dataset=alpaca_en_demo", "max_new_tokens=4", "max_steps=2", "output_dir=both"]
    out = run("train", "v093_train_lora_llama3_lora_sft.yaml", *args)
    assert "trained 2 steps" in out and "predict_bleu-4" in out
    run_dir = lf_workdir / "both"
    rows = (run_dir / "generated_predictions.jsonl").read_text().splitlines()
    assert len(rows) == len(ALPACA_DEMO) and (run_dir / "adapter_model.safetensors").is_file()
    all_results = json.loads((run_dir / "all_results.json").read_text())  # train and predict metrics, as LF's
    assert {"train_runtime", "epoch", "predict_bleu-4", "predict_runtime"} <= set(all_results)
    results = json.loads((run_dir / "predict_results.json").read_text())
    assert results["adapter"] == str(run_dir) or Path(results["adapter"]).resolve() == run_dir.resolve()
    assert "examples" in json.loads((run_dir / "run_info.json").read_text())  # the training run's own description


def test_qwen3_examples_train_chat_merge(lf_workdir):
    run("train", "v095_train_lora_qwen3_lora_sft.yaml")
    run_dir = lf_workdir / "saves/qwen3-4b/lora/sft"
    assert (run_dir / "adapter_model.safetensors").is_file()
    if not torch.cuda.is_available():
        # LLaMA-Factory's next example, QLoRA, shares the output folder (overwrite_output_dir: true); on a CPU
        # it cannot start, and the LoRA run it would have replaced is left exactly as it was.
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        with pytest.raises(LoralabError, match="needs a CUDA GPU"):
            run("train", "v095_train_qlora_qwen3_lora_sft_otfq.yaml")
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert run("chat", "v095_inference_qwen3.yaml", "max_new_tokens=4", stdin="hello\n").strip()
    assert run("chat", "v095_inference_qwen3_lora_sft.yaml", "max_new_tokens=4", stdin="hello\n").strip()
    run("export", "v095_merge_lora_qwen3_lora_sft.yaml")
    assert (lf_workdir / "saves/qwen3_sft_merged/config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine QLoRA would really train")
def test_qlora_example_loads_and_says_it_needs_cuda(lf_workdir):
    cfg = load_config("v095_train_qlora_qwen3_lora_sft_otfq.yaml")
    assert cfg.quantization_bit == 4 and cfg.quantization_method == "bnb"
    with pytest.raises(LoralabError, match="quantization_bit: 4-bit loading .* needs a CUDA GPU"):
        run("train", "v095_train_qlora_qwen3_lora_sft_otfq.yaml")


def test_benchmark_eval_example_says_what_it_is(lf_workdir, caplog):
    # examples/train_lora/llama3_lora_eval.yaml drives LLaMA-Factory's MMLU benchmark (`llamafactory-cli eval`),
    # not a loralab stage: each benchmark key gets its one-line notice, and its `fewshot` template (only
    # used by that benchmark) is a one-line error listing loralab's templates.
    with caplog.at_level(logging.INFO, logger="loralab"), pytest.raises(LoralabError) as err:
        load_config("v093_train_lora_llama3_lora_eval.yaml")
    assert "`template`" in str(err.value) and "'fewshot'" in str(err.value) and "\n" not in str(err.value)
    for key in ("task", "lang", "n_shot", "save_dir", "batch_size"):
        assert f"`{key}`" in caplog.text and "llamafactory-cli eval" in caplog.text
