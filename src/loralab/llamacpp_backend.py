"""`infer_backend: llamacpp`: chat, API and predict on llama.cpp (llama-cpp-python, extra `loralab[llamacpp]`).

The prompt is rendered by loralab's one template path (`Engine.prompt_ids`) and handed to llama.cpp as
token ids, so the model sees exactly the tokens training produced; llama.cpp's own chat templates and
tokenizer are never used. Replies are decoded by the engine's HF tokenizer, and stop tokens, stop
strings, streaming, cancellation and `max_new_tokens` are the engine's own bookkeeping (`Engine._accept`):
this module only turns a row's tokens into the next token.

- the model: `model_name_or_path` a .gguf file (e.g. the merged f16/q8_0 model `loralab export` writes),
  or `builtin:smollm2-135m-instruct`, whose packaged GGUF llama.cpp reads directly;
- adapters: llama.cpp LoRA GGUFs (an adapter folder holding one `.gguf`, or the file), applied to the
  base GGUF they were converted against. Several may be loaded; each request picks one or none. llama.cpp
  applies adapters to a whole context, not per sequence, so rows run one after another (see below);
- one row at a time: llama-cpp-python decodes one sequence per context, so the engine's queue is served
  first come, first served; every `step` decodes one token of the current row, so a cancelled or
  disconnected request stops within one token. The KV cache of the previous reply is kept and its
  common prefix with the next prompt reused (a chat's next turn only evaluates the new tokens);
- greedy = argmax of llama.cpp's logits; sampling (temperature, top_k, top_p, repetition_penalty, seed)
  runs on those logits with the HF engine's own sampler (`sampling.pick_token`), so the knobs mean the same
  on both backends.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import weakref
from pathlib import Path

from loralab.config import Config
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

# llama.cpp's context (KV cache) is allocated up front: the model's training context, capped here so a
# Llama 3.x (128k context) does not allocate gigabytes for a chat on a laptop.
MAX_CONTEXT = 8192


def check_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LoralabError(
            "infer_backend: llamacpp needs llama-cpp-python: pip install 'loralab[llamacpp]' "
            "(built from source where no wheel exists: cmake and a C++ compiler, several minutes)"
        )


def model_gguf(cfg: Config) -> Path:
    """The GGUF file llama.cpp loads for `model_name_or_path`."""
    name = cfg.model_name_or_path
    if name.startswith("builtin:"):
        from loralab.models import resolve_model_path

        folder, _ = resolve_model_path(name)  # the converted copy records the packaged GGUF it came from
        source = Path(folder) / "loralab_source.json"
        if source.is_file():
            return Path(json.loads(source.read_text())["gguf"])
        raise LoralabError(f"model_name_or_path: {name} has no packaged GGUF for infer_backend: llamacpp")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoralabError(f"model_name_or_path: GGUF file {name} not found")
        return path
    raise LoralabError(
        f"model_name_or_path: infer_backend: llamacpp needs a .gguf file, got {name!r}; write one with `loralab "
        "export CONFIG adapter_name_or_path=RUN export_dir=OUT export_gguf=q8_0` and use OUT/model-q8_0.gguf"
    )


def adapter_gguf(name: str, path: str) -> Path:
    """The llama.cpp LoRA GGUF of an adapter: the file itself, or the one .gguf in the adapter's folder."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(found) > 1:  # an export folder also holds the merged models: the LoRA GGUF says it is an adapter
        found = [f for f in found if _gguf_string(f, "general.type") == "adapter"] or found
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise LoralabError(
            f"adapter {name!r}: {path} holds several .gguf files ({', '.join(f.name for f in found)}); "
            "name the LoRA GGUF file itself"
        )
    raise LoralabError(
        f"adapter {name!r}: infer_backend: llamacpp needs a llama.cpp LoRA GGUF, and {path} has none; "
        "`loralab export ... export_gguf=f16` writes one (OUT/adapter.gguf), or use infer_backend: huggingface"
    )


def load_tokenizer(cfg: Config):
    """The HF tokenizer that renders prompts and decodes replies, with the chat template the model was trained with.

    A GGUF that `loralab export` wrote sits beside the merged model folder: its tokenizer files (and
    template) are the training run's own. A GGUF alone: transformers reads its vocabulary, and the chat
    template comes from its `tokenizer.chat_template` (transformers does not read that field).
    """
    from loralab import models

    if cfg.model_name_or_path.startswith("builtin:"):
        return models.load_tokenizer(cfg)
    gguf = model_gguf(cfg)
    folder = gguf.parent
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return models.load_tokenizer(cfg.model_copy(update={"model_name_or_path": str(folder)}))
    from transformers import AutoTokenizer

    from loralab.templates import apply_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0]
        raise LoralabError(f"model_name_or_path: cannot read the tokenizer of {gguf} ({first})") from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_string(gguf, "tokenizer.chat_template")
    return apply_template(tokenizer, cfg.template, cfg.model_name_or_path, tool_format=cfg.tool_format)


def _gguf_string(gguf: Path, key: str) -> str | None:
    """A string field of a GGUF file's metadata (None if absent, or not a readable GGUF)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).fields.get(key)
    except (ValueError, OSError):
        return None
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def _context_length(gguf: Path) -> int | None:
    """The model's training context from the GGUF's metadata (None if it does not say)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    arch = fields.get("general.architecture")
    key = f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length" if arch is not None else None
    return int(fields[key].parts[fields[key].data[0]][0]) if key in fields else None


class LlamaCppBackend:
    """One llama.cpp model (+ LoRA adapters) that turns the engine's rows into tokens, one row at a time."""

    def __init__(self, cfg: Config, adapters: dict[str, str]):
        check_installed()
        import llama_cpp

        gguf = model_gguf(cfg)
        lora_files = {name: adapter_gguf(name, path) for name, path in adapters.items()}
        self.n_ctx = min(_context_length(gguf) or MAX_CONTEXT, MAX_CONTEXT)
        threads = cfg.torch_threads or os.cpu_count() or 1
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf),
                n_ctx=self.n_ctx,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                seed=cfg.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise LoralabError(f"model_name_or_path: llama.cpp cannot load {gguf} ({str(e).splitlines()[0]})") from None
        self._lib = llama_cpp
        # Freed before the interpreter tears modules down: llama-cpp-python's __del__ at exit prints a traceback.
        model = weakref.ref(self.llm)
        atexit.register(lambda: (llm := model()) is not None and llm.close())
        self.n_vocab = self.llm.n_vocab()
        self.adapters = {}
        for name, path in lora_files.items():
            handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not handle:
                raise LoralabError(
                    f"adapter {name!r}: llama.cpp cannot load {path} as a LoRA adapter of {gguf.name} "
                    "(a LoRA GGUF converted against this base model is expected)"
                )
            self.adapters[name] = handle
            self.llm._stack.callback(llama_cpp.llama_adapter_lora_free, handle)
        self._adapter_on: str | None = None
        self.row = None  # the request being decoded

    # --- what the engine's step calls --------------------------------------------------------------
    def step(self, engine) -> None:
        """Decode one token of the current row (admitting the next waiting request when there is none)."""
        row = self.row
        if row is not None and row.cancelled:
            engine._finish(row, "cancelled")
            row = self.row = None
        try:
            if row is None:
                joining = engine._waiting.admit([], 1, lambda r: engine._finish(r, "cancelled"))
                if not joining:
                    return
                row = joining[0]
                self._start(row, engine.stats)
            elif self.llm.n_tokens >= self.n_ctx:  # the context is full: the reply ends here
                self.row = None
                engine._finish(row, "length")
                return
            else:
                self.llm.eval([row.tokens[-1]])
            token = self._choose(row)
            self.row = None if engine._accept(row, token) else row
        except Exception as e:  # noqa: BLE001 - the row gets the error, the backend keeps serving
            self.row = None
            self.llm.reset()  # the KV cache may be half written
            engine._fail([row], e)

    def _start(self, row, stats: dict) -> None:
        """Evaluate a new row's prompt, reusing the KV cache's common prefix with the previous one."""
        prompt = row.prompt
        if len(prompt) >= self.n_ctx:
            raise LoralabError(
                f"prompt: {len(prompt)} tokens do not fit llama.cpp's context of {self.n_ctx} tokens; "
                "shorten the conversation"
            )
        self._use_adapter(row.adapter)
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, prompt[:-1]):  # at least the last prompt token is evaluated: its logits
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep
        self.llm.eval(prompt[keep:])
        stats["prompt_tokens_reused"] = stats.get("prompt_tokens_reused", 0) + keep  # Engine.stats
        stats["prompt_tokens_evaluated"] = stats.get("prompt_tokens_evaluated", 0) + len(prompt) - keep

    def _use_adapter(self, adapter: str | None) -> None:
        """llama.cpp applies adapters to the whole context: switch it, and forget the cache made without it."""
        if adapter == self._adapter_on:
            return
        import ctypes

        lib = self._lib
        n = 0 if adapter is None else 1
        handles = (lib.llama_adapter_lora_p_ctypes * 1)(*([self.adapters[adapter]] if n else []))
        scales = (ctypes.c_float * 1)(*([1.0] if n else []))
        if lib.llama_set_adapters_lora(self.llm.ctx, handles, n, scales):
            raise LoralabError(f"adapter {adapter!r}: llama.cpp could not apply it")
        self._adapter_on = adapter
        self.llm.n_tokens = 0  # the cached keys/values were computed with the other adapter

    def _choose(self, row) -> int:
        """The row's next token from the last position's logits: argmax, or the HF engine's sampler."""
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        s = row.settings
        if not s.do_sample and s.repetition_penalty == 1.0:
            return int(logits.argmax())
        import torch

        from loralab.sampling import pick_token

        return pick_token(row, torch.from_numpy(logits.copy()))
