"""Token-level parity with LLaMA-Factory 0.9.5: the same input_ids and labels for the same data.

fixtures/lf_reference/data/ holds the datasets (alpaca with custom columns and history, ShareGPT with custom tags
and function/observation turns, OpenAI messages with tool calls, ShareGPT and OpenAI records with a tools column
(rendered in the llama3, qwen, mistral and default tool formats, also chosen with tool_format), JSON lines, a
folder, records longer than cutoff_len, and records LLaMA-Factory skips); data_ids.json is what LLaMA-Factory's
own get_dataset produced for them (record_data.py), on the tiny test tokenizers.
"""

import json
import logging
from pathlib import Path

import pytest

from loralab import data, templates
from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.templates import apply_template
from loralab.testing import make_tiny_tokenizer
from loralab.train import encode_split

FIXTURES = Path(__file__).parent / "fixtures" / "lf_reference"
REFERENCE = json.loads((FIXTURES / "data_ids.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers():
    return {style: make_tiny_tokenizer(style) for style in ("llama3", "chatml")}


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_input_ids_and_labels_equal_llamafactorys(case, tokenizers, caplog, monkeypatch):
    ref = REFERENCE["cases"][case]
    # LLaMA-Factory's llama3 tool prompt names the day of the run; the reference was recorded on a fixed one
    monkeypatch.setattr(templates, "tool_prompt_date", lambda: REFERENCE["tool_date"])
    cfg = load_config(
        None,
        {
            "dataset": ref["dataset"],
            "dataset_dir": str(FIXTURES / "data"),
            "template": ref["template"],
            "cutoff_len": ref["cutoff_len"],
            "train_on_prompt": ref.get("train_on_prompt", False),
            "mask_history": ref.get("mask_history", False),
            "tool_format": ref.get("tool_format"),
        },
    )
    tokenizer = apply_template(tokenizers[ref["tokenizer"]], cfg.template, tool_format=cfg.tool_format)
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


def test_unusable_tools_skip_the_record_with_its_index(tmp_path, caplog):
    tool = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    records = [
        {"conversations": turns, "tools": json.dumps([tool])},
        {"conversations": turns, "tools": "[{'name': 'f'}"},  # not JSON
        {"conversations": turns, "tools": json.dumps(tool)},  # an object, not a list
        {"conversations": turns, "tools": json.dumps([{"description": "no name"}])},
    ]
    (tmp_path / "t.json").write_text(json.dumps(records))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"t": {"file_name": "t.json", "formatting": "sharegpt", "columns": {"tools": "tools"}}})
    )
    cfg = load_config(None, {"dataset": "t", "dataset_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="loralab"):
        convs = data.load_conversations(cfg, "train")
    assert convs == [[{"role": "system", "content": "", "tools": [tool]}, *convs[0][1:]]]
    assert "t: skipped 3 of 4 records: record 1 (field `tools` is not valid JSON" in caplog.text
    assert "record 2 (field `tools` must be a list of tool definitions, got dict)" in caplog.text
    assert "record 3 (`tools[0]` must be a tool definition" in caplog.text


def test_tools_render_the_same_for_training_and_generation(tokenizers):
    """A prediction or served prompt with tools is token for token the prompt its training sequence had."""
    tool = {"name": "search", "description": "Search.", "parameters": {"type": "object", "properties": {}}}
    messages = [
        {"role": "system", "content": "", "tools": [tool]},
        {"role": "user", "content": "Find cats."},
        {"role": "assistant", "content": "No need."},
    ]
    tokenizer = apply_template(tokenizers["chatml"], "qwen")
    messages = templates.with_default_system(messages, "Be brief.")  # an empty system takes the default
    prompt_text = templates.render(tokenizer, messages[:-1], add_generation_prompt=True)
    assert prompt_text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert json.dumps({"type": "function", "function": tool}) in prompt_text
    prompt = templates.encode_prompt(tokenizer, messages[:-1])
    trained = templates.encode_for_training(tokenizer, messages, cutoff_len=10**6)
    assert trained["input_ids"][: len(prompt)] == prompt
    assert set(trained["labels"][: len(prompt)]) == {-100} and trained["labels"][len(prompt)] != -100


def test_tool_format_is_checked_at_config_time():
    with pytest.raises(LoralabError, match=r"tool_format.*expected one of default, llama3, qwen, mistral"):
        load_config(None, {"tool_format": "glm4"})


def test_tools_go_to_the_tokenizers_own_template_when_no_template_is_named():
    tokenizer = make_tiny_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    tokenizer = apply_template(tokenizer, None)
    tools = [{"name": "a", "parameters": {}}, {"type": "function", "function": {"name": "b"}}]
    messages = [{"role": "system", "content": "S", "tools": tools}, {"role": "user", "content": "U"}]
    assert templates.render(tokenizer, messages) == "[a][b]<system>S<user>U"


SELECTION = json.loads((FIXTURES / "selection.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", sorted(SELECTION["selection"]))
def test_the_same_records_as_llamafactory(case):
    """num_samples, max_samples and val_size pick the records LLaMA-Factory picks for the same seed, in its order
    (record_selection.py: LLaMA-Factory's own loading and split)."""
    ref = SELECTION["selection"][case]
    values = {"dataset": ref["dataset"], "dataset_dir": str(FIXTURES / "data"), "seed": ref["seed"]}
    values.update({k: ref[k] for k in ("max_samples", "val_size") if k in ref})
    cfg = load_config(None, values)
    for which, key in (("train", "train"), ("eval", "eval")):
        assert [c[0]["content"] for c in data.load_conversations(cfg, which)] == ref[key], which


def test_packing_cuts_each_sequence_to_cutoff_len_minus_one(tokenizers):
    ref = SELECTION["packing"]
    values = {"dataset": ref["dataset"], "dataset_dir": str(FIXTURES / "data"), "template": ref["template"]}
    cfg = load_config(None, {**values, "cutoff_len": ref["cutoff_len"], "neat_packing": True})
    tokenizer = apply_template(tokenizers["llama3"], cfg.template)
    examples, counts = encode_split(tokenizer, data.load_conversations(cfg, "train"), cfg)
    assert [e["input_ids"] for e in examples] == ref["sequences"]
    assert max(map(len, ref["sequences"])) == ref["cutoff_len"] - 1 and counts["truncated"] == len(examples)
