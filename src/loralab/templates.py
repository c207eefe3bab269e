"""The one chat-template path shared by training, evaluation and serving.

What the model is trained on is exactly what it is served with: `encode_for_training`, `encode_prompt` and
`encode_for_prediction` share one encoder (`_segments`). A built-in template (`template:`, LLaMA-Factory's names)
is tokenized slot by slot as LLaMA-Factory does, so the ids are LLaMA-Factory's; the tokenizer's own jinja
template is rendered and tokenized turn by turn. The prompt a model sees at inference is token-for-token the
prompt part of its training sequences. `render` gives the same conversation as text (the jinja template).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

# Built-in templates: LLaMA-Factory 0.9.5's, by its names, as data. Each slot is the text a message becomes:
# {content} = the message text, {bos}/{eos} = the tokenizer's bos/eos token. LLaMA-Factory's defaults apply to
# slots a template leaves out (user "{content}", assistant "{content}{eos}", system "{content}", observation =
# the user slot, function = the assistant slot). system_in_user: the system text opens the first user message
# instead of being a turn of its own (LLaMA-Factory's Llama2Template: gemma, mistral). empty_thought: an answer
# (or tool call) without <think> tags is learned with an empty thought block first (LLaMA-Factory's
# ReasoningTemplate, qwen3).
# The user slot ends with the assistant header, so a rendered prompt is always ready for the answer.
# tests/fixtures/lf_reference/templates.json holds what LLaMA-Factory itself renders for each of them.
_CHATML_LIKE = {
    "user": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    "assistant": "{content}<|im_end|>\n",
    "system": "<|im_start|>system\n{content}<|im_end|>\n",
}
_QWEN_LIKE = {
    **_CHATML_LIKE,
    "function": "{content}<|im_end|>\n",
    "observation": "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "stop_words": ["<|im_end|>"],
    "replace_eos": True,
    "tool_format": "qwen",
}
_GEMMA = {
    "prefix": "{bos}",
    "user": "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    "assistant": "{content}<end_of_turn>\n",
    "system": "{content}\n\n",
    "observation": "<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
    "stop_words": ["<end_of_turn>"],
    "replace_eos": True,
    "system_in_user": True,
}
TEMPLATE_SPECS: dict[str, dict] = {
    "llama3": {
        "prefix": "{bos}",
        "user": "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",  # noqa: E501 (one slot, as LLaMA-Factory writes it)
        "assistant": "{content}<|eot_id|>",
        "system": "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        "function": "{content}<|eot_id|>",
        "observation": "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",  # noqa: E501 (one slot, as LLaMA-Factory writes it)
        "stop_words": ["<|eot_id|>", "<|eom_id|>"],
        "replace_eos": True,
        "tool_format": "llama3",
    },
    "llama4": {
        "prefix": "{bos}",
        "user": "<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
        "assistant": "{content}<|eot|>",
        "system": "<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
        "function": "{content}<|eot|>",
        "observation": "<|header_start|>ipython<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",  # noqa: E501 (one slot, as LLaMA-Factory writes it)
        "stop_words": ["<|eot|>", "<|eom|>"],
        "replace_eos": True,
        "tool_format": "llama3",
    },
    "qwen": {**_QWEN_LIKE, "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
    "qwen3": {**_QWEN_LIKE, "empty_thought": True},
    "qwen3_nothink": dict(_QWEN_LIKE),
    "mistral": {
        "prefix": "{bos}",
        "user": "[INST] {content}[/INST]",
        "assistant": " {content}{eos}",
        "system": "{content}\n\n",
        "function": "[TOOL_CALLS] {content}{eos}",
        "observation": '[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]',
        "system_in_user": True,
        "tool_format": "mistral",
    },
    "gemma": dict(_GEMMA),
    "gemma3": dict(_GEMMA),
    "phi": {
        "user": "<|user|>\n{content}<|end|>\n<|assistant|>\n",
        "assistant": "{content}<|end|>\n",
        "system": "<|system|>\n{content}<|end|>\n",
        "stop_words": ["<|end|>"],
        "replace_eos": True,
    },
    "phi4": {
        "user": "<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
        "assistant": "{content}<|im_end|>",
        "system": "<|im_start|>system<|im_sep|>{content}<|im_end|>",
        "stop_words": ["<|im_end|>"],
        "replace_eos": True,
    },
    "deepseek3": {"prefix": "{bos}", "user": "<｜User｜>{content}<｜Assistant｜>"},
    "smollm2": {
        **_CHATML_LIKE,
        "stop_words": ["<|im_end|>"],
        "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    },
    "chatml": {
        **_CHATML_LIKE,
        "observation": "<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
        "stop_words": ["<|im_end|>", "<|im_start|>"],
        "replace_eos": True,
    },
    "alpaca": {
        "user": "### Instruction:\n{content}\n\n### Response:\n",
        "assistant": "{content}{eos}\n\n",
        "default_system": "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n",
    },
    "default": {
        "user": "Human: {content}{eos}\nAssistant:",
        "assistant": "{content}{eos}\n",
        "system": "System: {content}{eos}\n",
    },
    "empty": {"assistant": "{content}"},
    "vicuna": {
        "user": "USER: {content} ASSISTANT:",
        "default_system": "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    },
}
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


TOOL_FORMATS = ("default", "llama3", "qwen", "mistral")


def template_spec(name: str, tool_format: str | None = None) -> dict:
    """A template's slots with LLaMA-Factory's defaults filled in.

    tool_format (the config key) replaces the template's own, and, as in LLaMA-Factory, its function slot with
    the plain one: the call's text, then eos.
    """
    spec = TEMPLATE_SPECS[name]
    full = {
        "prefix": "",
        "user": "{content}",
        "assistant": "{content}{eos}",
        "system": "{content}",
        "default_system": "",
        "stop_words": [],
        "replace_eos": False,
        "system_in_user": False,
        "empty_thought": False,
        "tool_format": "default",
        **spec,
    }
    full.setdefault("observation", full["user"])
    full.setdefault("function", full["assistant"])
    if tool_format:
        full.update(tool_format=tool_format, function="{content}{eos}")
    return full


def _slot(text: str, content: str = "content") -> str:
    """A slot as a jinja expression: '<|im_start|>user\n{content}' -> '"<|im_start|>user\\n" ~ content'."""
    exprs = []
    for part in re.split(r"(\{content\}|\{bos\}|\{eos\})", text):
        if part == "{content}":
            exprs.append(content)
        elif part in ("{bos}", "{eos}"):
            exprs.append(f"({part[1:-1]}_token or '')")  # a tokenizer without one: nothing, as in LLaMA-Factory
        elif part:
            exprs.append(json.dumps(part, ensure_ascii=False))
    return " ~ ".join(exprs) or "''"


def chat_template(name: str, tool_format: str | None = None) -> str:
    """The jinja chat template of a built-in template: what LLaMA-Factory renders, for tokenizer.apply_chat_template."""
    t = template_spec(name, tool_format)
    system = _slot(t["system"], "ns.system")
    first = f"{{%- set content = {system} ~ content -%}}" if t["system_in_user"] else f"{{{{ {system} }}}}"
    thought = (
        (
            "{%- if '<think>' not in content and '</think>' not in content -%}"
            f"{{%- set content = {json.dumps(EMPTY_THOUGHT)} ~ content -%}}{{%- endif -%}}"
        )
        if t["empty_thought"]
        else ""
    )
    return (
        f"{{%- set ns = namespace(system={json.dumps(t['default_system'], ensure_ascii=False)}) -%}}"
        "{%- set loop_messages = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}{%- endif -%}"
        "{%- for message in loop_messages -%}{%- set content = message['content'] -%}"
        f"{{%- if loop.first -%}}{{{{ {_slot(t['prefix'])} }}}}"
        f"{{%- if ns.system -%}}{first}{{%- endif -%}}{{%- endif -%}}"
        f"{{%- if message['role'] == 'user' -%}}{{{{ {_slot(t['user'])} }}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{thought}{{{{ {_slot(t['assistant'])} }}}}"
        f"{{%- elif message['role'] in ('observation', 'tool') -%}}{{{{ {_slot(t['observation'])} }}}}"
        f"{{%- elif message['role'] == 'function' -%}}{thought}{{{{ {_slot(t['function'])} }}}}"
        "{%- endif -%}{%- endfor -%}"
    )


BUILTIN_TEMPLATES = tuple(TEMPLATE_SPECS)
CHATML = chat_template("chatml")
# A conversation that shows a template's system, multi-turn and generation-prompt behaviour.
# No system message: a template's default system prompt (qwen, Llama 3.2's date block) shows too.
_PROBE = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


# Roles whose turns are learned: the assistant's replies and its tool calls (LLaMA-Factory's function turns).
ANSWER_ROLES = ("assistant", "function")


def apply_template(tokenizer, name: str | None = None, model_name: str = "model", tool_format: str | None = None):
    """Give `tokenizer` the chat template the whole run uses; set a pad token if it has none.

    A named template works as in LLaMA-Factory: its first stop word must be a token of the vocabulary
    (it ends every answer), and becomes the eos token where LLaMA-Factory replaces it. tool_format overrides
    the template's tool format; with the tokenizer's own template it writes tools and tool calls in that format
    into the system and function messages the template renders.
    """
    if name:
        if name not in TEMPLATE_SPECS:
            raise LoralabError(
                f"template: unknown template {name!r}; expected one of {', '.join(BUILTIN_TEMPLATES)} "
                "or unset (the tokenizer's own template)"
            )
        spec = template_spec(name, tool_format)
        vocab = tokenizer.get_vocab()
        missing = [t for t in spec["stop_words"][:1] + _special_tokens_of(spec) if t not in vocab]
        if missing:
            raise LoralabError(
                f"template: {name!r} needs the special tokens {', '.join(missing)}, which the tokenizer of "
                f"{model_name} does not have; leave template unset to use the model's own template"
            )
        own = tokenizer.chat_template
        tokenizer.chat_template = chat_template(name, tool_format)
        # the slots the encoders tokenize one by one, as LLaMA-Factory does (valid while this is the chat template)
        tokenizer.loralab_slots = {**spec, "jinja": tokenizer.chat_template}
        tokenizer.loralab_tool_format = spec["tool_format"]
        tokenizer.loralab_default_system = spec["default_system"]  # what tool descriptions follow without a system
        if isinstance(own, str) and own:
            _say_how_it_differs(tokenizer, own, name, model_name)
        if spec["replace_eos"] and tokenizer.eos_token != spec["stop_words"][0]:
            tokenizer.eos_token = spec["stop_words"][0]
    elif not tokenizer.chat_template:
        raise LoralabError(
            f"template: {model_name} has no chat template of its own; set template: alpaca (base models), "
            "chatml or llama3"
        )
    else:  # the tokenizer's own template: tools go to its `tools` argument unless a tool_format is set
        # A template that never reads `tools` (SmolLM2's, Llama 3.0's) would drop them silently: such a template
        # gets LLaMA-Factory's `default` tool format, written into the system message, with its own default system
        # prompt kept in front of the tools.
        own = tokenizer.chat_template
        reads_tools = not isinstance(own, str) or "tools" in own
        tokenizer.loralab_tool_format = tool_format or (None if reads_tools else "default")
        tokenizer.loralab_default_system = own_default_system(tokenizer)
        tokenizer.loralab_slots = None
    if tokenizer.pad_token is None:
        # Padding positions are masked by the attention mask and labels, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _special_tokens_of(spec: dict) -> list[str]:
    """The <|...|>-style markers a template writes: they must be single tokens, not text the model spells out."""
    text = "".join(spec[k] for k in ("prefix", "user", "assistant", "system"))
    return sorted(set(re.findall(r"<\|[a-z_]+\|>", text)))


_warned: set[tuple[str, str]] = set()


def _say_how_it_differs(tokenizer, own: str, name: str, model_name: str) -> None:
    """Log once when `template: NAME` renders differently from the tokenizer's own template.

    Serving stacks (vLLM, transformers pipelines) use the tokenizer's own template, so a model trained
    with another one sees other prompts there.
    """
    key = (model_name, name)
    if key in _warned:
        return
    try:
        theirs = tokenizer.apply_chat_template(_PROBE, chat_template=own, tokenize=False, add_generation_prompt=True)
    except Exception:  # a tokenizer template that cannot render this probe: nothing to compare
        return
    ours = render(tokenizer, _PROBE, add_generation_prompt=True)
    if ours == theirs:
        return
    _warned.add(key)
    a, b = ours.splitlines(), theirs.splitlines()
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def line(lines: list[str]) -> str:
        return repr(lines[n]) if n < len(lines) else "(no line)"

    log.warning(
        "template: %r renders differently from %s's own chat template (which vLLM and transformers use "
        "when serving it); first differing line %d: %s here vs %s in the tokenizer's",
        name,
        model_name,
        n + 1,
        line(a),
        line(b),
    )


def own_default_system(tokenizer) -> str:
    """The system prompt a tokenizer's own template writes when a conversation has none ("" when it writes none).

    Found by rendering a conversation with and without a marker system message: what stands where the marker
    stood in the first is the template's default (SmolLM2's "You are a helpful AI assistant named SmolLM...").
    """
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        with_marker = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False)
    except Exception:  # a template that refuses a system message (Gemma's) has no default system either
        return ""
    before, found, after = with_marker.partition(marker)
    if not found or not bare.startswith(before) or not bare.endswith(after) or len(bare) <= len(before) + len(after):
        return ""
    return bare[len(before) : len(bare) - len(after)]


def with_default_system(messages: list[dict], default_system: str | None) -> list[dict]:
    """Prepend the configured system prompt to a conversation that has none.

    A system message with tool descriptions but no text (a record with a tools column and no system) gets it too,
    as LLaMA-Factory uses its default system whenever the system text is empty.
    """
    if not default_system:
        return messages
    if not messages or messages[0]["role"] != "system":
        return [{"role": "system", "content": default_system}, *messages]
    if not messages[0]["content"] and messages[0].get("tools"):  # (an empty system otherwise stays empty)
        return [{**messages[0], "content": default_system}, *messages[1:]]
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as the text the model reads: the one rendering of training, prediction and serving.

    Tool descriptions (a `tools` list on the system message) are written after the system text in the template's
    tool format, as LLaMA-Factory writes them (no system text: the template's default system, then the tools).
    With the tokenizer's own template they go to its `tools` argument, for the template to render its way.
    """
    messages, own_template_tools = _written_out(tokenizer, messages)
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **own_template_tools
        )
    except TemplateError as e:
        # A template may refuse a conversation on purpose (`raise_exception("System role not
        # supported")` in Gemma/Mistral templates): that is the user's message to fix, not a crash.
        raise LoralabError(f"chat template: {e}") from None


def _written_out(tokenizer, messages: list[dict]) -> tuple[list[dict], dict]:
    """Tool descriptions and function calls written into the messages' text in the template's tool format.

    With the tokenizer's own template and no tool_format, the tools go to its `tools` argument instead (returned).
    """
    tool_format = getattr(tokenizer, "loralab_tool_format", None)  # set by apply_template for built-in templates
    tools = messages[0].get("tools") if messages and messages[0]["role"] == "system" else None
    own_template_tools = {}
    if tools and tool_format:
        system = messages[0]["content"] or getattr(tokenizer, "loralab_default_system", "")
        messages = [{"role": "system", "content": system + format_tools(tools, tool_format)}, *messages[1:]]
    elif tools:  # as OpenAI's {"type": "function", "function": {...}}, the form chat templates expect
        own_template_tools = {
            "tools": [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]
        }
        if not messages[0]["content"]:  # a system message only to carry the tools: the template's default stays
            messages = messages[1:]
    if tool_format and any(m["role"] == "function" for m in messages):
        messages = [
            {**m, "content": format_function_call(m["content"], tool_format)} if m["role"] == "function" else m
            for m in messages
        ]
    return messages, own_template_tools


# The tool prompts of LLaMA-Factory 0.9.5's tool formats (its tool_utils), as data: the text around the tool list.
DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)
LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


def tool_prompt_date() -> str:
    """Today as the llama3 tool prompt writes it ("26 Jul 2024"): LLaMA-Factory puts the day of the run there."""
    return datetime.now().strftime("%d %b %Y")


# How deep tool schemas and call arguments may nest (objects and lists): far more than any real schema needs
# (OpenAI's strict mode allows 10 levels), and small enough that a tool format's indented JSON stays small.
MAX_JSON_DEPTH = 32


def check_json_value(value, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON that nests deeper than max_depth or holds a lone UTF-16 surrogate (no tokenizer encodes one).

    Walks without recursion, so any depth is answered with one line naming the place.
    """
    stack = [(value, where, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                raise LoralabError(f"{path}: contains a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > max_depth:
            where = path if len(path) <= 120 else f"{path[:60]}...{path[-50:]}"
            raise LoralabError(f"{where}: nested deeper than {max_depth} levels of objects and lists")
        if isinstance(item, dict):
            for key, child in item.items():
                if not _is_text(key):
                    raise LoralabError(f"{path}: a key contains a lone UTF-16 surrogate; send valid Unicode")
                stack.append((child, f"{path}.{key}", depth + 1))
        else:
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads_json(text: str, where: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads for text from outside: too deep nesting or a lone surrogate is a LoralabError naming `where`.

    (json.loads itself gives up past ~1,000 levels with a RecursionError.)
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise LoralabError(f"{where}: nested deeper than {max_depth} levels of objects and lists") from None
    except json.JSONDecodeError as e:
        raise LoralabError(f"{where}: not valid JSON: {e}") from None
    check_json_value(value, where, max_depth)
    return value


def check_tools(tools: list[dict], where: str = "tools") -> None:
    """Refuse tool definitions the tool formats cannot write: each {"name", "description", "parameters"}
    (or OpenAI's {"type": "function", "function": {...}}) with a JSON-schema object as parameters whose
    properties are schemas, `required` a list of names, `enum` a list, `items` a schema."""

    def expect(ok: bool, path: str, what: str, got) -> None:
        if not ok:
            shown = json.dumps(got, ensure_ascii=True)
            raise LoralabError(f"{path}: expected {what}, got {shown[:60]}{'...' if len(shown) > 60 else ''}")

    expect(isinstance(tools, list), where, "a list of tools", tools)
    for i, tool in enumerate(tools):
        path = f"{where}[{i}]"
        expect(isinstance(tool, dict), path, "a JSON object", tool)
        if tool.get("type") == "function":
            tool, path = tool.get("function"), f"{path}.function"
            expect(isinstance(tool, dict), path, "a JSON object", tool)
        check_json_value(tool, path)
        expect(
            isinstance(tool.get("name"), str) and tool["name"] != "",
            f"{path}.name",
            "a non-empty string",
            tool.get("name"),
        )
        description = tool.get("description")
        expect(description is None or isinstance(description, str), f"{path}.description", "a string", description)
        parameters = tool.get("parameters")
        if parameters is None:
            continue
        path += ".parameters"
        expect(isinstance(parameters, dict), path, "a JSON schema object", parameters)
        schemas = [(parameters, path)]
        while schemas:
            schema, spath = schemas.pop()
            expect(isinstance(schema, dict), spath, "a JSON schema object", schema)
            kind = schema.get("type")
            expect(
                kind is None
                or isinstance(kind, str)
                or (isinstance(kind, list) and all(isinstance(k, str) for k in kind)),
                f"{spath}.type",
                "a type name or a list of them",
                kind,
            )
            described = schema.get("description")
            expect(described is None or isinstance(described, str), f"{spath}.description", "a string", described)
            required = schema.get("required")
            expect(
                required is None or (isinstance(required, list) and all(isinstance(r, str) for r in required)),
                f"{spath}.required",
                "a list of property names",
                required,
            )
            enum = schema.get("enum")
            expect(enum is None or isinstance(enum, list), f"{spath}.enum", "a list of values", enum)
            properties = schema.get("properties")
            expect(
                properties is None or isinstance(properties, dict),
                f"{spath}.properties",
                "an object of schemas",
                properties,
            )
            schemas += [(p, f"{spath}.properties.{name}") for name, p in (properties or {}).items()]
            if "items" in schema:
                items = schema["items"]
                expect(isinstance(items, dict), f"{spath}.items", "a JSON schema object", items)
                schemas.append((items, f"{spath}.items"))


def format_tools(tools: list[dict], tool_format: str) -> str:
    """Tool definitions as the text LLaMA-Factory's tool format appends to the system prompt.

    A tool is {"name", "description", "parameters"} or OpenAI's {"type": "function", "function": {...}}.
    default: a bulleted description of each tool and its arguments, then how to call one (Action/Action Input);
    llama3: each tool as indented JSON after a date line; qwen: each as JSON inside <tools></tools>;
    mistral: the list as JSON inside [AVAILABLE_TOOLS].
    """
    if not tools:
        return ""
    wrapped = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]

    def dump(obj, **kw) -> str:
        return json.dumps(obj, ensure_ascii=False, **kw)

    if tool_format == "llama3":
        text = "".join(dump(t, indent=4) + "\n\n" for t in wrapped)
        return LLAMA3_TOOL_PROMPT.format(date=tool_prompt_date(), tool_text=text)
    if tool_format == "qwen":
        return QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + dump(t) for t in wrapped))
    if tool_format == "mistral":
        return f"[AVAILABLE_TOOLS] {dump(wrapped)}[/AVAILABLE_TOOLS]"
    text = ""
    for tool in (t["function"] for t in wrapped):
        parameters = tool.get("parameters") or {}
        required = parameters.get("required") or []
        args = ""
        for name, param in (parameters.get("properties") or {}).items():
            notes = ", required" if name in required else ""
            detail = ""
            if param.get("enum"):
                detail += f", should be one of [{', '.join(str(v) for v in param['enum'])}]"
            if param.get("items"):
                detail += f", where each item should be {param['items'].get('type', '')}"
            args += f"  - {name} ({param.get('type', '')}{notes}): {param.get('description', '')}{detail}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
    names = ", ".join(t["function"]["name"] for t in wrapped)
    return DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=names)


def format_function_call(content: str, tool_format: str) -> str:
    """A function turn ({"name", "arguments"} JSON, or a list of them) as the text LLaMA-Factory's tool format writes.

    default: `Action: NAME\nAction Input: ARGS` lines; llama3: {"name", "parameters"} JSON; qwen: each call as
    {"name", "arguments"} JSON inside <tool_call></tool_call>; mistral: a JSON list of {"name", "arguments"}.
    """
    try:
        calls = json.loads(content)
        calls = calls if isinstance(calls, list) else [calls]
        pairs = [(c["name"], c["arguments"]) for c in calls]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise LoralabError(
            f'function turn: expected JSON {{"name": ..., "arguments": {{...}}}} (or a list), got {content[:80]!r}'
        ) from None

    def dump(obj) -> str:
        return json.dumps(obj, ensure_ascii=False)

    if tool_format == "llama3":
        objs = [{"name": n, "parameters": a} for n, a in pairs]
        return dump(objs[0] if len(objs) == 1 else objs)
    if tool_format == "qwen":
        return "\n".join(f"<tool_call>\n{dump({'name': n, 'arguments': a})}\n</tool_call>" for n, a in pairs)
    if tool_format == "mistral":
        return dump([{"name": n, "arguments": a} for n, a in pairs])
    return "\n".join(f"Action: {n}\nAction Input: {dump(a)}" for n, a in pairs)


_ACTION = re.compile(r"Action:\s*([\w.-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, tool_format: str | None) -> list[tuple[str, dict]] | None:
    """A reply that calls tools -> [(name, arguments)], else None: the inverse of format_function_call.

    Each tool format's own way (default: Action/Action Input lines; llama3: {"name", "parameters"} JSON; qwen:
    <tool_call> blocks; mistral: a JSON list, after [TOOL_CALLS] when the model writes it). With the tokenizer's
    own template (no tool_format) the common forms are tried: <tool_call> blocks, then a JSON call or list of
    calls. A reply that is not wholly a call (text around a JSON object, arguments that are not a JSON object)
    is text.
    """

    def calls_of(obj) -> list[tuple[str, dict]] | None:
        items = obj if isinstance(obj, list) else [obj]
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):  # OpenAI writes arguments as a JSON string
                args = load(args)
            if not isinstance(args, dict):
                return None
            out.append((item["name"], args))
        return out or None

    def load(chunk: str):
        try:  # a reply is model output: too deep or not JSON, it is text
            return loads_json(chunk, "reply")
        except LoralabError:
            return None

    text = text.strip()
    if tool_format in (None, "qwen") and _TOOL_CALL.search(text):
        found = []
        for block in _TOOL_CALL.findall(text):
            calls = calls_of(load(block))
            if calls is None:
                return None
            found += calls
        return found
    if tool_format == "default":
        found = []
        for name, args in _ACTION.findall(text):
            args = load(args.strip().strip("`").strip())
            if not isinstance(args, dict):
                return None
            found.append((name, args))
        return found or None
    if tool_format in (None, "llama3", "mistral"):
        return calls_of(load(text.removeprefix("[TOOL_CALLS]").strip()))
    return None


def encode_text(tokenizer, text: str) -> list[int]:
    # The template writes bos itself where the model wants it; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_slots(tokenizer) -> dict | None:
    """The built-in template's slots apply_template gave this tokenizer, while it is still its chat template."""
    slots = getattr(tokenizer, "loralab_slots", None)
    return slots if slots and tokenizer.chat_template == slots["jinja"] else None


_SLOT_OF_ROLE = {r: r for r in ("user", "assistant", "function", "observation")} | {"tool": "observation"}


def _slot_ids(tokenizer, slot: str, content: str) -> list[int]:
    """A slot's ids as LLaMA-Factory makes them: each text piece between {bos}/{eos} tokenized on its own."""
    ids: list[int] = []
    for piece in re.split(r"(\{bos\}|\{eos\})", slot):
        if piece in ("{bos}", "{eos}"):
            token_id = tokenizer.bos_token_id if piece == "{bos}" else tokenizer.eos_token_id
            ids += [] if token_id is None else [token_id]  # a tokenizer without one: nothing, as in LLaMA-Factory
        elif piece:
            ids += encode_text(tokenizer, piece.replace("{content}", content, 1))
    return ids


def _message_ids(tokenizer, slots: dict, messages: list[dict]) -> list[tuple[bool, list[int]]]:
    """(is an answer, ids) per message of a built-in template, tokenized as LLaMA-Factory's Template._encode does.

    The prefix, the system text and the first message's slot, and every later message's slot, are tokenized
    each on its own and their ids joined, so the tokens at a piece's edges are the piece's own (on SmolLM2 the
    alpaca system prompt's closing "\\n\\n" is one token alone, two with "###" after it in one text). The text
    is exactly `render`'s.
    """
    messages, _ = _written_out(tokenizer, messages)
    system, turns = slots["default_system"], messages
    if messages and messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    out = []
    for k, message in enumerate(turns):
        content, ids = message["content"], []
        if k == 0:
            ids += _slot_ids(tokenizer, slots["prefix"], "")
            if system and slots["system_in_user"]:  # LLaMA-Factory's Llama2Template: one text with the message
                content = slots["system"].replace("{content}", system, 1) + content
            elif system:
                ids += _slot_ids(tokenizer, slots["system"], system)
        answer = message["role"] in ANSWER_ROLES
        if answer and slots["empty_thought"] and "<think>" not in content and "</think>" not in content:
            ids += encode_text(tokenizer, EMPTY_THOUGHT)  # LLaMA-Factory's thought ids, tokenized on their own
        if message["role"] in _SLOT_OF_ROLE:  # another role renders nothing, as in the jinja template
            ids += _slot_ids(tokenizer, slots[_SLOT_OF_ROLE[message["role"]]], content)
        out.append((answer, ids))
    return out


def _segments(tokenizer, messages: list[dict], generation_prompt: bool) -> list[tuple[bool, list[int]]]:
    """A conversation as (is an answer, ids) pieces whose ids, joined, are the ids of the whole conversation.

    The one encoder of training, prediction and serving: a prompt's ids are the ids its conversation has in
    training, so what a model is asked with is a prefix of what it was trained on. A built-in template is
    tokenized slot by slot as LLaMA-Factory does (`_message_ids`). The tokenizer's own template is rendered and
    cut where each answer starts and ends, each piece tokenized on its own; generation_prompt adds the text from
    the last answer to the end of the generation prompt.
    """
    slots = _template_slots(tokenizer)
    if slots is not None:
        return _message_ids(tokenizer, slots, messages)
    segments: list[tuple[bool, list[int]]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] not in ANSWER_ROLES:
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        _check_prefix(rendered, prompt)
        _check_prefix(prompt, full)
        segments += [(False, encode_text(tokenizer, prompt[len(rendered) :]))]
        segments += [(True, encode_text(tokenizer, full[len(prompt) :]))]
        rendered = full
    if generation_prompt:
        prompt = render(tokenizer, messages, add_generation_prompt=True)
        _check_prefix(rendered, prompt)
        segments.append((False, encode_text(tokenizer, prompt[len(rendered) :])))
    return segments


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to and including the assistant header, for generation.

    The same ids the conversation has in training (`encode_for_training`, LLaMA-Factory's for a built-in
    template). A tokenizer's own template that renders earlier turns differently once later ones follow
    cannot be cut into turns; its prompt is then tokenized as one text (such a template cannot be trained on).
    """
    try:
        return [i for _, ids in _segments(tokenizer, messages, generation_prompt=True) for i in ids]
    except LoralabError:
        return encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def _prompt_answer_pairs(tokenizer, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per answer turn: the ids since the previous answer, and the answer's own."""
    pairs: list[tuple[list[int], list[int]]] = []
    prompt: list[int] = []
    for answer, ids in _segments(tokenizer, messages, generation_prompt=False):
        if answer:
            pairs.append((prompt, ids))
            prompt = []
        else:
            prompt = prompt + ids
    return pairs


def encode_for_training(
    tokenizer,
    messages: list[dict],
    cutoff_len: int,
    overflow: str = "split",
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict | None:
    """input_ids + labels for one conversation; only answer turns (and their closing token) are learned.

    The conversation is encoded turn by turn (`_segments`). The ids up to each answer (assistant or function
    turn) are its prompt (label -100, or learned too with train_on_prompt); the answer's content and the
    template's turn-closing token (<|eot_id|>, <|im_end|>, eos) are labels, so the model learns to stop. With
    mask_history only the last answer is learned.

    Over cutoff_len, overflow says what happens (LLaMA-Factory's meaning by default):
    split    = each (prompt, answer) pair in turn gets what is left of the budget, shared between prompt and
               answer by `budget_split`; the last turns first with mask_history. Each part keeps its head.
    truncate = the sequence's tail is cut.
    drop     = None.
    Also None when no label token is left.
    """
    pairs = _prompt_answer_pairs(tokenizer, messages)
    last = len(pairs) - 1

    def labelled(k: int, prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
        prompt_labels = list(prompt_ids) if train_on_prompt else [-100] * len(prompt_ids)
        answer_labels = list(answer_ids) if (k == last or not mask_history) else [-100] * len(answer_ids)
        return prompt_ids + answer_ids, prompt_labels + answer_labels

    total = sum(len(p) + len(a) for p, a in pairs)
    if total > cutoff_len and overflow == "drop":
        return None
    if total > cutoff_len and overflow == "split":
        kept: dict[int, tuple[list[int], list[int]]] = {}
        used = 0
        for k in reversed(range(len(pairs))) if mask_history else range(len(pairs)):
            if used >= cutoff_len:
                break
            prompt_ids, answer_ids = pairs[k]
            n_prompt, n_answer = budget_split(len(prompt_ids), len(answer_ids), cutoff_len - used)
            kept[k] = (prompt_ids[:n_prompt], answer_ids[:n_answer])
            used += n_prompt + n_answer
        pairs_cut = [(k, *kept[k]) for k in sorted(kept)]
    else:
        pairs_cut = [(k, p, a) for k, (p, a) in enumerate(pairs)]
    input_ids: list[int] = []
    labels: list[int] = []
    for k, prompt_ids, answer_ids in pairs_cut:
        ids, labs = labelled(k, prompt_ids, answer_ids)
        input_ids += ids
        labels += labs
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]  # truncate (a no-op after split)
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_for_prediction(tokenizer, prompt: list[dict], answer: str, cutoff_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids) of one prediction record, as LLaMA-Factory's do_predict makes them.

    The label is the answer with the template's closing text (`answer<|im_end|>\n` on ChatML). Over cutoff_len,
    prompt and label are cut by `budget_split` (LLaMA-Factory's infer_seqlen), each keeping its head: a prompt
    that is too long loses its end, the assistant header included, and the model continues from there as in
    LLaMA-Factory. The prompt ids are `encode_prompt`'s when nothing is cut.
    """
    segments = _segments(tokenizer, [*prompt, {"role": "assistant", "content": answer}], generation_prompt=False)
    prompt_ids = [i for _, ids in segments[:-1] for i in ids]
    answer_ids = segments[-1][1]
    n_prompt, n_answer = budget_split(len(prompt_ids), len(answer_ids), cutoff_len)
    return prompt_ids[:n_prompt], answer_ids[:n_answer]


def lf_label_text(tokenizer, prompt: list[dict], answer: str, cutoff_len: int) -> str:
    """The label text LLaMA-Factory scores a prediction against (its predict_* metrics).

    The label ids of `encode_for_prediction` decoded without special tokens: on ChatML models the `\n` after
    <|im_end|> stays in the label ("answer\n"); on Llama 3 nothing follows <|eot_id|> ("answer").
    """
    return tokenizer.decode(encode_for_prediction(tokenizer, prompt, answer, cutoff_len)[1], skip_special_tokens=True)


def budget_split(prompt_len: int, answer_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and answer tokens of one turn fit in `budget` (LLaMA-Factory's infer_seqlen rule).

    A short answer (under half the budget) is kept whole; else a short prompt is kept whole and the answer
    gets the rest; else both are cut in proportion to their lengths. The prompt gets what the answer leaves.
    """
    if 2 * answer_len < budget:
        answer_room = budget
    elif 2 * prompt_len < budget:
        answer_room = budget - prompt_len
    else:
        answer_room = int(budget * (answer_len / (prompt_len + answer_len)))
    n_answer = min(answer_room, answer_len)
    n_prompt = min(max(budget - n_answer, 0), prompt_len)
    return n_prompt, n_answer


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise LoralabError(
            "template: the chat template renders earlier turns differently once later turns are added, "
            "so prompt and answer tokens cannot be separated; set template: to a built-in one "
            f"({', '.join(BUILTIN_TEMPLATES)})"
        )


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's turn-closing token plus eos."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    prompt = render(tokenizer, probe[:1], add_generation_prompt=True)
    full = render(tokenizer, probe)
    tail = full[len(prompt) :]
    after_answer = tail[tail.find("y") + 1 :] if "y" in tail else ""
    ids = encode_text(tokenizer, after_answer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if ids and ids[0] in special:
        stops.add(ids[0])
    return sorted(stops)
