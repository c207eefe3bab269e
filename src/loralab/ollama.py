"""An Ollama Modelfile for an exported model: FROM the GGUF, the chat template as a Go text/template, stops, defaults.

Ollama renders prompts with Go's text/template over its own data (`.System`, `.Messages` with `.Role`, `.Content`,
`.ToolCalls`; `.Tools`), not with the jinja template inside the GGUF. `go_template` writes a built-in loralab
template (LLaMA-Factory's slots) in that language so Ollama's prompt is loralab's prompt: system, user, assistant
and tool-result turns exactly, tool descriptions exactly in the `default` tool format. Tool descriptions in the
JSON tool formats (qwen, llama3, mistral) and the arguments of earlier tool calls are JSON written by Ollama's
`json` function (compact, Go's key order), so they differ from LLaMA-Factory's spacing; llama3's tool prompt
carries the export date. A tokenizer's own jinja template is not translated: Ollama then picks its closest known
template from the GGUF's chat template.
"""

from __future__ import annotations

import json
import logging
import re

from loralab.config import Config
from loralab.errors import LoralabError
from loralab.templates import EMPTY_THOUGHT, render, stop_token_ids, template_spec, tool_prompt_date

log = logging.getLogger(__name__)

_PROBE = [{"role": "user", "content": "x"}]


def template_starts_with_bos(tokenizer) -> bool:
    """Whether the chat template writes bos first: then llama.cpp / Ollama add it (add_bos) and TEMPLATE omits it."""
    bos = tokenizer.bos_token
    return bool(bos) and render(tokenizer, _PROBE, add_generation_prompt=True).startswith(bos)


def _go_text(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs care."""
    return text.replace("{{", '{{ "{{" }}')


def _go_slot(slot: str, content: str, bos: str, eos: str) -> str:
    """A LLaMA-Factory slot ('<|im_start|>user\n{content}<|im_end|>\n') as Go template text."""
    out = []
    for part in re.split(r"(\{content\}|\{bos\}|\{eos\})", slot):
        out.append({"{content}": content, "{bos}": _go_text(bos), "{eos}": _go_text(eos)}.get(part, _go_text(part)))
    return "".join(out)


def _go_tools(tool_format: str) -> str:
    """The tool descriptions LLaMA-Factory appends to the system text, over Ollama's `.Tools`."""
    if tool_format == "default":
        args = (
            "{{ range $name, $p := .Function.Parameters.Properties }}  - {{ $name }} ({{ $p.Type }}"
            "{{ range $tool.Function.Parameters.Required }}{{ if eq . $name }}, required{{ end }}{{ end }}): "
            "{{ $p.Description }}"
            "{{ if $p.Enum }}, should be one of [{{ range $i, $e := $p.Enum }}{{ if $i }}, {{ end }}{{ $e }}{{ end }}]"
            "{{ end }}{{ if $p.Items }}, where each item should be {{ $p.Items.type }}{{ end }}\n{{ end }}"
        )
        tools = (
            "{{ range $tool := $.Tools }}> Tool Name: {{ .Function.Name }}\nTool Description: "
            "{{ .Function.Description }}\nTool Args:\n" + args + "\n{{ end }}"
        )
        names = "{{ range $i, $t := $.Tools }}{{ if $i }}, {{ end }}{{ $t.Function.Name }}{{ end }}"
        from loralab.templates import DEFAULT_TOOL_PROMPT

        before, _, rest = DEFAULT_TOOL_PROMPT.partition("{tool_text}")
        middle, _, after = rest.partition("{tool_names}")
        return (
            _go_text(before)
            + tools
            + _go_text(middle.replace("{{", "{").replace("}}", "}"))
            + names
            + (_go_text(after.replace("{{", "{").replace("}}", "}")))
        )
    from loralab.templates import LLAMA3_TOOL_PROMPT, QWEN_TOOL_PROMPT

    if tool_format == "qwen":
        before, _, after = QWEN_TOOL_PROMPT.partition("{tool_text}")
        each = "{{ range $.Tools }}\n{{ json . }}{{ end }}"
    elif tool_format == "llama3":
        before, _, after = LLAMA3_TOOL_PROMPT.replace("{date}", tool_prompt_date()).partition("{tool_text}")
        each = "{{ range $.Tools }}{{ json . }}\n\n{{ end }}"
    else:  # mistral
        before, after, each = "[AVAILABLE_TOOLS] ", "[/AVAILABLE_TOOLS]", "{{ json $.Tools }}"
    unescape = lambda s: _go_text(s.replace("{{", "{").replace("}}", "}"))  # noqa: E731 (str.format's escapes)
    return unescape(before) + each + unescape(after)


def _go_tool_calls(tool_format: str) -> str:
    """An assistant turn's `.ToolCalls` as format_function_call writes them (arguments as compact JSON)."""
    name, args = "{{ $c.Function.Name }}", "{{ json $c.Function.Arguments }}"
    if tool_format == "qwen":
        each, sep = f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>', "\n"
    elif tool_format == "llama3":
        each, sep = f'{{"name": "{name}", "parameters": {args}}}', ", "
    elif tool_format == "mistral":
        each, sep = f'{{"name": "{name}", "arguments": {args}}}', ", "
    else:
        each, sep = f"Action: {name}\nAction Input: {args}", "\n"
    calls = f"{{{{ range $j, $c := .ToolCalls }}}}{{{{ if $j }}}}{sep}{{{{ end }}}}{each}{{{{ end }}}}"
    if tool_format in ("llama3", "mistral"):  # a list when there are several (mistral: always)
        many = "{{ if gt (len .ToolCalls) 1 }}"
        open_, close_ = (f"{many}[{{{{ end }}}}", f"{many}]{{{{ end }}}}") if tool_format == "llama3" else ("[", "]")
        calls = open_ + calls + close_
    return calls


def go_template(name: str, tool_format: str | None, strip_bos: bool, bos: str, eos: str) -> str:
    """The built-in template `name` as an Ollama TEMPLATE (Go text/template over .System, .Messages, .Tools).

    strip_bos: leave out a leading bos (llama.cpp / Ollama add it themselves when the GGUF says add_bos).
    """
    t = template_spec(name, tool_format)
    prefix = t["prefix"].removeprefix("{bos}") if strip_bos else t["prefix"]
    system = _go_slot(
        t["system"], "{{ $system }}{{ if $.Tools }}" + _go_tools(t["tool_format"]) + "{{ end }}", bos, eos
    )
    has_system = "{{ if or $system $.Tools }}"
    if t["system_in_user"]:  # the system text opens the first message's content
        first_head, content = "", "{{ if $first }}" + has_system + system + "{{ end }}{{ end }}{{ .Content }}"
    else:
        first_head, content = has_system + system + "{{ end }}", "{{ .Content }}"
    thought = ""
    if t["empty_thought"]:
        thought = "{{ if .Thinking }}<think>\n{{ .Thinking }}\n</think>\n\n{{ else }}" + EMPTY_THOUGHT + "{{ end }}"
    calls = _go_tool_calls(t["tool_format"])
    return (
        f"{{{{ $system := or .System {json.dumps(t['default_system'], ensure_ascii=False)} }}}}"
        "{{ $first := true }}"
        '{{ range .Messages }}{{ if ne .Role "system" }}'
        "{{ if $first }}" + _go_slot(prefix, "", bos, eos) + first_head + "{{ end }}"
        '{{ if eq .Role "user" }}' + _go_slot(t["user"], content, bos, eos) + ""
        '{{ else if and (eq .Role "assistant") .ToolCalls }}'
        + thought
        + _go_slot(t["function"], content.replace("{{ .Content }}", calls), bos, eos)
        + '{{ else if eq .Role "assistant" }}'
        + thought
        + _go_slot(t["assistant"], content, bos, eos)
        + '{{ else if eq .Role "tool" }}'
        + _go_slot(t["observation"], content, bos, eos)
        + "{{ end }}{{ $first = false }}{{ end }}{{ end }}"
    )


def _quote(text: str, what: str) -> str:
    """A Modelfile string: triple quotes hold newlines and double quotes (not three in a row)."""
    if '"""' in text:
        raise LoralabError(f'{what}: has three double quotes in a row ("""), which a Modelfile cannot hold')
    return f'"""{text}"""'


def stop_words(cfg: Config, tokenizer) -> list[str]:
    words = template_spec(cfg.template, cfg.tool_format)["stop_words"] if cfg.template else []
    words += [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    return list(dict.fromkeys(w for w in words if w))


def modelfile(cfg: Config, tokenizer, from_path: str, add_bos: bool, adapter: str | None = None) -> str:
    """The Modelfile text: FROM the GGUF (merged, or the base with an ADAPTER), TEMPLATE, SYSTEM, stop tokens and
    the generation defaults."""
    lines = ["# Written by `loralab export`. Create the model: ollama create NAME -f Modelfile (from this folder)"]
    if adapter:
        lines += [f"FROM {from_path}", f"ADAPTER {adapter}"]
    else:
        lines += [
            "# The merged model; export_ollama=adapter writes the base model's GGUF and runs it with ADAPTER",
            f"FROM {from_path}",
        ]
    default_system = cfg.default_system
    if cfg.template:
        template = go_template(cfg.template, cfg.tool_format, add_bos, tokenizer.bos_token or "", tokenizer.eos_token)
        lines.append(f"TEMPLATE {_quote(template, 'template')}")
        default_system = default_system or template_spec(cfg.template, cfg.tool_format)["default_system"]
    else:
        log.warning(
            "export_gguf: the Modelfile has no TEMPLATE: the tokenizer's own chat template is jinja, which "
            "Ollama does not run (it picks its closest known template); set template: to a built-in one for an "
            "exact TEMPLATE"
        )
        lines.append("# No TEMPLATE: this model uses its tokenizer's own (jinja) chat template; Ollama picks")
        lines.append("# its closest known template. Export with template: set for an exact one.")
    if default_system:
        lines.append(f"SYSTEM {_quote(default_system, 'default_system')}")
    for word in stop_words(cfg, tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}")
    if cfg.do_sample:
        lines += [
            f"PARAMETER temperature {cfg.temperature}",
            f"PARAMETER top_p {cfg.top_p}",
            f"PARAMETER top_k {cfg.top_k}",
        ]
    else:  # loralab's default is greedy decoding; temperature 0 is Ollama's greedy
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER repeat_penalty {cfg.repetition_penalty}")
    lines.append(f"PARAMETER num_predict {cfg.max_new_tokens}")
    return "\n".join(lines) + "\n"
