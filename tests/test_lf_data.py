"""Token-level parity with LLaMA-Factory 0.9.5: the same input_ids and labels for the same data.

fixtures/lf_reference/data/ holds the datasets (alpaca with custom columns and history, ShareGPT with custom
tags and function/observation turns, OpenAI messages with tool calls, JSON lines, a folder, records longer than
cutoff_len, and records LLaMA-Factory skips); data_ids.json is what LLaMA-Factory's own get_dataset produced
for them (record_data.py), on the tiny test tokenizers.
"""

import json
import logging
from pathlib import Path

import pytest

from loralab import data
from loralab.config import load_config
from loralab.templates import apply_template
from loralab.testing import make_tiny_tokenizer
from loralab.train import encode_split

FIXTURES = Path(__file__).parent / "fixtures" / "lf_reference"
REFERENCE = json.loads((FIXTURES / "data_ids.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers():
    return {style: make_tiny_tokenizer(style) for style in ("llama3", "chatml")}


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_input_ids_and_labels_equal_llamafactorys(case, tokenizers, caplog):
    ref = REFERENCE["cases"][case]
    cfg = load_config(
        None,
        {
            "dataset": ref["dataset"],
            "dataset_dir": str(FIXTURES / "data"),
            "template": ref["template"],
            "cutoff_len": ref["cutoff_len"],
            "train_on_prompt": ref.get("train_on_prompt", False),
            "mask_history": ref.get("mask_history", False),
        },
    )
    tokenizer = apply_template(tokenizers[ref["tokenizer"]], cfg.template)
    with caplog.at_level(logging.WARNING, logger="loralab"):
        examples, _ = encode_split(tokenizer, data.load_conversations(cfg, "train"), cfg)
    got = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    want = ref["examples"]
    if case == "folder":  # LLaMA-Factory reads a folder in os.listdir order; loralab by file name
        got, want = sorted(got, key=json.dumps), sorted(want, key=json.dumps)
    assert got == want


def test_skipped_records_are_counted_with_their_index(caplog):
    cfg = load_config(None, {"dataset": "sharegpt_custom,alpaca_custom", "dataset_dir": str(FIXTURES / "data")})
    with caplog.at_level(logging.WARNING, logger="loralab"):
        convs = data.load_conversations(cfg, "train")
    assert len(convs) == 3 + 4  # as LLaMA-Factory: 2 of 5 and 1 of 5 skipped
    assert "sharegpt_custom: skipped 2 of 5 records: record 3 (turn 0 is assistant" in caplog.text
    assert "record 4 (expected an even number of turns" in caplog.text
    assert "alpaca_custom: skipped 1 of 5 records: record 3 (field `a` is null" in caplog.text


def test_num_samples_and_other_file_types(tmp_path):
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"answer {i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"pq": {"file_name": "d.parquet"}, "csv": {"file_name": "d.csv", "num_samples": 6}})
    )
    cfg = load_config(None, {"dataset": "pq", "dataset_dir": str(tmp_path)})
    assert [c[-1]["content"] for c in data.load_conversations(cfg, "train")] == [
        "answer 0",
        "answer 1",
        "answer 2",
        "answer 3",
    ]
    sampled = data.load_conversations(cfg.model_copy(update={"dataset": "csv"}), "train")
    answers = [c[-1]["content"] for c in sampled]
    assert len(answers) == 6 and set(answers) == {f"answer {i}" for i in range(4)}  # every record, then repeats
    assert answers == [
        c[-1]["content"] for c in data.load_conversations(cfg.model_copy(update={"dataset": "csv"}), "train")
    ]
