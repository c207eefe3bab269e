"""loralab's built-in templates render what LLaMA-Factory 0.9.5 renders, turn by turn.

The references in fixtures/lf_reference/templates.json were recorded with LLaMA-Factory itself
(fixtures/lf_reference/record_templates.py) on the tiny test tokenizer: the text of each (prompt, answer)
pair it trains on and its generation prompt, for a system + two-turn conversation and without the system.
"""

import json
import logging
from pathlib import Path

import pytest

from loralab.templates import (
    BUILTIN_TEMPLATES,
    apply_template,
    chat_template,
    encode_for_training,
    render,
)
from loralab.testing import make_tiny_tokenizer

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "lf_reference" / "templates.json").read_text(encoding="utf-8")
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer("llama3")


def test_every_lf_template_name_is_built_in():
    names = {key.split("/")[0] for key in REFERENCE["templates"]}
    assert len(names) == 17 and names <= set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("key", sorted(REFERENCE["templates"]))
def test_template_renders_what_llamafactory_renders(tokenizer, key):
    ref = REFERENCE["templates"][key]
    name, with_system = key.split("/")[0], "/" not in key
    messages = ([{"role": "system", "content": REFERENCE["system"]}] if with_system else []) + REFERENCE["messages"]
    tokenizer.chat_template = chat_template(name)
    tokenizer.eos_token = ref["eos_token"]  # LLaMA-Factory's eos for this template (replaced by its stop word)
    rendered, turns = "", []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
            full = render(tokenizer, messages[: i + 1])
            turns.append([prompt[len(rendered) :], full[len(prompt) :]])
            rendered = full
    assert turns == ref["turns"]
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
    if name == "qwen3":
        # One known difference: LLaMA-Factory trains qwen3 with an empty thought in every earlier answer but
        # leaves them out of the generation prompt; loralab keeps them, so the prompt is what was trained on.
        prompt = prompt.replace("<think>\n\n</think>\n\n", "")
    assert prompt == ref["generation_prompt"]


def test_named_template_says_once_how_it_differs_from_the_tokenizers(caplog):
    tok = make_tiny_tokenizer("llama3")  # its own template: Meta's llama3 (trims content, same layout)
    with caplog.at_level(logging.WARNING, logger="loralab"):
        apply_template(tok, "llama3", "tiny-a")
    assert "renders differently" not in caplog.text  # same text for the probe
    tok = make_tiny_tokenizer("chatml")
    with caplog.at_level(logging.WARNING, logger="loralab"):
        apply_template(tok, "qwen", "tiny-b")  # qwen adds its default system prompt
        apply_template(make_tiny_tokenizer("chatml"), "qwen", "tiny-b")
    assert caplog.text.count("renders differently") == 1
    assert "first differing line 1: '<|im_start|>system' here vs '<|im_start|>user'" in caplog.text


def test_replace_eos_and_stop(tokenizer):
    tok = make_tiny_tokenizer("chatml")
    tok.eos_token = "<|endoftext|>"
    apply_template(tok, "qwen3_nothink")
    assert tok.eos_token == "<|im_end|>"  # LLaMA-Factory replaces eos with the template's stop word


def test_qwen3_learns_an_empty_thought():
    tok = make_tiny_tokenizer("chatml")
    apply_template(tok, "qwen3")
    enc = encode_for_training(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 100)
    learned = tok.decode([i for i, label in zip(enc["input_ids"], enc["labels"]) if label != -100])
    assert learned == "<think>\n\n</think>\n\nyo<|im_end|>\n"
