"""The one generation engine: evaluation, chat, web chat and the API all generate through `Engine`.

The model, tokenizer and chat template come from `models.load_model_and_tokenizer`, so a prompt is
rendered exactly as in training. `Engine.generate` takes a list of conversations and returns one
`Completion` per conversation:

- batched: prompts sorted by length, left-padded, decoded together with the KV cache (HF `generate`,
  which derives position ids from the attention mask, so padding does not shift positions);
- greedy by default, so a prediction file is reproducible and batched output equals one-at-a-time
  output; sampling (temperature, top_p, top_k, repetition_penalty, seed) when asked;
- stops on the template's stop tokens (`templates.stop_token_ids`) and on extra stop strings;
- streams: `on_text(index, delta)` gets each row's new text as it appears (called after every
  decoding step for every live row, delta "" when nothing new is ready); returning False cancels
  that row within that step.

`infer_backend: vllm` runs the same interface on vLLM (CUDA only, optional extra `loralab[vllm]`).
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralab.config import Config
from loralab.errors import LoralabError
from loralab.models import default_adapters, peft_adapter_names
from loralab.templates import encode_prompt, stop_token_ids, with_default_system

log = logging.getLogger(__name__)

OnText = Callable[[int, str], "bool | None"]


@dataclass
class GenerationSettings:
    """How to decode. The defaults are greedy (reproducible); do_sample=True uses the sampling knobs."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # extra stop strings (OpenAI `stop`)

    @classmethod
    def from_config(cls, cfg: Config) -> GenerationSettings:
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            seed=cfg.seed,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise LoralabError(f"max_new_tokens: got {self.max_new_tokens}; expected a positive number")
        if self.do_sample and self.temperature <= 0:
            raise LoralabError(f"temperature: got {self.temperature}; expected > 0 when sampling (do_sample)")
        if not 0 < self.top_p <= 1:
            raise LoralabError(f"top_p: got {self.top_p}; expected 0 < top_p <= 1")
        if self.top_k < 0:
            raise LoralabError(f"top_k: got {self.top_k}; expected >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise LoralabError(f"repetition_penalty: got {self.repetition_penalty}; expected > 0 (1.0 = off)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LoralabError("stop: expected a list of non-empty strings")


@dataclass
class Completion:
    text: str  # generated text, without the stop token / stop string
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


def _holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` must not be streamed yet.

    A trailing U+FFFD is half a multi-byte character (the next token completes it); a tail that
    could be the start of a stop string may still turn out to be one and be cut.
    """
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class _Rows:
    """Per-row bookkeeping of one batch, called by HF generate after every new token.

    It is a StoppingCriteria: it returns which rows are done (stop token, stop string, cancelled),
    streams each row's new text to `on_text`, and remembers where each row ended.
    """

    def __init__(self, tokenizer, index: list[int], prompt_len: int, stop_ids: list[int],
                 stops: list[str], on_text: OnText | None):
        self.tokenizer, self.index, self.prompt_len = tokenizer, index, prompt_len
        self.stop_ids, self.stops, self.on_text = set(stop_ids), stops, on_text
        n = len(index)
        self.finish: list[str | None] = [None] * n  # finish reason, once the row is done
        self.n_tokens: list[int | None] = [None] * n  # generated tokens kept (stop token excluded)
        self.text: list[str | None] = [None] * n  # final text when a stop string ended the row
        self.sent = [""] * n  # text already streamed
        self.watch_text = bool(stops) or on_text is not None

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        new = input_ids[:, self.prompt_len:]
        step = new.shape[1]
        last = new[:, -1].tolist()
        for r, tok in enumerate(last):
            if self.finish[r] is not None:
                continue
            if tok in self.stop_ids:
                self.finish[r], self.n_tokens[r] = "stop", step - 1
                continue
            if not self.watch_text:
                continue
            text = self.decode(new[r].tolist())
            cut = _find_stop(text, self.stops)
            if cut >= 0:
                self.finish[r], self.n_tokens[r], self.text[r] = "stop", step, text[:cut]
                continue  # the rest is streamed by `finish_row`
            if self.on_text is not None:
                ready = text[: len(text) - _holdback(text, self.stops)]
                delta = ""
                if len(ready) > len(self.sent[r]) and ready.startswith(self.sent[r]):
                    delta, self.sent[r] = ready[len(self.sent[r]):], ready
                # Called every step, with "" while text is held back, so a consumer that went away
                # stops its row within one step.
                if self.on_text(self.index[r], delta) is False:
                    self.finish[r], self.n_tokens[r] = "cancelled", step
        done = [f is not None for f in self.finish]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finish_row(self, r: int, new_ids: list[int], prompt_tokens: int) -> Completion:
        """The row's Completion after generate returned; streams whatever text is still held back."""
        reason = self.finish[r]
        if reason is None:  # never stopped: HF ran out of max_new_tokens (or ended on a stop id we missed)
            kept = new_ids
            for j, tok in enumerate(new_ids):
                if tok in self.stop_ids:
                    kept, reason = new_ids[:j], "stop"
                    break
            reason = reason or "length"
        else:
            kept = new_ids[: self.n_tokens[r]]
        text = self.text[r] if self.text[r] is not None else self.decode(kept)
        if reason != "stop" or self.text[r] is None:
            cut = _find_stop(text, self.stops)  # a stop string completed by the very last token
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if self.on_text is not None and reason != "cancelled" and len(text) > len(self.sent[r]):
            self.on_text(self.index[r], text[len(self.sent[r]):])
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(kept), finish_reason=reason)


class Engine:
    """Base model + tokenizer (+ adapters) and a batched, streaming `generate`."""

    def __init__(self, cfg: Config, adapters: dict[str, str] | None = None):
        self.cfg = cfg
        self.base_name = cfg.model_name_or_path
        if adapters is None:
            adapters = default_adapters(cfg)
        self.adapter_names = list(adapters)  # as users name them; the model knows them by _peft_name
        self._peft_name = peft_adapter_names(adapters)
        self.backend = cfg.infer_backend
        self._lock = threading.Lock()  # one generate at a time: adapters are switched on the shared model
        self._vllm = None
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        if cfg.infer_backend == "vllm":
            from loralab.models import check_adapter_base, load_tokenizer

            for path in adapters.values():
                check_adapter_base(cfg, path)
            self.tokenizer = load_tokenizer(cfg)
            self.model = None
            self._vllm = VllmBackend(cfg, adapters, self.tokenizer)
        else:
            from loralab.models import load_model_and_tokenizer

            self.model, self.tokenizer = load_model_and_tokenizer(cfg, adapters)
        # Left padding: every prompt ends right where generation starts, so one step serves the batch.
        self.tokenizer.padding_side = "left"
        self.stop_ids = stop_token_ids(self.tokenizer)

    @property
    def device(self):
        return self.model.device if self.model is not None else "cuda"

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation's prompt (configured default system prompt added when missing)."""
        return encode_prompt(self.tokenizer, with_default_system(messages, self.cfg.default_system))

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered prompt as text, special tokens included (what LLaMA-Factory writes as `prompt`)."""
        return self.tokenizer.decode(self.prompt_ids(messages), skip_special_tokens=False)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapter_names:
            loaded = ", ".join(self.adapter_names) or "none"
            raise LoralabError(f"adapter: {adapter!r} is not loaded (loaded: {loaded}; None = base model)")

    def generate(self, conversations: list[list[dict]], settings: GenerationSettings | None = None,
                 adapter: str | None = None, batch_size: int = 16, progress: bool = False,
                 on_text: OnText | None = None) -> list[Completion]:
        """One Completion per conversation, in the input order. adapter=None is the base model."""
        settings = settings or GenerationSettings()
        settings.check()
        self._check_adapter(adapter)
        if batch_size < 1:
            raise LoralabError(f"infer_batch_size: got {batch_size}; expected a positive number")
        prompts = [self.prompt_ids(m) for m in conversations]
        with self._lock:
            if self._vllm is not None:
                return self._vllm.generate(prompts, settings, adapter, on_text)
            return self._generate_hf(prompts, settings, adapter, batch_size, progress, on_text)

    def _generate_hf(self, prompts, settings, adapter, batch_size, progress, on_text) -> list[Completion]:
        import contextlib

        import torch
        from tqdm.auto import tqdm

        # Longest first: similar lengths share a batch (little padding), and a too-long batch fails early.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        if hasattr(self.model, "disable_adapter"):  # a PeftModel
            if adapter is None:
                adapter_ctx = self.model.disable_adapter()
            else:
                self.model.set_adapter(self._peft_name[adapter])
                adapter_ctx = contextlib.nullcontext()
        else:
            adapter_ctx = contextlib.nullcontext()
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="sample")
        with adapter_ctx, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start: start + batch_size]
                batch = self.tokenizer.pad({"input_ids": [prompts[i] for i in index]}, padding=True,
                                           return_tensors="pt").to(self.device)
                prompt_len = batch["input_ids"].shape[1]
                rows = _Rows(self.tokenizer, index, prompt_len, self.stop_ids, settings.stop, on_text)
                if settings.seed is not None and settings.do_sample:
                    torch.manual_seed(settings.seed)
                out = self.model.generate(**batch, generation_config=self._hf_config(settings), stopping_criteria=[rows])
                for r, i in enumerate(index):
                    new_ids = out[r, prompt_len:].tolist()
                    results[i] = rows.finish_row(r, new_ids, len(prompts[i]))
                bar.update(len(index))
        bar.close()
        return results  # type: ignore[return-value]

    def _hf_config(self, settings: GenerationSettings):
        from transformers import GenerationConfig

        kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        return GenerationConfig(**kwargs)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Text deltas of one reply as they are generated; closing the iterator cancels generation."""
        deltas: queue.Queue = queue.Queue()
        stop = threading.Event()
        END = object()

        def on_text(_: int, delta: str) -> bool:
            if delta:
                deltas.put(delta)
            return not stop.is_set()

        def work() -> None:
            try:
                self.generate([messages], settings, adapter=adapter, batch_size=1, on_text=on_text)
            except BaseException as e:  # handed to the consumer, raised there
                deltas.put(e)
            finally:
                deltas.put(END)

        # Errors in the arguments surface here, before the thread starts.
        (settings or GenerationSettings()).check()
        self._check_adapter(adapter)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := deltas.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VllmBackend:
    """`infer_backend: vllm`: the same prompts (token ids from our template) run on vLLM's offline LLM.

    Adapters go through vLLM's LoRA support (`LLM(enable_lora=True)` + `LoRARequest`). vLLM's offline
    API returns whole replies, so `on_text` gets each reply as one delta and cannot cancel mid-reply.
    """

    def __init__(self, cfg: Config, adapters: dict[str, str], tokenizer):
        if importlib.util.find_spec("vllm") is None:
            raise LoralabError(
                "infer_backend: vllm is not installed; on a CUDA machine run `pip install 'loralab[vllm]'`, "
                "or set infer_backend=huggingface"
            )
        import torch

        if not torch.cuda.is_available():
            raise LoralabError("infer_backend: vllm needs a CUDA GPU and this machine has none; set infer_backend=huggingface")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from loralab.models import resolve_model_path

        path, gguf = resolve_model_path(cfg.model_name_or_path)
        ranks = [_adapter_rank(p) for p in adapters.values()]
        self.llm = LLM(
            model=str(Path(path) / gguf) if gguf else path,
            tokenizer=path,
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed,
            enable_lora=bool(adapters),
            # vLLM only takes some ranks as max_lora_rank: the smallest allowed one that fits every adapter
            max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= max(ranks + [8])), max(ranks + [8])),
            max_loras=max(1, len(adapters)),
        )
        self.requests = {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(adapters.items())}
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)

    def generate(self, prompts: list[list[int]], settings: GenerationSettings, adapter: str | None,
                 on_text: OnText | None) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
            repetition_penalty=settings.repetition_penalty,
            seed=settings.seed,
            stop=list(settings.stop) or None,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], params,
            lora_request=self.requests.get(adapter) if adapter else None, use_tqdm=False,
        )
        results = []
        for i, (ids, out) in enumerate(zip(prompts, outputs)):
            choice = out.outputs[0]
            token_ids = [t for t in choice.token_ids if t not in self.stop_ids]
            reason = "length" if choice.finish_reason == "length" else "stop"
            if on_text is not None and choice.text:
                on_text(i, choice.text)
            results.append(Completion(choice.text, len(ids), len(token_ids), reason))
        return results


def _adapter_rank(path: str) -> int:
    import json

    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8))
    except (OSError, ValueError):
        return 8
