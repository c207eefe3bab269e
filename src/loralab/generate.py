"""The one generation engine: evaluation, chat, web chat and the API all generate through `Engine`.

The model, tokenizer and chat template come from `models.load_model_and_tokenizer`, so a prompt is
rendered exactly as in training. `Engine.generate` takes a list of conversations and returns one
`Completion` per conversation; `Engine.submit` queues one conversation for a caller that drives the
engine itself (the API's scheduler); `Engine.stream` yields one reply's text as it appears.

- continuous batching: requests wait in a queue and join the running batch at token boundaries;
  a row leaves as soon as it is finished (stop token, stop string, max_new_tokens, cancelled), so
  no row computes padding until the longest row of a batch ends. Each row keeps its KV cache rows
  in one batched cache, left-padded so one forward serves every row (position ids per row),
  with room for new tokens so a step does not copy the cache;
- greedy by default, and a row's greedy output is the same whether it ran alone, in a batch, or
  joined a batch mid-flight (fp32); sampling (temperature, top_p, top_k, repetition_penalty) per
  row, a seeded row with its own RNG, so its sample does not depend on its batch mates;
- adapters: with `merge=True` a single adapter is merged into the weights (predict/eval/chat: no
  LoRA work per token); unmerged adapters serve each row its own adapter or the base model in the
  same forward (peft's mixed-adapter batches, `adapter_names`);
- text is decoded only for rows that need it (streaming, stop strings), a few tokens at a time;
- `on_text(delta)` gets each row's new text; returning False, or `Request.cancel()` from any
  thread, makes the row leave at the next step.

Why not transformers' own continuous batching (`generate_batch`, paged cache): on this 2-core CPU
with one torch thread it ran 1.9-2.4x slower than plain batched `generate` on the same 8 SmolLM2
prompts (38.7 s vs 20.0 s and 61.6 s vs 26.2 s for 48 new tokens each, same greedy text), and it
has no way to give rows different peft adapters. The loop here is the model's own forward with a
KV cache (a DynamicLayer with spare room) whose rows are added and removed.

torch.compile of the forward (inductor, dynamic shapes: rows and cache length change every step)
was tried on this CPU and not kept: on a 16-record SmolLM2 predict it compiled for about 12 minutes
and then failed inside inductor, while the whole 100-record predict runs in about 3.5 minutes eager.

`infer_backend: vllm` runs the same interface on vLLM (CUDA only, optional extra `loralab[vllm]`);
`infer_backend: llamacpp` on llama.cpp (CPU, extra `loralab[llamacpp]`, `llamacpp_backend.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralab.admission import WaitingLine
from loralab.config import Config
from loralab.decode_batch import DecodeBatch, left_pad_rows, new_kv_cache
from loralab.errors import LoralabError
from loralab.models import default_adapters, peft_adapter_names
from loralab.sampling import choose_tokens
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
        """Refuse knobs no sampler can use, in one line each (NaN and infinity included)."""
        if self.max_new_tokens < 1:
            raise LoralabError(f"max_new_tokens: got {self.max_new_tokens}; expected a positive number")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LoralabError(f"{name}: got {getattr(self, name)}; expected a finite number")
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


class Request:
    """One conversation in the engine: prompt ids, settings, the tokens generated so far, and the result.

    `completion` (or `error`) is set and `done` is set when the row has left the batch. `cancel()` may
    be called from any thread: the row leaves at the next step.
    """

    def __init__(
        self,
        prompt: list[int],
        settings: GenerationSettings,
        adapter: str | None,
        on_text: Callable[[str], bool | None] | None = None,
        on_done: Callable[[Request], None] | None = None,
    ):
        self.prompt, self.settings, self.adapter = prompt, settings, adapter
        self.on_text, self.on_done = on_text, on_done
        self.tokens: list[int] = []  # generated so far (a stop token is not kept)
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancelled = False
        self.solo = False  # run alone (a retry after a batch failed)
        # Text is decoded only for rows that need it (streaming, stop strings), a few tokens at a time.
        self.watch_text = bool(settings.stop) or on_text is not None
        self.text = ""  # reply text decoded so far
        self.sent = ""  # the part of it already streamed
        self.stop_hit = False
        self.decoded_from = self.decoded_to = 0  # incremental detokenization window (token offsets)
        # A seeded sample has its own RNG (made on the model's device at its first sample, see
        # sampling.row_generator): it does not depend on the rows it shares a batch with.
        self.generator = None

    def cancel(self) -> None:
        self.cancelled = True

    def restart(self) -> None:
        """Forget what was generated (a failed batch is retried row by row)."""
        self.tokens, self.text, self.sent, self.stop_hit = [], "", "", False
        self.decoded_from = self.decoded_to = 0
        self.generator = None  # re-seeded at the next sample


def kv_cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in newer transformers 5.x releases,
    `past_key_values` in older ones such as 5.17 (which would silently ignore `cache=` and generate
    without the prompt's context)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class Engine:
    """Base model + tokenizer (+ adapters) and a continuous-batching, streaming `generate`.

    Requests wait in a queue; every `step` admits waiting requests into the running batch (up to
    `max_rows`), decodes one token for every row, and lets finished or cancelled rows leave.
    Whoever needs results drives steps (`generate`, `stream`'s thread, the API's scheduler): one
    thread at a time runs a step, and each step serves every caller's rows.
    """

    def __init__(self, cfg: Config, adapters: dict[str, str] | None = None, merge: bool = False, _loaded=None):
        """merge=True with exactly one adapter merges it into the weights (no LoRA work per token);
        the base model alone is then not servable, so keep merge=False when the base is compared too.
        (`_loaded`: (model, tokenizer) already in memory; use `Engine.from_model`.)"""
        self.cfg = cfg
        self.base_name = cfg.model_name_or_path
        if adapters is None:
            adapters = default_adapters(cfg)
        self.adapter_names = list(adapters)  # as users name them; the model knows them by _peft_name
        self._peft_name = peft_adapter_names(adapters)
        self.backend = cfg.infer_backend
        self.max_batch_size = cfg.infer_batch_size
        self.merged = False
        self._vllm = None
        self._vllm_lock = threading.Lock()
        self._llamacpp = None
        self._step_lock = threading.Lock()  # one step at a time: it owns the batch and the model
        self._waiting = WaitingLine()
        # A fast tokenizer must not be used by two threads at once (encoding may reconfigure it).
        self._tokenizer_lock = threading.Lock()
        self._batch = DecodeBatch()
        self._adapter_on = None  # adapter the PeftModel is set to (uniform batches); "" = disabled
        self.stats = {"steps": 0, "row_steps": 0, "largest_batch": 0, "cancelled": 0}
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
        elif cfg.infer_backend == "llamacpp":  # rows decode one at a time on llama.cpp (llamacpp_backend.py)
            from loralab.llamacpp_backend import LlamaCppBackend, check_installed, load_tokenizer

            check_installed()
            self.tokenizer = load_tokenizer(cfg)
            self.model = None
            self._llamacpp = LlamaCppBackend(cfg, adapters)
            self.tokenizer.model_max_length = self._llamacpp.n_ctx  # what the API checks prompts against
        else:
            from loralab.models import load_model_and_tokenizer

            self.model, self.tokenizer = _loaded or load_model_and_tokenizer(cfg, adapters)
            self._cache_argument = kv_cache_argument(self.model)
            if merge and len(adapters) == 1:
                self.model = self.model.merge_and_unload()
                self.merged = True
        self.tokenizer.padding_side = "left"
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_model(cls, cfg: Config, model, tokenizer, name: str = "model") -> Engine:
        """An engine around a model already in memory, e.g. the one being trained (generation-based
        validation): nothing is loaded, merged or copied, and the tokenizer is left as it was (the run
        saves it). A PeftModel's active adapter is served as `name` (generate with adapter=name); a plain
        model is the base (adapter=None). Always transformers: vLLM cannot share a model object."""
        peft_name = model.active_adapter if hasattr(model, "disable_adapter") else None
        padding_side = tokenizer.padding_side
        adapters = {name: "(in memory)"} if peft_name else {}
        engine = cls(cfg.model_copy(update={"infer_backend": "huggingface"}), adapters, _loaded=(model, tokenizer))
        tokenizer.padding_side = padding_side
        engine._peft_name = {name: peft_name} if peft_name else {}
        return engine

    @property
    def device(self):
        if self._llamacpp is not None:
            return "cpu"
        return self.model.device if self.model is not None else "cuda"

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation's prompt (configured default system prompt added when missing)."""
        with self._tokenizer_lock:
            return encode_prompt(self.tokenizer, with_default_system(messages, self.cfg.default_system))

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered prompt as text, special tokens included (what LLaMA-Factory writes as `prompt`)."""
        return self.tokenizer.decode(self.prompt_ids(messages), skip_special_tokens=False)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapter_names:
            loaded = ", ".join(self.adapter_names) or "none"
            raise LoralabError(f"adapter: {adapter!r} is not loaded (loaded: {loaded}; None = base model)")
        if adapter is None and self.merged:
            raise LoralabError(
                f"adapter: the base model is not available, adapter {self.adapter_names[0]!r} was "
                "merged into its weights (load the engine with merge=False to serve both)"
            )

    # --- the public entry points ---------------------------------------------------------------
    def generate(
        self,
        conversations: list[list[dict]],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        batch_size: int = 16,
        progress: bool = False,
        on_text: OnText | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[Completion]:
        """One Completion per conversation, in the input order. adapter=None is the base model.

        batch_size: at most this many rows decode together while this call drives the engine.
        prompt_token_ids: each conversation's prompt ids when the caller made them (predict cuts a prompt
        longer than cutoff_len as LLaMA-Factory does); the conversations are then not encoded here."""
        settings = settings or GenerationSettings()
        settings.check()
        self._check_adapter(adapter)
        if batch_size < 1:
            raise LoralabError(f"infer_batch_size: got {batch_size}; expected a positive number")
        prompts = prompt_token_ids if prompt_token_ids is not None else [self.prompt_ids(m) for m in conversations]
        if self._vllm is not None:
            with self._vllm_lock:
                return self._vllm.generate(prompts, settings, adapter, on_text)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="sample")
        requests = [
            Request(
                ids,
                settings,
                adapter,
                on_done=lambda _: bar.update(1),
                on_text=None if on_text is None else functools.partial(on_text, i),
            )
            for i, ids in enumerate(prompts)
        ]
        try:
            self._waiting.add(requests)
            self.run(requests, batch_size)
        finally:
            for r in requests:  # interrupted (Ctrl-C): nothing of this call stays in the engine
                r.cancel()
            bar.close()
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.completion for r in requests]  # type: ignore[misc]

    def submit(
        self,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        on_text: Callable[[str], bool | None] | None = None,
        on_done: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue one conversation; it joins the batch at the next step of whoever drives the engine.

        on_text(delta) gets the reply's new text as it appears (returning False cancels the row);
        on_done(request) is called once the row has left the batch (request.completion or .error).
        """
        settings = settings or GenerationSettings()
        settings.check()
        self._check_adapter(adapter)
        request = Request(self.prompt_ids(messages), settings, adapter, on_text, on_done)
        self._waiting.add([request])
        return request

    def run(self, requests: list[Request], max_rows: int | None = None) -> None:
        """Drive steps until every one of `requests` is done (other callers' rows progress too)."""
        for r in requests:
            while not r.done.is_set():
                self.step(max_rows)

    def busy(self) -> bool:
        """Whether any row is decoding or waiting."""
        return bool(self._batch.rows or self._waiting)

    def stream(
        self, messages: list[dict], settings: GenerationSettings | None = None, adapter: str | None = None
    ) -> Iterator[str]:
        """Text deltas of one reply as they are generated; closing the iterator cancels generation."""
        deltas: queue.Queue = queue.Queue()
        END = object()
        if self._vllm is not None:  # vLLM's offline API returns whole replies: one delta
            yield from (c.text for c in self.generate([messages], settings, adapter) if c.text)
            return
        # Errors in the arguments surface here, before the thread starts.
        request = self.submit(messages, settings, adapter, on_text=deltas.put, on_done=lambda _: deltas.put(END))
        # A thread drives the engine, so a Ctrl-C in the consumer never lands in the middle of a step.
        thread = threading.Thread(target=self.run, args=([request],), daemon=True)
        thread.start()
        try:
            while (item := deltas.get()) is not END:
                yield item
            if request.error is not None:
                raise request.error
        finally:
            request.cancel()
            thread.join()

    # --- one step ------------------------------------------------------------------------------
    def step(self, max_rows: int | None = None) -> None:
        """Admit waiting requests (up to max_rows rows in all), decode one token for every row, let
        finished and cancelled rows leave. A failing step fails only the rows it can no longer retry."""
        if self._llamacpp is not None:
            with self._step_lock:
                self._llamacpp.step(self)
            return
        import torch

        max_rows = max_rows or self.max_batch_size
        with self._step_lock, torch.inference_mode():
            batch = self._batch
            joining: list[Request] = []
            try:
                batch.keep([i for i, r in enumerate(batch.rows) if not (r.cancelled and self._finish(r, "cancelled"))])
                joining = self._waiting.admit(batch.rows, max_rows, lambda r: self._finish(r, "cancelled"))
                if joining:
                    self._prefill(joining)
                    joining = []
                if batch.rows:
                    self._decode()
            except BaseException as e:
                self._fail(batch.rows + joining, e)
                if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
                    raise

    def _prefill(self, rows: list[Request]) -> None:
        """The joining rows' prompts in one left-padded forward; their first tokens; into the batch."""
        import torch

        ids, mask = left_pad_rows([r.prompt for r in rows], self._pad_id, self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = new_kv_cache()
        logits = self._forward(rows, ids, mask, positions, cache)
        tokens = self._choose(rows, logits)
        keep = [i for i, (r, t) in enumerate(zip(rows, tokens)) if not self._accept(r, t)]
        if keep:
            index = torch.tensor(keep, device=self.device)
            next_ids = torch.tensor([[tokens[i]] for i in keep], dtype=torch.long, device=self.device)
            cache.batch_select_indices(index)
            self._batch.add([rows[i] for i in keep], cache, mask[index], next_ids)

    def _decode(self) -> None:
        import torch

        batch = self._batch
        n = len(batch.rows)
        self.stats["steps"] += 1
        self.stats["row_steps"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        logits = self._forward(batch.rows, batch.next_ids, batch.decode_mask(), batch.positions[:, None], batch.cache)
        tokens = self._choose(batch.rows, logits)
        fed = [self._pad_id if t is None else t for t in tokens]  # a failed row leaves below; it feeds nothing
        batch.advance(torch.tensor(fed, dtype=torch.long, device=self.device)[:, None])
        batch.keep([i for i, (r, t) in enumerate(zip(batch.rows, tokens)) if not self._accept(r, t)])

    def _forward(self, rows: list[Request], ids, mask, positions, cache):
        """Last-position logits of one forward; each row with its own adapter (or the base model)."""
        kwargs = {}
        if hasattr(self.model, "disable_adapter"):  # an unmerged PeftModel
            adapters = {r.adapter for r in rows}
            if len(adapters) == 1:  # the usual case: plain forward, adapter switched only when it changes
                self._use_adapter(next(iter(adapters)))
            else:  # peft's mixed-adapter batch: each LoRA layer applies each row's adapter to its rows
                self._use_adapter(next(a for a in adapters if a is not None))  # adapter layers enabled
                kwargs["adapter_names"] = [self._peft_name[r.adapter] if r.adapter else "__base__" for r in rows]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _use_adapter(self, adapter: str | None) -> None:
        want = adapter or ""
        if self._adapter_on == want:
            return
        if adapter is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(self._peft_name[adapter])
        self._adapter_on = want

    def _choose(self, rows: list[Request], logits) -> list[int | None]:
        """The next token of every row; None for a row whose sampling failed (it fails alone, now)."""
        tokens, failed = choose_tokens(rows, logits)
        for i, error in failed.items():
            self._fail_row(rows[i], error)
            tokens[i] = None
        return tokens

    # --- per-row bookkeeping -------------------------------------------------------------------
    def _accept(self, r: Request, token: int | None) -> bool:
        """Record a row's new token; True when the row is done (finished, or failed: token None)."""
        if token is None:
            return True
        if token in self.stop_ids:
            return self._finish(r, "stop")
        r.tokens.append(token)
        if r.watch_text:
            self._new_text(r)
            if r.stop_hit:
                return self._finish(r, "stop")
            if r.cancelled:
                return self._finish(r, "cancelled")
        if len(r.tokens) >= r.settings.max_new_tokens:
            return self._finish(r, "length")
        return False

    def _decode_ids(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self, r: Request) -> None:
        """Decode the row's newest tokens, look for stop strings in the new text, stream what is safe.

        Only a window of recent tokens is decoded (its text minus the text of the tokens already
        shown), so the cost per step does not grow with the reply; a window ending in half a
        character (U+FFFD) waits for the next token.
        """
        stops = r.settings.stop
        seen = self._decode_ids(r.tokens[r.decoded_from : r.decoded_to])
        window = self._decode_ids(r.tokens[r.decoded_from :])
        if len(window) <= len(seen) or window.endswith("\ufffd"):
            return
        delta = window[len(seen) :]
        r.decoded_from, r.decoded_to = r.decoded_to, len(r.tokens)
        r.text += delta
        if stops:
            tail = r.text[max(0, len(r.text) - len(delta) - max(map(len, stops)) + 1) :]
            if _find_stop(tail, stops) >= 0:
                r.stop_hit = True
                return
        if r.on_text is not None:
            ready = r.text[: len(r.text) - _holdback(r.text, stops)]
            if len(ready) > len(r.sent):
                delta, r.sent = ready[len(r.sent) :], ready
                if r.on_text(delta) is False:
                    r.cancel()

    def _finish(self, r: Request, reason: str) -> bool:
        """The row's Completion (text decoded once, in full); streams what is still held back."""
        text = self._decode_ids(r.tokens)
        if reason != "cancelled":
            cut = _find_stop(text, r.settings.stop)  # also a stop string completed by the very last token
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if r.on_text is not None and len(text) > len(r.sent) and text.startswith(r.sent):
                r.on_text(text[len(r.sent) :])
        else:
            self.stats["cancelled"] += 1
        r.completion = Completion(
            text=text, prompt_tokens=len(r.prompt), completion_tokens=len(r.tokens), finish_reason=reason
        )
        self._done(r)
        return True

    def _done(self, r: Request) -> None:
        r.done.set()
        if r.on_done is not None:
            r.on_done(r)

    def _fail_row(self, r: Request, error: BaseException) -> None:
        """One row cannot go on (e.g. its sampling knobs give no distribution): it alone gets the error."""
        log.warning("generation failed for one request: %s: %s", type(error).__name__, error)
        r.error = error
        self._done(r)

    def _fail(self, rows: list[Request], error: BaseException) -> None:
        """A step failed: the batch is dropped. When several rows shared it, those that have not
        streamed anything yet start over one by one (so only a request that breaks fails); the
        others get the error."""
        self._batch = DecodeBatch()
        self._adapter_on = None
        rows = [r for r in rows if not r.done.is_set()]  # rows that already failed alone stay failed
        retry = [r for r in rows if len(rows) > 1 and not r.sent and isinstance(error, Exception)]
        for r in rows:
            if r in retry:
                r.restart()
                r.solo = True
            else:
                log.warning("generation failed: %s: %s", type(error).__name__, error)
                r.error = error
                self._done(r)
        if retry:
            log.warning("a batch of %d rows failed (%s); retrying them one by one", len(rows), error)
            self._waiting.put_first(retry)


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
            raise LoralabError(
                "infer_backend: vllm needs a CUDA GPU and this machine has none; set infer_backend=huggingface"
            )
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

    def generate(
        self, prompts: list[list[int]], settings: GenerationSettings, adapter: str | None, on_text: OnText | None
    ) -> list[Completion]:
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
            [{"prompt_token_ids": ids} for ids in prompts],
            params,
            lora_request=self.requests.get(adapter) if adapter else None,
            use_tqdm=False,
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
