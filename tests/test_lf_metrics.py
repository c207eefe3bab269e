"""predict_* equal what LLaMA-Factory 0.9.5 reports for the same predictions, on ChatML and Llama 3 models.

fixtures/lf_reference/metrics.json was recorded with LLaMA-Factory itself (record_metrics.py): its label
texts (decoded answer ids: "answer\\n" on ChatML, "answer" on Llama 3) and its ComputeSimilarity means.
"""

import json
from pathlib import Path

import pytest

from loralab import metrics
from loralab.templates import apply_template, lf_label_text
from loralab.testing import make_tiny_tokenizer

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "lf_reference" / "metrics.json").read_text(encoding="utf-8")
)
SAMPLES = REFERENCE["samples"]


@pytest.mark.parametrize(
    "model, template", [("llama3", None), ("llama3", "llama3"), ("chatml", None), ("chatml", "chatml")]
)
def test_predict_metrics_equal_llamafactorys(model, template):
    ref = REFERENCE["models"][model]
    tokenizer = apply_template(make_tiny_tokenizer(model), template)
    lf_labels = [
        lf_label_text(tokenizer, [{"role": "user", "content": s["prompt"]}], s["label"], REFERENCE["cutoff_len"])
        for s in SAMPLES
    ]
    assert lf_labels == ref["label_texts"]
    scored = metrics.score_predictions(
        [s["predict"] for s in SAMPLES], [s["label"] for s in SAMPLES], n_boot=10, lf_labels=lf_labels
    )
    for name, value in ref["metrics"].items():
        assert round(scored["metrics"][name]["value"], 4) == round(value, 4), name
    if model == "chatml":  # the clean label ("answer", no "\n") would not give LLaMA-Factory's BLEU
        clean = metrics.score_predictions([s["predict"] for s in SAMPLES], [s["label"] for s in SAMPLES], n_boot=10)
        assert round(clean["metrics"]["predict_bleu-4"]["value"], 4) != round(ref["metrics"]["predict_bleu-4"], 4)
        # the standard metrics do not see the difference
        assert clean["metrics"]["rougeL"]["value"] == scored["metrics"]["rougeL"]["value"]


@pytest.mark.slow
def test_smollm2_predict_equals_llamafactory_on_real_alpaca(alpaca_file, tmp_path, monkeypatch):
    """The same do_predict YAML through LLaMA-Factory and loralab: the same predict_* on SmolLM2 (ChatML)."""
    import yaml

    from loralab.config import load_config
    from loralab.evaluate import predict

    ref = json.loads((Path(__file__).parent / "fixtures" / "lf_reference" / "smollm2_alpaca20.json").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "alpaca20.json").write_text(json.dumps(json.loads(alpaca_file.read_text())[:20]))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"alpaca20": {"file_name": "alpaca20.json"}}))
    (tmp_path / "lf.yaml").write_text(
        yaml.safe_dump({**ref["yaml"], "output_dir": "out", "infer_batch_size": 1, "torch_threads": 1})
    )
    monkeypatch.chdir(tmp_path)
    result = predict(load_config("lf.yaml"), progress=False)
    for name, value in ref["predict_results"].items():
        assert result["results"][name] == round(value, 4), name


@pytest.mark.slow
@pytest.mark.parametrize("run", ["cutoff_1024", "cutoff_48"])
def test_smollm2_alpaca_template_predictions_equal_llamafactorys(run, tmp_path, monkeypatch):
    """The same do_predict YAML with `template: alpaca` through LLaMA-Factory and loralab: the same prompts,
    predictions and predict_*. cutoff_48 cuts every prompt (LLaMA-Factory keeps each prompt's head)."""
    import yaml

    from loralab.config import load_config
    from loralab.evaluate import predict

    fixtures = Path(__file__).parent / "fixtures" / "lf_reference"
    ref = json.loads((fixtures / "smollm2_alpaca_template_predict.json").read_text(encoding="utf-8"))["runs"][run]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "alpaca_smol.json").write_text((fixtures / "data" / "alpaca_smol.json").read_text())
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"alpaca_smol": {"file_name": "alpaca_smol.json"}}))
    (tmp_path / "lf.yaml").write_text(
        yaml.safe_dump({**ref["yaml"], "output_dir": "out", "infer_batch_size": 1, "torch_threads": 1})
    )
    monkeypatch.chdir(tmp_path)
    result = predict(load_config("lf.yaml"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in ref["predictions"]]
    assert [r["predict"] for r in rows] == [p["predict"] for p in ref["predictions"]]
    assert [r["lf_label"] for r in rows] == [p["label"] for p in ref["predictions"]]
    for name, value in ref["predict_results"].items():
        assert result["results"][name] == round(value, 4), name
