"""The one chat-template path shared by training, evaluation and serving.

What the model is trained on is exactly what it is served with: `encode_for_training` and
`encode_prompt` both render conversations with the tokenizer's jinja chat template (its own, or a
built-in one named by `template:`), and tokenize the rendered text the same way. The prompt a model
sees at inference is token-for-token the prompt part of its training sequences.
"""

from __future__ import annotations

import logging

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

# Built-in templates, for models without one (or to override a model's own).
# llama3: the Llama 3 instruct format (header tokens, trimmed content, <|eot_id|> closes each turn).
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# chatml: <|im_start|>role\ncontent<|im_end|>\n (Qwen, SmolLM2, ...).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# alpaca: plain-text prompt for base models that have no chat template; eos closes each answer.
ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] ~ '\n\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. '"
    " ~ 'Write a response that appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' ~ message['content'] ~ '\n\n### Response:\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] ~ eos_token ~ '\n\n' }}{% endif %}"
    "{% endfor %}"
)
BUILTIN_TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "alpaca": ALPACA}
# Special tokens a built-in template needs in the tokenizer's vocabulary.
REQUIRED_TOKENS = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "alpaca": [],
}


def apply_template(tokenizer, name: str | None = None, model_name: str = "model"):
    """Give `tokenizer` the chat template the whole run uses; set a pad token if it has none."""
    if name:
        if name not in BUILTIN_TEMPLATES:
            raise LoralabError(
                f"template: unknown template {name!r}; expected one of {', '.join(BUILTIN_TEMPLATES)} "
                "or unset (the tokenizer's own template)"
            )
        vocab = tokenizer.get_vocab()
        missing = [t for t in REQUIRED_TOKENS[name] if t not in vocab]
        if missing:
            raise LoralabError(
                f"template: {name!r} needs the special tokens {', '.join(missing)}, which the tokenizer of "
                f"{model_name} does not have; leave template unset to use the model's own template"
            )
        tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise LoralabError(
            f"template: {model_name} has no chat template of its own; set template: alpaca (base models), "
            "chatml or llama3"
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked by the attention mask and labels, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_default_system(messages: list[dict], default_system: str | None) -> list[dict]:
    """Prepend the configured system prompt to a conversation that has none."""
    if default_system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": default_system}, *messages]
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        # A template may refuse a conversation on purpose (`raise_exception("System role not
        # supported")` in Gemma/Mistral templates): that is the user's message to fix, not a crash.
        raise LoralabError(f"chat template: {e}") from None


def encode_text(tokenizer, text: str) -> list[int]:
    # The template writes bos itself where the model wants it; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to and including the assistant header, for generation."""
    return encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_for_training(
    tokenizer, messages: list[dict], cutoff_len: int, overflow: str = "truncate"
) -> dict | None:
    """input_ids + labels for one conversation; only assistant turns (and their closing token) are learned.

    The conversation is rendered turn by turn. Text up to each assistant header is prompt (label -100);
    the assistant's content and the template's turn-closing token (<|eot_id|>, <|im_end|>, eos) are
    labels, so the model learns to stop. Returns None when the sequence is over cutoff_len and
    overflow == "drop", or when no label token survives truncation.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        _check_prefix(rendered, prompt)
        _check_prefix(prompt, full)
        prompt_ids = encode_text(tokenizer, prompt[len(rendered):])
        answer_ids = encode_text(tokenizer, full[len(prompt):])
        input_ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
        rendered = full
    if len(input_ids) > cutoff_len:
        if overflow == "drop":
            return None
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


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
    tail = full[len(prompt):]
    after_answer = tail[tail.find("y") + 1:] if "y" in tail else ""
    ids = encode_text(tokenizer, after_answer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if ids and ids[0] in special:
        stops.add(ids[0])
    return sorted(stops)
