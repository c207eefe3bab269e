"""`loralab api`: an OpenAI-compatible chat server over the one generation engine.

The official `openai` client works with it unchanged (base_url=http://127.0.0.1:8000/v1):

- GET  /v1/models             every servable id: the base model and each loaded adapter
- POST /v1/chat/completions   `model` picks the base model or an adapter, per request; `stream: true`
                              answers with server-sent events in OpenAI's chunk format
- GET  /health                readiness and counters (no key needed, no model paths)

Function calling: a request's `tools`, assistant `tool_calls` and `tool` results become the system
message's tools, function and observation turns that training data with tools has (data.py), so they
render through the same template path; a reply the tool format reads as calls of the request's tools
(templates.parse_tool_calls) is answered as `tool_calls`.

How a request travels: FastAPI validates the body into `ChatRequest` (strict types: `"stream": "yes"`
is an error, not true); the prompt is rendered and counted in the threadpool, never on the event
loop; then a `scheduler.Job` goes to the one scheduler thread that owns the engine (continuous
batching, see `scheduler.py`): a new request joins the running batch at the next token, a finished
reply leaves it at once, and requests for different adapters (or the base model) and sampling
settings decode in the same batch. A client that disconnects (streaming or not) cancels its job, and
its row stops within one decoding step.

Limits: the request body is capped (`max_request_bytes`, default 1 MB; Content-Length is checked
before anything is read, and the bytes of a chunked body are counted as they arrive); a prompt
longer than the model's context is refused, naming both lengths.

Security: binds 127.0.0.1 unless told otherwise; with an API key set, every /v1 request needs
`Authorization: Bearer <key>` (compared with hmac.compare_digest).

Errors: every client mistake is a 4xx with OpenAI's error JSON `{"error": {"message", "type",
"param", "code"}}`; anything else is a 500 in the same shape whose message carries a request id
that the server log names next to the traceback.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralab.config import Config
from loralab.data import TOOL_RESULTS_JOIN
from loralab.errors import LoralabError
from loralab.generate import Completion, Engine, GenerationSettings
from loralab.scheduler import Job, Scheduler
from loralab.templates import (
    check_tools,
    encode_text,
    loads_json,
    parse_tool_calls,
    render,
    with_default_system,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1_000_000  # 1 MB: hundreds of pages of chat history
# Sampling below these is greedy decoding in all but name, and numerically fragile (logits / 1e-40 overflow):
# a client that means "deterministic" sends temperature 0.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-3
# Connections: the time a client may take to send its headers, then its body (slow clients hold a socket and
# a task each), how many connections at once, and how long a shutdown waits for replies in flight.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 1000
SHUTDOWN_TIMEOUT_S = 30
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_SPARE_TOKENIZERS = 8  # copies kept for prompt checks (~7 MB each for SmolLM2's); more are made when needed


# --- errors: the one formatter -------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> Response:
        # ASCII JSON: a message may quote client text, and escaped text can never fail to encode.
        return Response(
            json.dumps(self.body()), status_code=self.status, media_type="application/json", headers=headers
        )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def describe_invalid(errors: list[dict]) -> APIError:
    """Pydantic/FastAPI validation errors of a request body -> one 400 naming the field and what is expected."""
    # The deepest error is the most specific one (content: not a string, and its part 0 has a bad type).
    first = max(errors, key=lambda e: len(e["loc"]))
    loc = list(first["loc"])
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if first["type"] == "json_invalid":
        return APIError(
            400,
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')} "
            f"at character {loc[0] if loc else '?'}",
            code="invalid_json",
        )
    # Union types add the member tried to the path (content -> str / list[...]); name the field.
    loc = [p for p in loc if not (isinstance(p, str) and (p == "str" or p.startswith(("list[", "function-"))))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if param is None:
        what = "is empty" if first["type"] == "missing" else f"is a {type(first.get('input')).__name__}"
        return APIError(
            400,
            f"request body {what}; expected a JSON object with `model` and `messages` (Content-Type: application/json)",
            code="invalid_json",
        )
    if first["type"] == "extra_forbidden":
        return APIError(
            400,
            f"unsupported field `{param}` (supported: {SUPPORTED_FIELDS})",
            param=param,
            code="unsupported_parameter",
        )
    if first["type"] == "missing":
        return APIError(400, f"{param}: required field is missing", param=param, code="missing_required_parameter")
    code = "unsupported_value" if first["type"] == "unsupported_value" else "invalid_value"
    if first["type"] in SELF_DESCRIBING:  # the message quotes the offending part itself
        return APIError(400, f"{param}: {first['msg']}", param=param, code=code)
    return APIError(400, f"{param}: {first['msg']}, got {_short(first.get('input'))}", param=param, code=code)


SELF_DESCRIBING = {"invalid_tools"}


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", message)


# --- request body --------------------------------------------------------------------------------
def valid_text(text: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); they are not text and no tokenizer can encode them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "invalid_text", "contains a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_text)]
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class FunctionDef(BaseModel):
    model_config = STRICT
    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, written into the prompt as the tool format does
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


def json_object_text(text: str) -> str:
    try:
        ok = isinstance(loads_json(text, "arguments"), dict)
    except LoralabError as e:
        raise PydanticCustomError(
            "invalid_arguments", "expected a JSON object as a string ({why})", {"why": str(e)}
        ) from None
    if not ok:
        raise PydanticCustomError("invalid_arguments", "expected a JSON object as a string")
    return text


class CalledFunction(BaseModel):
    model_config = STRICT
    name: Text
    arguments: Annotated[Text, AfterValidator(json_object_text)]  # OpenAI sends the arguments as a JSON string


class ToolCall(BaseModel):
    model_config = STRICT
    id: Text
    type: Literal["function"]
    function: CalledFunction


class Message(BaseModel):
    model_config = STRICT
    # "developer" is what newer OpenAI clients send instead of "system"; "tool" carries a tool's result.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)  # (before content: content may then be null)
    content: Text | list[TextPart] | None = Field(None, validate_default=True)
    name: Text | None = None
    tool_call_id: Text | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_the_assistant(cls, calls: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if calls is not None and info.data.get("role") != "assistant":
            raise unsupported("only assistant messages carry tool_calls")
        return calls

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, content, info: ValidationInfo):
        if content is None and not info.data.get("tool_calls"):
            raise PydanticCustomError("missing", "Field required")
        return content


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions that loralab honours; any other field is a 400.

    Strict types, as OpenAI's API: a string is not a number and "yes" is not true.
    """

    model_config = STRICT
    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Accepted only at their neutral values, so clients that always send them keep working.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    # Function calling: tool definitions are written into the prompt in the template's tool format (as in
    # training), and a reply that calls tools comes back as `tool_calls`.
    tools: list[ToolDef] | None = Field(None, min_length=1)
    tool_choice: Text | dict | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _tool_results_answer_calls(cls, messages: list[Message]) -> list[Message]:
        for i, m in enumerate(messages):
            before = messages[i - 1] if i else None
            if m.role == "tool" and not (before and (before.tool_calls or before.role == "tool")):
                raise PydanticCustomError(
                    "invalid_conversation",
                    "a `tool` message (messages[{i}]) must follow an assistant message with tool_calls",
                    {"i": i},
                )
        return messages

    @field_validator("tool_choice")
    @classmethod
    def _auto_or_none(cls, choice: str | dict | None, info: ValidationInfo) -> str | None:
        if choice is not None and not info.data.get("tools"):
            raise unsupported("only allowed when tools are given")
        if choice not in (None, "auto", "none"):
            raise unsupported("only 'auto' and 'none' are supported (the model decides whether to call a tool)")
        return choice

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampling(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise PydanticCustomError(
                "invalid_temperature",
                "expected 0 (greedy) or {low}-2; a smaller temperature is greedy decoding: send 0",
                {"low": MIN_TEMPERATURE},
            )
        return value

    @field_validator("top_p")
    @classmethod
    def _enough_mass(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_TOP_P:
            raise PydanticCustomError(
                "invalid_top_p",
                "expected {low}-1; a smaller top_p keeps only the most likely token: send temperature 0",
                {"low": MIN_TOP_P},
            )
        return value

    @field_validator("tools")
    @classmethod
    def _writable_tools(cls, tools: list[ToolDef] | None) -> list[ToolDef] | None:
        try:
            check_tools([t.model_dump(exclude_none=True) for t in tools or []])
        except LoralabError as e:  # the message names the place, e.g. tools[0].function.parameters.properties.x
            raise PydanticCustomError("invalid_tools", "{why}", {"why": str(e)}) from None
        return tools

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise unsupported("only n=1 is supported")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            raise unsupported("not supported (only 0)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise PydanticCustomError("invalid_stop", "expected up to 4 non-empty strings")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise unsupported("only allowed with stream=true")
        return value


SUPPORTED_FIELDS = ", ".join(ChatRequest.model_fields)


def to_messages(req: ChatRequest) -> list[dict]:
    """Request messages -> loralab conversations, in the roles training data has (data.py): an assistant's
    tool calls are a `function` turn ({"name", "arguments"} JSON), tool results an `observation` turn, and
    the tool definitions ride on the system message, for templates.render to write in the tool format."""
    out: list[dict] = []
    for m in req.messages:
        if m.tool_calls:  # any text beside the calls is dropped, as LLaMA-Factory's API does
            calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in m.tool_calls]
            out.append({"role": "function", "content": json.dumps(calls, ensure_ascii=False)})
            continue
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
        if role == "observation" and out and out[-1]["role"] == "observation":
            out[-1]["content"] += TOOL_RESULTS_JOIN + content
            continue
        out.append({"role": role, "content": content})
    if req.tools:
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "tools": tools}
        else:
            out.insert(0, {"role": "system", "content": "", "tools": tools})
    return out


def check_sampling(settings: GenerationSettings, source: str = "config") -> None:
    """A config's sampling knobs, before the model loads: values the sampler cannot work with are a one-line
    error (the API's limits; a temperature of 1e-40 overflows the logits)."""
    try:
        settings.check()
    except LoralabError as e:
        raise LoralabError(f"{source}: {e}") from None
    if settings.do_sample and settings.temperature < MIN_TEMPERATURE:
        raise LoralabError(
            f"{source}: temperature: got {settings.temperature}; expected {MIN_TEMPERATURE}-2 when sampling "
            "(do_sample=false decodes greedily)"
        )
    if settings.do_sample and settings.top_p < MIN_TOP_P:
        raise LoralabError(f"{source}: top_p: got {settings.top_p}; expected {MIN_TOP_P}-1 when sampling")


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


def longest_token_chars(tokenizer) -> int:
    """The most characters of text one token can stand for (byte-level and SentencePiece vocabularies write
    each byte or character of a token's text as at least one character of its vocabulary entry)."""
    return max(1, *(len(t) for t in tokenizer.get_vocab()))


def served_models(engine: Engine) -> list[str]:
    """Model ids a request may name: the base model, then each adapter."""
    models = [engine.base_name, *engine.adapter_names]
    if len(set(models)) != len(models):
        raise LoralabError(f"adapters: names must differ from each other and from the base model id, got {models}")
    return models


# --- what the routes share: built in the lifespan, kept on app.state -----------------------------
@dataclass
class Serving:
    """The served engine, its scheduler and what every request is checked against."""

    engine: Engine
    scheduler: Scheduler
    api_key: str | None
    models: list[str]
    max_context: int | None
    defaults: GenerationSettings
    created: int = field(default_factory=lambda: int(time.time()))
    # The scheduler thread tokenizes inside the engine; requests are checked in the threadpool, each with a
    # tokenizer copy of its own from this pool (one fast tokenizer must not be used by two threads at once,
    # and one shared copy behind a lock made every request wait for the slowest prompt before it).
    spare_tokenizers: list = field(default_factory=list)
    pristine_tokenizer: Any = None  # renders every prompt; never encodes (the pool's copies are made from it)
    pool_lock: threading.Lock = field(default_factory=threading.Lock)
    # The most characters one token of the vocabulary stands for: a prompt longer than max_context times
    # this cannot fit, and is refused without being tokenized.
    max_token_chars: int = 64

    def adapter_of(self, model: str) -> str | None:
        if model not in self.models:
            raise APIError(
                404,
                f"model: unknown model {_short(model)}; available: {', '.join(self.models)}",
                param="model",
                code="model_not_found",
            )
        return None if model == self.engine.base_name else model

    def prompt_tokens(self, messages: list[dict]) -> int:
        """Tokens of the rendered prompt (runs in the threadpool: rendering can take a while).

        Rendering only reads the chat template, so every request renders with the one pristine tokenizer at
        once; a prompt too long for the context by its characters alone is refused then, before tokenizing
        (the tokenizer's time grows with the text). Only the encoding needs a tokenizer copy of its own.
        """
        try:
            text = render(self.pristine_tokenizer, with_default_system(messages, self.engine.cfg.default_system), True)
        except LoralabError as e:  # the chat template refused the conversation
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_conversation") from None
        if self.max_context and len(text) > self.max_context * self.max_token_chars:
            raise APIError(
                400,
                f"messages: the prompt has {len(text)} characters, more than the model's context of "
                f"{self.max_context} tokens can hold; shorten the conversation",
                param="messages",
                code="context_length_exceeded",
            )
        with self.pool_lock:
            tokenizer = self.spare_tokenizers.pop() if self.spare_tokenizers else None
        if tokenizer is None:  # all in use: one more (copying only reads the pristine one)
            tokenizer = copy.deepcopy(self.pristine_tokenizer)
        try:
            return len(encode_text(tokenizer, text))
        finally:
            with self.pool_lock:
                if len(self.spare_tokenizers) < MAX_SPARE_TOKENIZERS:
                    self.spare_tokenizers.append(tokenizer)


@dataclass
class ServerOptions:
    api_key: str | None = None
    max_batch_size: int = 16
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the scheduler thread with the server and stop it on shutdown."""
    engine, options = app.state.engine, app.state.options
    serving = Serving(
        engine=engine,
        scheduler=Scheduler(engine, options.max_batch_size),
        api_key=options.api_key,
        models=served_models(engine),
        max_context=context_length(engine),
        defaults=replace(GenerationSettings.from_config(engine.cfg), seed=None),
        spare_tokenizers=[copy.deepcopy(engine.tokenizer)],
        pristine_tokenizer=copy.deepcopy(engine.tokenizer),
        max_token_chars=longest_token_chars(engine.tokenizer),
    )
    app.state.serving = serving
    serving.scheduler.start()
    try:
        yield
    finally:
        serving.scheduler.stop()


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
bearer = HTTPBearer(auto_error=False)


def require_api_key(
    serving: ServingDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if not serving.api_key:
        return
    given = credentials.credentials.strip() if credentials else ""
    if not hmac.compare_digest(given.encode(), serving.api_key.encode()):
        raise APIError(
            401, "invalid or missing API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
        )


# --- routes --------------------------------------------------------------------------------------
router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/health")
async def health(serving: ServingDep):
    s, stats = serving.scheduler, serving.engine.stats
    alive = s.is_alive()
    body = {
        "status": "ok" if alive else "scheduler stopped",
        "served_models": len(serving.models),
        "requests": s.rows,
        "steps": stats["steps"],
        "row_steps": stats["row_steps"],
        "largest_batch": stats["largest_batch"],
        "cancelled": s.cancelled,
    }
    return JSONResponse(body, status_code=200 if alive else 503)


def _model_card(serving: Serving, model: str) -> dict:
    return {"id": model, "object": "model", "created": serving.created, "owned_by": "loralab"}


@v1.get("/models")
async def list_models(serving: ServingDep):
    return {"object": "list", "data": [_model_card(serving, m) for m in serving.models]}


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, serving: ServingDep):
    serving.adapter_of(model_id)  # 404 for an unknown id
    return _model_card(serving, model_id)


@v1.post("/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, serving: ServingDep):
    adapter = serving.adapter_of(req.model)
    messages = to_messages(req)
    n_prompt = await run_in_threadpool(serving.prompt_tokens, messages)
    asked = req.max_completion_tokens or req.max_tokens
    max_new = asked or serving.defaults.max_new_tokens
    limit = serving.max_context
    if limit:
        if n_prompt >= limit:
            raise APIError(
                400,
                f"messages: the prompt has {n_prompt} tokens, but the model's context is {limit} "
                "tokens; shorten the conversation",
                param="messages",
                code="context_length_exceeded",
            )
        if asked and n_prompt + asked > limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"{param}: prompt ({n_prompt} tokens) + {param} ({asked}) exceeds the model's "
                f"context of {limit} tokens",
                param=param,
                code="context_length_exceeded",
            )
        max_new = min(max_new, limit - n_prompt)  # the default shrinks to what fits
    settings = settings_for(req, serving.defaults, max_new)
    try:
        settings.check()
    except LoralabError as e:
        raise APIError(400, str(e)) from None
    request_id = uuid.uuid4().hex[:24]
    # With tools, whether the reply is a call or an answer is known only at its end: it streams as one piece.
    tool_format = getattr(serving.engine.tokenizer, "loralab_tool_format", None)
    answer = Answer(req, tool_format)
    job = Job(
        messages,
        settings,
        adapter,
        asyncio.get_running_loop(),
        streaming=bool(req.stream) and not answer.may_call_tools,
        request_id=request_id,
    )
    serving.scheduler.submit(job)
    base = {"id": f"chatcmpl-{request_id}", "created": int(time.time()), "model": req.model, "system_fingerprint": None}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # Starlette cancels this generator when the client disconnects; its `finally` cancels the job.
        return StreamingResponse(
            stream_events(job, base, include_usage, answer),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await collect(job, base, request, answer)


@dataclass
class Answer:
    """What a finished reply is: text, or (a request with tools) calls of its tools."""

    req: ChatRequest
    tool_format: str | None

    @property
    def may_call_tools(self) -> bool:
        return bool(self.req.tools) and self.req.tool_choice != "none"

    def message(self, c: Completion) -> tuple[dict, str]:
        """-> (the assistant message, finish_reason). A reply is a call only when the tool format reads it as
        calls of tools the request defined; anything else (a made-up tool name included) is text."""
        calls = parse_tool_calls(c.text, self.tool_format) if self.may_call_tools else None
        defined = {t.function.name for t in self.req.tools or []}
        if not calls or any(name not in defined for name, _ in calls):
            return {"role": "assistant", "content": c.text}, _finish(c)
        tool_calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            for name, args in calls
        ]
        return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"


def _chunk(base: dict, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> str:
    """One chat.completion.chunk event; with stream_options.include_usage every chunk has usage: null."""
    body = dict(
        base,
        object="chat.completion.chunk",
        choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    )
    if with_usage:
        body["usage"] = None
    return sse(body)


def sse(body: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def usage_of(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def generation_error(e: BaseException, request_id: str) -> APIError:
    if isinstance(e, LoralabError):
        return APIError(400, str(e))
    return APIError(
        500,
        f"generation failed (request id {request_id}; the server log has the details)",
        type="server_error",
        code="generation_failed",
    )


async def stream_events(job: Job, base: dict, include_usage: bool, answer: Answer):
    try:
        yield _chunk(base, {"role": "assistant", "content": ""}, with_usage=include_usage)
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield _chunk(base, {"content": value}, with_usage=include_usage)
            elif kind == "done":
                finish = _finish(value)
                if answer.may_call_tools:  # the whole reply in one chunk: text, or the calls (indexed, as OpenAI)
                    message, finish = answer.message(value)
                    delta = (
                        {"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
                        if message["content"] is None
                        else {"content": message["content"]}
                    )
                    yield _chunk(base, delta, with_usage=include_usage)
                yield _chunk(base, {}, finish_reason=finish, with_usage=include_usage)
                if include_usage:
                    yield sse(dict(base, object="chat.completion.chunk", choices=[], usage=usage_of(value)))
                yield sse("[DONE]")
                return
            else:  # the headers are sent already: report the error in the stream, as OpenAI does
                yield sse(generation_error(value, job.request_id).body())
                return
    finally:
        job.cancel()  # done, or the client went away: either way the row can stop


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is already read, so only http.disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(job: Job, base: dict, request: Request, answer: Answer):
    """The whole reply of a non-streaming request; a disconnect cancels the job at once."""
    reply = asyncio.ensure_future(job.events.get())
    hangup = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({reply, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not reply.done():  # nobody is listening any more
            return Response(status_code=499)
        kind, value = reply.result()
        if kind == "error":
            raise generation_error(value, job.request_id)
        message, finish = answer.message(value)
        return dict(
            base,
            object="chat.completion",
            usage=usage_of(value),
            choices=[{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        )
    finally:
        job.cancel()
        reply.cancel()
        hangup.cancel()


# --- the app -------------------------------------------------------------------------------------
def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than this server's limit of {limit} bytes", code="request_too_large")


class RequestSizeLimit:
    """Refuse request bodies over `limit` bytes before they are parsed (pure ASGI middleware).

    A Content-Length over the limit is answered at once, before a byte of the body is read; a body
    without one (chunked) is counted as it arrives and refused when the count passes the limit.
    (FastAPI's own `max_body_size` answers an oversized Content-Length in plain text, not in
    OpenAI's error shape, and sits outside every middleware of ours.)
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large(self.limit).response(headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised into the body read: answered by on_http_error
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, counting_receive, send)


class HostCheck:
    """Answer only requests whose Host header names this server (pure ASGI middleware).

    A server without a key on localhost is otherwise reachable from any web page through DNS rebinding
    (the attacker's name resolving to 127.0.0.1): the browser sends the attacker's name as Host.
    """

    def __init__(self, app, allowed_hosts: list[str] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                error = APIError(
                    400,
                    f"Host header {_short(host)} is not a name of this server (expected one of "
                    f"{', '.join(sorted(self.allowed))}; the server's api_allowed_hosts sets them)",
                    code="invalid_host",
                )
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def allowed_hosts_for(host: str, configured: list[str] | None) -> list[str] | None:
    """The Host names a server bound to `host` answers: the configured ones, else the bound name (and the
    other loopback names on loopback); None (any) for a wildcard bind without configured names."""
    if configured:
        return configured
    if host in LOCAL_HOSTS:
        return list(LOCAL_HOSTS)
    if host in ("0.0.0.0", "::", ""):
        return None
    return [host]


class BodyTimeout:
    """Refuse a request whose body has not fully arrived `timeout` seconds after its headers (pure ASGI
    middleware; uvicorn bounds neither): a client sending a byte now and then holds a socket and a task."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:  # afterwards only the disconnect comes, whenever the client hangs up
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except TimeoutError:  # raised into the body read: answered by on_http_error
                raise StarletteHTTPException(408) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


async def on_api_error(request: Request, e: APIError) -> Response:
    return e.response()


async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
    if e.status_code == 413:
        return too_large(request.app.state.options.max_request_bytes).response()
    if e.status_code == 408:
        return APIError(
            408,
            f"request body not received within {request.app.state.options.body_timeout_s:g} s",
            code="request_timeout",
        ).response(headers={"Connection": "close"})
    code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response(
        headers=getattr(e, "headers", None)
    )


async def on_invalid_request(request: Request, e: RequestValidationError) -> Response:
    return describe_invalid(list(e.errors())).response()


async def on_unexpected_error(request: Request, e: Exception) -> Response:
    """A bug, not a client mistake: a 500 in OpenAI's shape, the traceback in the server log under an id."""
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=e)
    return APIError(
        500,
        f"internal server error (request id {request_id}; the server log has the details)",
        type="server_error",
        code="internal_error",
    ).response()


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed_hosts: list[str] | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving `engine`; the scheduler thread runs while the app is up.

    allowed_hosts: the Host header names answered (None: any; see `allowed_hosts_for`)."""
    if max_batch_size < 1:
        raise LoralabError(f"--max-batch-size: got {max_batch_size}; expected a positive number")
    if max_request_bytes < 1:
        raise LoralabError(f"--max-request-bytes: got {max_request_bytes}; expected a positive number of bytes")
    served_models(engine)  # duplicate names fail now, not when the server starts
    app = FastAPI(title="loralab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.options = ServerOptions(api_key or None, max_batch_size, max_request_bytes, body_timeout_s)
    app.add_middleware(RequestSizeLimit, limit=max_request_bytes)
    app.add_middleware(BodyTimeout, timeout=body_timeout_s)
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)  # (the last added runs first)
    app.include_router(router)
    app.include_router(v1)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(Exception, on_unexpected_error)
    return app


def resolve_host_port(cfg: Config, host: str | None, port: int | None) -> tuple[str, int]:
    """Flag, else API_HOST / API_PORT (as in LLaMA-Factory), else the config (127.0.0.1:8000)."""
    host = host or os.environ.get("API_HOST") or cfg.api_host
    if port is not None:
        source, raw_port = "--port", port
    elif os.environ.get("API_PORT"):
        source, raw_port = "API_PORT", os.environ["API_PORT"]
    else:
        source, raw_port = "api_port", cfg.api_port
    try:
        port = int(raw_port)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise LoralabError(f"{source}: expected a port number 1-65535, got {raw_port!r}") from None
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


def serve(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Load the model and adapters once, then serve until Ctrl-C."""
    import uvicorn

    host, port = resolve_host_port(cfg, host, port)
    api_key = api_key or os.environ.get("API_KEY") or None
    if max_batch_size < 1:
        raise LoralabError(f"--max-batch-size: got {max_batch_size}; expected a positive number")
    if max_request_bytes < 1:
        raise LoralabError(f"--max-request-bytes: got {max_request_bytes}; expected a positive number of bytes")
    if host not in LOCAL_HOSTS and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    check_sampling(GenerationSettings.from_config(cfg))  # every request without its own knobs uses these
    engine = Engine(cfg)
    app = create_app(
        engine,
        api_key=api_key,
        max_batch_size=max_batch_size,
        max_request_bytes=max_request_bytes,
        allowed_hosts=allowed_hosts_for(host, cfg.api_allowed_hosts),
    )
    log.info(
        "serving %s on http://%s:%d/v1 (models: %s; request limit %d bytes)",
        cfg.model_name_or_path,
        host,
        port,
        ", ".join([engine.base_name, *engine.adapter_names]),
        max_request_bytes,
    )
    uvicorn.Server(server_config(app, host, port)).run()


def server_config(app: FastAPI, host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S):
    """uvicorn's settings that keep slow or many clients from holding the server: headers within
    header_timeout_s (SlowHeadersGuard), idle keep-alive connections closed after 5 s, at most
    MAX_CONNECTIONS connections (more are answered 503), a shutdown that waits at most SHUTDOWN_TIMEOUT_S
    for replies in flight; connection-level errors logged as one line, not a traceback each."""
    import uvicorn

    quiet_connection_errors()
    allow_open_files(MAX_CONNECTIONS + 1000)
    guard = type("Guard", (slow_headers_guard(),), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guard,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        h11_max_incomplete_event_size=16 * 1024,  # the request line and headers together
    )


def allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit of open files towards `wanted` (within the hard limit): the connection
    limit should be what refuses clients, not a failed accept() (a common soft limit is 1,024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # no such limit here (Windows), or not allowed: keep it
        pass


def slow_headers_guard():
    """uvicorn's h11 protocol that closes a connection whose request headers take longer than
    header_timeout_s to arrive (uvicorn's own keep-alive timer starts only after a first response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowHeadersGuard(H11Protocol):
        header_timeout_s = HEADER_TIMEOUT_S
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

        def waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and self.waiting_for_headers():  # the next request on this connection
                self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)
            super().data_received(data)
            if self.header_timer is not None and not self.waiting_for_headers():
                self.header_timer.cancel()
                self.header_timer = None

        def connection_lost(self, exc):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().connection_lost(exc)

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

    return SlowHeadersGuard


class OneLineConnectionErrors(logging.Filter):
    """A connection-level error (a reset, too many open files) as one warning line, at most once a minute
    per message: one traceback per dropped connection once filled the log with 200,000 of them."""

    def __init__(self):
        super().__init__()
        self.last_logged: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, OSError):
            return True
        what = f"{record.getMessage().splitlines()[0]}: {type(error).__name__}: {error}"
        now = time.monotonic()
        if now - self.last_logged.get(what, -1e9) < 60:
            return False
        self.last_logged[what] = now
        record.msg, record.args, record.exc_info, record.exc_text = what, None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_connection_errors() -> None:
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineConnectionErrors) for f in logger.filters):
            logger.addFilter(OneLineConnectionErrors())
