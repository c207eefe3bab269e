"""Function calling through the API: a request's tools and tool turns render as training data with the same
tools does, and a reply that calls tools is read back in each tool format."""

import json
from pathlib import Path

import pytest

from loralab import api, data, templates
from loralab.templates import apply_template
from loralab.testing import make_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "lf_reference" / "data"
SPEC = json.loads((FIXTURES / "dataset_info.json").read_text(encoding="utf-8"))["sharegpt_tools"]
RECORD = json.loads((FIXTURES / "sharegpt_tools.json").read_text(encoding="utf-8"))[0]


def as_request(record: dict) -> api.ChatRequest:
    """The fixture's conversation (up to its last answer) as an OpenAI client would send it."""
    tools = [
        t if t.get("type") == "function" else {"type": "function", "function": t}
        for t in json.loads(record["tool_defs"])
    ]
    messages = [{"role": "system", "content": record["sys"]}]
    for turn in record["turns"][:-1]:
        if turn["who"] == "u":
            messages.append({"role": "user", "content": turn["text"]})
        elif turn["who"] == "call":
            call = json.loads(turn["text"])
            arguments = json.dumps(call["arguments"])
            fn = {"name": call["name"], "arguments": arguments}
            messages.append(
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": fn}]}
            )
        else:
            messages.append({"role": "tool", "tool_call_id": "c1", "content": turn["text"]})
    return api.ChatRequest.model_validate({"model": "m", "messages": messages, "tools": tools})


@pytest.mark.parametrize(
    "style, template, tool_format",
    [
        ("chatml", "qwen", None),
        ("llama3", "llama3", None),
        ("chatml", "qwen", "default"),
        ("llama3", "llama3", "mistral"),
    ],
)
def test_a_request_renders_as_its_training_record(style, template, tool_format, monkeypatch):
    monkeypatch.setattr(templates, "tool_prompt_date", lambda: "26 Jul 2024")
    tokenizer = apply_template(make_tiny_tokenizer(style), template, tool_format=tool_format)
    trained = data.to_messages(RECORD, SPEC)
    served = api.to_messages(as_request(RECORD))
    assert [m["role"] for m in served] == ["system", "user", "function", "observation"]
    want = templates.render(tokenizer, trained[:-1], add_generation_prompt=True)
    assert templates.render(tokenizer, served, add_generation_prompt=True) == want
    assert "get_weather" in want and '"celsius"' in want  # the tools and the call are in the prompt


def test_tool_definitions_without_a_system_message_open_the_conversation():
    req = api.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    assert api.to_messages(req) == [
        {"role": "system", "content": "", "tools": [{"name": "f"}]},
        {"role": "user", "content": "hi"},
    ]


def test_several_tool_results_in_a_row_are_one_observation_as_in_training():
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in (1, 2)]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "one"},
        {"role": "tool", "content": "two"},
    ]
    served = api.to_messages(api.ChatRequest.model_validate({"model": "m", "messages": messages}))
    assert served[1] == {"role": "function", "content": json.dumps([{"name": "f", "arguments": {}}] * 2)}
    assert served[2] == {"role": "observation", "content": "one" + data.TOOL_RESULTS_JOIN + "two"}


CALLS = [("get_weather", {"city": "Zürich", "unit": "celsius"}), ("search", {"query": "cats", "sites": ["a.org"]})]


@pytest.mark.parametrize("tool_format", ["default", "llama3", "qwen", "mistral"])
@pytest.mark.parametrize("n", [1, 2])
def test_a_call_written_in_a_tool_format_is_read_back(tool_format, n):
    calls = CALLS[:n]
    text = templates.format_function_call(json.dumps([{"name": a, "arguments": b} for a, b in calls]), tool_format)
    assert templates.parse_tool_calls(text, tool_format) == calls
    assert templates.parse_tool_calls("  " + text + "\n", tool_format) == calls  # as a model may space it
    if tool_format == "mistral":  # the template's function slot writes the marker before the list
        assert templates.parse_tool_calls("[TOOL_CALLS] " + text, tool_format) == calls


@pytest.mark.parametrize(
    "text, calls",
    [
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', [("f", {"x": 1})]),  # Qwen, SmolLM2
        (
            '<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]</tool_call>',
            [("f", {}), ("g", {})],
        ),
        ('{"name": "f", "parameters": {"x": "1"}}', [("f", {"x": "1"})]),  # Llama 3.1's own template
        ('{"name": "f", "arguments": "{\\"x\\": 2}"}', [("f", {"x": 2})]),  # arguments as a JSON string
        ("Paris is the capital of France.", None),
        ('Sure: {"name": "f", "arguments": {}}', None),  # words around a call: an answer, not a call
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', None),
        ('{"name": 3, "arguments": {}}', None),
        ("[]", None),
    ],
)
def test_the_tokenizers_own_template_reads_the_common_forms(text, calls):
    assert templates.parse_tool_calls(text, None) == calls


@pytest.mark.parametrize(
    "tool_format, text",
    [
        ("default", "Action: f\nAction Input: not json"),
        ("default", "I would call a tool here."),
        ("llama3", '{"name": "f", "parameters": {}} and more'),
        ("qwen", '{"name": "f", "arguments": {}}'),  # qwen calls are inside <tool_call>
        ("mistral", "[TOOL_CALLS] [oops"),
    ],
)
def test_text_that_is_not_a_call_stays_text(tool_format, text):
    assert templates.parse_tool_calls(text, tool_format) is None


@pytest.mark.parametrize("tool_format", [None, "default", "llama3", "qwen", "mistral"])
@pytest.mark.parametrize(
    "text",
    [
        "[" * 2_000,
        "[" * 100_000 + "]" * 100_000,
        '{"name": "f", "arguments": ' + '{"a": ' * 5_000 + "1" + "}" * 5_001,
        '<tool_call>{"name": "f", "arguments": ' + "[" * 3_000 + "]" * 3_000 + "}</tool_call>",
        "Action: f\nAction Input: " + "[" * 3_000 + "]" * 3_000,
        '{"name": "f", "arguments": "' + '{\\"a\\": ' * 2_000 + "1" + "}" * 2_000 + '"}',
        '{"name": "f", "arguments": {"a": "\\ud800"}}',  # an escaped lone surrogate: not text to answer with
    ],
    ids=[
        "2k-brackets",
        "100k-balanced",
        "deep-arguments",
        "deep-qwen",
        "deep-default",
        "deep-string-args",
        "surrogate",
    ],
)
def test_a_reply_nested_too_deep_is_text_not_an_error(tool_format, text):
    """Replies are model output (and the model may be anyone's): no nesting makes the parser recurse or fail."""
    assert templates.parse_tool_calls(text, tool_format) is None


TOOL = {"name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object"}}
SMOL_LIKE = (  # a template that has a default system prompt and never reads `tools` (as SmolLM2's)
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are SmolBot."
    "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_on_a_template_that_ignores_them_are_written_in_the_default_format_keeping_its_system():
    """SmolLM2's own template drops `tools`, and the empty system message that carried them removed its
    default system prompt: the tools are written in LLaMA-Factory's default format after that prompt."""
    tokenizer = make_tiny_tokenizer("chatml")
    tokenizer.chat_template = SMOL_LIKE
    apply_template(tokenizer)
    req = api.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": TOOL}],
        }
    )
    prompt = templates.render(tokenizer, api.to_messages(req), add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are SmolBot.You have access to the following tools")
    assert "> Tool Name: get_weather" in prompt and "Action Input" in prompt
    plain = templates.render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert plain.startswith("<|im_start|>system\nYou are SmolBot.<|im_end|>")  # no tools: unchanged
    # The reply is read in the same format.
    assert templates.parse_tool_calls('Action: get_weather\nAction Input: {"city": "Bern"}', "default") == [
        ("get_weather", {"city": "Bern"})
    ]
    assert tokenizer.loralab_tool_format == "default"


def test_a_template_that_reads_tools_gets_them_and_keeps_its_default_system():
    """A template with its own tool rendering gets `tools`; the empty system message that only carried
    them is not passed on (it would replace the template's default system prompt)."""
    tokenizer = make_tiny_tokenizer("chatml")
    tokenizer.chat_template = SMOL_LIKE.replace(
        "{% for m in messages %}", "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}"
    )
    apply_template(tokenizer)
    assert tokenizer.loralab_tool_format is None
    req = api.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": TOOL}],
        }
    )
    prompt = templates.render(tokenizer, api.to_messages(req), add_generation_prompt=True)
    assert prompt.startswith('TOOLS:[{"type": "function"') and "<|im_start|>system\nYou are SmolBot." in prompt


@pytest.mark.slow
def test_smollm2_gets_the_tools_and_keeps_its_default_system_prompt():
    """Issue 20: SmolLM2's template drops `tools`, and the system message carrying them removed its default
    system prompt (37 prompt tokens without tools, 21 with 1 or 50). Now: its default system, then the tools."""
    from loralab.config import Config
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer(Config())  # builtin:smollm2-135m-instruct
    hello = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d"}} for i in range(50)]
    sizes = []
    for n in (0, 1, 50):
        body = {"model": "m", "messages": hello} | ({"tools": tools[:n]} if n else {})
        messages = api.to_messages(api.ChatRequest.model_validate(body))
        text = templates.render(tokenizer, messages, add_generation_prompt=True)
        assert "You are a helpful AI assistant named SmolLM" in text
        assert all(f"Tool Name: tool_{i}\n" in text for i in range(n))
        sizes.append(len(templates.encode_prompt(tokenizer, messages)))
    assert sizes[0] < sizes[1] < sizes[2]
