"""Tiny random Llama models for fast offline tests and benchmarks of the plumbing.

`make_tiny_llama(folder)` writes, in about a second, a 2-layer Llama with a byte-level BPE tokenizer
trained on a few sentences and a Llama-3-style chat template (or ChatML). The output is random; what
matters is that every code path (templates, masking, training, generation, serving) runs for real.
"""

from __future__ import annotations

import socket
from pathlib import Path

# The headless browser of the page tests (Debian's chromium; .ci/run installs it), kept off the network.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stalled_connections(port: int, n: int, body: bool = False, timeout: float = 30) -> list[socket.socket]:
    """n connections to 127.0.0.1:port that send part of a chat request and then nothing: the headers cut
    off before their end, or (body=True) whole headers and the first byte of a 1,000-byte body."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(head + (b"Content-Length: 1000\r\n\r\n{" if body else b""))
        out.append(s)
    return out


# Meta's chat template of Meta-Llama-3-8B-Instruct (the Llama 3 instruct format), as shipped in its
# tokenizer_config.json. Tests check that loralab's built-in `llama3` template gives the same token ids.
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the sum of 12 and 30? The sum of 12 and 30 is 42.",
    "Write the word in uppercase: apple -> APPLE. Sort these words: cat, apple, banana.",
    "You are a helpful assistant. Hello! How can I help you today?",
    "The capital of France is Paris. The opposite of hot is cold.",
    "Instruction input output response system user assistant 0123456789",
]


def make_tiny_tokenizer(style: str = "llama3", vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes) with the special tokens of `style`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = LLAMA3_SPECIAL if style == "llama3" else CHATML_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if style == "llama3":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>",
        )
        fast.chat_template = META_LLAMA3_TEMPLATE
    else:
        from loralab.templates import CHATML

        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        fast.chat_template = CHATML
    return fast


def make_tiny_llama(
    folder: str | Path, style: str = "llama3", seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer into `folder` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer(style)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_random_adapter(base: str | Path, out: str | Path, seed: int, target_modules="all-linear") -> Path:
    """An untrained LoRA adapter with random (non-zero) B matrices, so it visibly changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return Path(out)


def copy_refusing_system_prompts(model: str | Path, out: str | Path) -> Path:
    """A copy of a tiny model whose chat template refuses a system message, as Gemma's and Mistral's do
    (`raise_exception('System role not supported')`)."""
    import shutil

    out = Path(out)
    shutil.copytree(model, out)
    template = out / "chat_template.jinja"
    template.write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + template.read_text()
    )
    return out


class DevicePlacementCheck:
    """Within `with DevicePlacementCheck(device) as check:`, every tensor that loralab's own code creates
    must name the device it is meant for, and that device must be `device`; `check.violations` lists the
    `file:line function` of each one that does not.

    Why: CI has no GPU, so a tensor built on the default device (the CPU) beside a model on cuda passes
    every CPU test and fails on the first GPU. Factories (torch.tensor, torch.full, torch.zeros, ...) are
    caught with a TorchFunctionMode, torch.Generator by a stand-in function; `*_like`/`new_*` tensors inherit
    their device and need no check. `host_side` names functions whose tensors are meant for the host
    (a DataLoader's collator and sampler: the Trainer moves batches itself).
    """

    FACTORIES = (
        "tensor",
        "as_tensor",
        "full",
        "zeros",
        "ones",
        "empty",
        "arange",
        "rand",
        "randn",
        "randint",
        "randperm",
        "eye",
        "linspace",
    )
    HOST_SIDE = ("PadCollator.__call__", "LengthGroupedSampler.batches")

    def __init__(self, device, host_side: tuple[str, ...] = HOST_SIDE, generators: bool = True):
        """generators=False leaves torch.Generator alone (libraries that isinstance-check it, e.g. in a Trainer)."""
        import torch

        self.device = torch.device(device)
        self.host_side = host_side
        self.generators = generators
        self.violations: list[str] = []
        self.checked = 0
        self._source = str(Path(__file__).resolve().parent)
        self._factories = {getattr(torch, name) for name in self.FACTORIES}

    def _loralab_caller(self):
        """The frame that asked for the tensor when it is loralab's own code (None for other libraries)."""
        import sys

        frame = sys._getframe(1)
        while frame is not None and (frame.f_code.co_filename == __file__ or "/torch/" in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(self._source):
            return None
        return None if frame.f_code.co_qualname in self.host_side else frame

    def _record(self, what: str, device) -> None:
        import torch

        frame = self._loralab_caller()
        if frame is None:
            return
        self.checked += 1
        if device is None or torch.device(device) != self.device:
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_qualname}"
            self.violations.append(f"{where}: {what} on {device or 'the default device'}, not {self.device}")

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        check = self

        class FactoryMode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in check._factories:
                    check._record(f"torch.{func.__name__}", kwargs.get("device"))
                return func(*args, **kwargs)

        real_generator = self._real_generator = torch.Generator

        def generator(device=None):
            check._record("torch.Generator", device)
            return real_generator(device) if device is not None else real_generator()

        if self.generators:
            torch.Generator = generator
        self._mode = FactoryMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self._mode.__exit__(*exc)
        torch.Generator = self._real_generator
        return False
