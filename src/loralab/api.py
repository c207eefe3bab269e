"""`loralab api`: an OpenAI-compatible chat server over the one generation engine.

The official `openai` client works with it unchanged (base_url=http://127.0.0.1:8000/v1):

- GET  /v1/models             every servable id: the base model and each loaded adapter
- POST /v1/chat/completions   `model` picks the base model or an adapter, per request; `stream: true`
                              answers with server-sent events in OpenAI's chunk format
- GET  /health                readiness (no key needed)

How requests share one model: a single scheduler thread owns the engine (continuous batching). A
new request joins the running batch at the next token, a finished reply leaves it at once, and
requests for different adapters (or the base model) and sampling settings decode in the same
batch. Text deltas travel from the engine's `on_text` callback to each request's asyncio queue
(`loop.call_soon_threadsafe`); a client that disconnects flips its job's `cancelled` flag and the
scheduler cancels its row before the next step.

Security: binds 127.0.0.1 unless told otherwise; with an API key set, every /v1 request needs
`Authorization: Bearer <key>` (compared with hmac.compare_digest). Client mistakes are 4xx with
OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`, never a 500.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralab.config import Config
from loralab.errors import LoralabError
from loralab.generate import Completion, Engine, GenerationSettings
from loralab.generate import Request as EngineRequest
from loralab.templates import encode_prompt, with_default_system

log = logging.getLogger(__name__)


# --- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request body --------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions that loralab honours; any other field is a 400."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral values, so clients that always send them keep working.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None


SUPPORTED_FIELDS = ", ".join(ChatRequest.model_fields)


def parse_request(raw: bytes) -> ChatRequest:
    """Request bytes -> ChatRequest, or an APIError(400) naming the field and what is expected."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise describe_invalid(e) from None
    if req.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported, got {req.n}", param="n", code="unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(400, f"{name}: not supported (only 0), got {getattr(req, name)}", param=name,
                           code="unsupported_value")
    if req.logprobs:
        raise APIError(400, "logprobs: not supported", param="logprobs", code="unsupported_value")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: expected up to 4 non-empty strings", param="stop")
    return req


def describe_invalid(err: ValidationError) -> APIError:
    # The deepest error is the most specific one (content: not a string, and its part 0 has a bad type).
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    # Union types add the member tried to the path (content -> str / list[TextPart]); name the field.
    loc = [p for p in first["loc"] if not (isinstance(p, str) and (p == "str" or p.startswith("list[")))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unsupported field `{param}` (supported: {SUPPORTED_FIELDS})", param=param,
                        code="unsupported_parameter")
    if first["type"] == "missing":
        return APIError(400, f"{param}: required field is missing", param=param, code="missing_required_parameter")
    return APIError(400, f"{param}: {first['msg']}, got {first.get('input')!r}"[:500], param=param,
                    code="invalid_value")


def to_messages(req: ChatRequest) -> list[dict]:
    """Request messages -> loralab conversations ({"role", "content": str})."""
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def settings_for(req: ChatRequest, defaults: GenerationSettings, max_new_tokens: int) -> GenerationSettings:
    """The request's sampling knobs on top of the server's defaults (from the config).

    temperature 0 means greedy; a positive temperature (or top_p < 1) turns sampling on.
    """
    do_sample = defaults.do_sample or (req.temperature or 0) > 0 or (req.top_p is not None and req.top_p < 1)
    if req.temperature == 0:
        do_sample = False
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return replace(
        defaults,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=req.temperature if req.temperature else defaults.temperature,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        seed=req.seed,
        stop=stops,
    )


def context_length(engine: Engine) -> int | None:
    """Maximum sequence length of the served model (prompt + reply), when known."""
    if engine.model is not None:
        n = getattr(engine.model.config, "max_position_embeddings", None)
        if n:
            return int(n)
    n = getattr(engine.tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**8 else None


# --- scheduler -----------------------------------------------------------------------------------
@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request on its way through the scheduler; events go to `events` on the server's loop."""

    messages: list[dict]
    settings: GenerationSettings
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    streaming: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    request: EngineRequest | None = None  # the engine's row, once the scheduler has submitted the job

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True


class Scheduler:
    """One thread that owns the engine: it hands new requests to the engine and drives its steps.

    Continuous batching: a request joins the running batch at the next token (no waiting for the
    current replies to end), a finished row leaves at once, and requests for different adapters
    (or the base model) and with different sampling settings share the batch (each row its own
    adapter and knobs). A job whose client went away (`cancelled`) has its row cancelled before
    the next step, so it stops within one step.
    """

    def __init__(self, engine: Engine, max_batch_size: int = 16):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.running: set[Job] = set()  # submitted to the engine, not done yet
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="loralab-scheduler", daemon=True)
        self.rows = 0  # counters for /health and the benchmark
        self.cancelled = 0  # requests stopped because their client went away

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def _take(self, timeout: float | None) -> bool:
        """Hand one job from the inbox to the engine (timeout 0: only if one is waiting). False if none came."""
        try:
            job = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return False
        if job is None:
            self.stopping = True
            return False
        if job.cancelled:
            return True

        def on_text(delta: str) -> bool:
            if job.cancelled:
                return False
            job.push("delta", delta)
            return True

        def on_done(request: EngineRequest) -> None:
            self.running.discard(job)
            if request.error is not None:
                job.push("error", request.error)
                return
            self.cancelled += request.completion.finish_reason == "cancelled"
            job.push("done", request.completion)

        try:
            job.request = self.engine.submit(job.messages, job.settings, job.adapter,
                                             on_text=on_text if job.streaming else None, on_done=on_done)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that refuses the conversation
            job.push("error", e)
            return True
        self.running.add(job)
        self.rows += 1
        return True

    def _loop(self) -> None:
        while not self.stopping:
            if not self.running:
                self._take(timeout=None)  # sleep until work arrives
            while self._take(timeout=0):  # everything waiting joins at this token boundary
                pass
            for job in self.running:
                if job.cancelled:
                    job.request.cancel()
            if self.running and not self.stopping:
                self.engine.step(self.max_batch_size)  # a failing step reaches its jobs through on_done


# --- the app -------------------------------------------------------------------------------------
def _chunk(base: dict, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> str:
    """One chat.completion.chunk event; with stream_options.include_usage every chunk has usage: null."""
    body = dict(base, object="chat.completion.chunk",
                choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
    if with_usage:
        body["usage"] = None
    return sse(body)


def sse(body: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def usage_of(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def _server_error(e: BaseException) -> APIError:
    if isinstance(e, LoralabError):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}"[:500], type="server_error",
                    code="generation_failed")


def create_app(engine: Engine, api_key: str | None = None, max_batch_size: int = 16):
    """The FastAPI app serving `engine`; the scheduler thread runs while the app is up."""
    if max_batch_size < 1:
        raise LoralabError(f"--max-batch-size: got {max_batch_size}; expected a positive number")
    models = [engine.base_name, *engine.adapter_names]
    if len(set(models)) != len(models):
        raise LoralabError(f"adapters: names must differ from each other and from the base model id, got {models}")
    adapter_of = {engine.base_name: None} | {name: name for name in engine.adapter_names}
    max_context = context_length(engine)
    # The scheduler thread tokenizes inside the engine; requests are checked on the event loop with a
    # private copy, because one fast tokenizer must not be used by two threads at once.
    check_tokenizer = copy.deepcopy(engine.tokenizer)
    defaults = replace(GenerationSettings.from_config(engine.cfg), seed=None)
    created = int(time.time())
    scheduler = Scheduler(engine, max_batch_size)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="loralab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:500]).body(), status_code=400)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        alive = scheduler.thread.is_alive()
        stats = engine.stats  # steps: decoding steps; row_steps / steps: mean rows per step
        body = {"status": "ok" if alive else "scheduler stopped", "models": models, "requests": scheduler.rows,
                "steps": stats["steps"], "row_steps": stats["row_steps"], "largest_batch": stats["largest_batch"],
                "cancelled": scheduler.cancelled}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": created, "owned_by": "loralab"} for m in models]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def get_model(model_id: str):
        if model_id not in adapter_of:
            raise APIError(404, f"model: unknown model {model_id!r}; available: {', '.join(models)}",
                           param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "loralab"}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        if req.model not in adapter_of:
            raise APIError(404, f"model: unknown model {req.model!r}; available: {', '.join(models)}",
                           param="model", code="model_not_found")
        messages = to_messages(req)
        n_prompt = len(encode_prompt(check_tokenizer, with_default_system(messages, engine.cfg.default_system)))
        asked = req.max_completion_tokens or req.max_tokens
        max_new = asked or defaults.max_new_tokens
        if max_context:
            if n_prompt >= max_context:
                raise APIError(400, f"messages: the prompt has {n_prompt} tokens, but the model's context is "
                               f"{max_context} tokens; shorten the conversation", param="messages",
                               code="context_length_exceeded")
            if asked and n_prompt + asked > max_context:
                raise APIError(400, f"max_tokens: prompt ({n_prompt} tokens) + max_tokens ({asked}) exceeds the "
                               f"model's context of {max_context} tokens", param="max_tokens",
                               code="context_length_exceeded")
            max_new = min(max_new, max_context - n_prompt)  # the default shrinks to what fits
        settings = settings_for(req, defaults, max_new)
        try:
            settings.check()
        except LoralabError as e:
            raise APIError(400, str(e)) from None
        job = Job(messages, settings, adapter_of[req.model], asyncio.get_running_loop(), streaming=req.stream)
        scheduler.submit(job)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(job, base, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(job, base, request)

    async def stream_events(job: Job, base: dict, include_usage: bool):
        try:
            yield _chunk(base, {"role": "assistant", "content": ""}, with_usage=include_usage)
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield _chunk(base, {"content": value}, with_usage=include_usage)
                elif kind == "done":
                    yield _chunk(base, {}, finish_reason=_finish(value), with_usage=include_usage)
                    if include_usage:
                        yield sse(dict(base, object="chat.completion.chunk", choices=[], usage=usage_of(value)))
                    yield sse("[DONE]")
                    return
                else:  # the headers are sent already: report the error in the stream, as OpenAI does
                    yield sse(_server_error(value).body())
                    return
        finally:
            job.cancelled = True  # done, or the client went away: either way the row can stop

    async def collect(job: Job, base: dict, request: Request):
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    return dict(base, object="chat.completion", usage=usage_of(value), choices=[{
                        "index": 0, "message": {"role": "assistant", "content": value.text},
                        "logprobs": None, "finish_reason": _finish(value)}])
                if kind == "error":
                    raise _server_error(value)
        finally:
            job.cancelled = True

    return app


def resolve_host_port(cfg: Config, host: str | None, port: int | None) -> tuple[str, int]:
    """Flag, else API_HOST / API_PORT (as in LLaMA-Factory), else the config (127.0.0.1:8000)."""
    host = host or os.environ.get("API_HOST") or cfg.api_host
    raw_port = port if port is not None else os.environ.get("API_PORT") or cfg.api_port
    try:
        port = int(raw_port)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise LoralabError(f"API_PORT: expected a port number 1-65535, got {raw_port!r}") from None
    return host, port


def parse_adapter_flags(flags: list[str] | None) -> dict[str, str]:
    """['tuned=runs/a/adapter', ...] -> {'tuned': 'runs/a/adapter'}."""
    out = {}
    for flag in flags or []:
        name, sep, path = flag.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LoralabError(f"--adapter: expected NAME=PATH, got {flag!r}")
        out[name.strip()] = path.strip()
    return out


def serve(cfg: Config, host: str | None = None, port: int | None = None, api_key: str | None = None,
          max_batch_size: int = 16) -> None:
    """Load the model and adapters once, then serve until Ctrl-C."""
    import uvicorn

    host, port = resolve_host_port(cfg, host, port)
    api_key = api_key or os.environ.get("API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    engine = Engine(cfg)
    app = create_app(engine, api_key=api_key, max_batch_size=max_batch_size)
    log.info("serving %s on http://%s:%d/v1 (models: %s)", cfg.model_name_or_path, host, port,
             ", ".join([engine.base_name, *engine.adapter_names]))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
