"""`loralab webchat`: a browser chat page (Gradio) over the one generation engine.

Streaming replies, a model selector (the base model or any loaded adapter, switched per message
without reloading), a system prompt, temperature / top_p / max new tokens, and the chat box's own
clear button. Binds 127.0.0.1 unless told otherwise; --username/--password turn on Gradio's login.
Gradio's analytics are off and the page uses system fonts, so nothing reaches the network.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import time
from dataclasses import replace

# Must be set before gradio is imported: no usage statistics, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from loralab.api import MIN_TEMPERATURE, MIN_TOP_P, check_sampling, context_length  # noqa: E402
from loralab.config import Config  # noqa: E402
from loralab.errors import LoralabError  # noqa: E402
from loralab.generate import Engine, GenerationSettings  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio chat history (content: str or a list of parts) -> loralab conversation turns."""
    out = []
    for m in history:
        content = m.get("content")
        if isinstance(content, list):  # gradio 6 hands text back as [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if m.get("role") in ("user", "assistant") and isinstance(content, str):
            out.append({"role": m["role"], "content": content})
    return out


def rejected(message: str):
    """A user mistake shown in the page; the server log gets no traceback for it."""
    import gradio as gr

    return gr.Error(message, print_exception=False)


def quiet(component):
    """`component`, with the values it refuses (a slider out of bounds, a choice not offered) reported
    to the page without a server-side traceback, like our own refusals. Gradio's API accepts any
    value, so these refusals are everyday client input, not server faults."""
    import gradio as gr

    check = component.preprocess

    def preprocess(payload):
        try:
            return check(payload)
        except gr.Error as e:
            e.print_exception = False
            raise

    component.preprocess = preprocess
    return component


def text_required(textbox):
    """`textbox`, refusing a missing message (null through Gradio's API) before the chat interface
    reads it (it would fail there with a traceback in the log)."""
    check = textbox.preprocess

    def preprocess(payload):
        if not isinstance(payload, str):
            raise rejected(f"message: expected text, got {type(payload).__name__}")
        return check(payload)

    textbox.preprocess = preprocess
    return textbox


def make_respond(engine: Engine):
    """The chat function: (message, history, model, system, temperature, top_p, max_new_tokens) -> text so far."""
    models = [engine.base_name, *engine.adapter_names]
    defaults = replace(GenerationSettings.from_config(engine.cfg), seed=None)
    limit = context_length(engine)

    def respond(
        message: str,
        history: list[dict],
        model: str,
        system: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ):
        # The page only sends sane values, but Gradio's API takes anything: check what the engine relies on.
        if model not in models:
            raise rejected(f"unknown model {model!r}; choose one of {', '.join(models)}")
        if not isinstance(message, str):
            raise rejected(f"message: expected text, got {type(message).__name__}")
        if not isinstance(system, str | None):
            raise rejected(f"system prompt: expected text, got {type(system).__name__}")
        if not isinstance(history, list):
            raise rejected(f"history: expected a list of messages, got {type(history).__name__}")
        if 0 < temperature < MIN_TEMPERATURE:
            raise rejected(f"temperature: got {temperature}; expected 0 (greedy) or {MIN_TEMPERATURE}-2")
        if top_p < MIN_TOP_P:
            raise rejected(f"top_p: got {top_p}; expected {MIN_TOP_P}-1")
        try:
            settings = replace(
                defaults,
                max_new_tokens=int(max_new_tokens),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else defaults.temperature,
                top_p=top_p,
            )
            settings.check()
            messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
            messages += history_to_messages(history) + [{"role": "user", "content": message}]
            for m in messages:
                m["content"].encode("utf-8")  # lone surrogates are not text
            n_prompt = len(engine.prompt_ids(messages))
        except LoralabError as e:
            raise rejected(str(e)) from None
        except (TypeError, ValueError, OverflowError, AttributeError) as e:
            raise rejected(f"invalid input: {type(e).__name__}: {e}"[:300]) from None
        if limit and n_prompt + settings.max_new_tokens > limit:
            raise rejected(
                f"the conversation plus {settings.max_new_tokens} new tokens does not fit the model's "
                f"{limit}-token context; clear the chat or lower max new tokens"
            )
        text = ""
        try:
            # Closing this generator (the Stop button, a closed tab) closes engine.stream, which
            # stops the generation.
            for delta in engine.stream(messages, settings, adapter=None if model == engine.base_name else model):
                text += delta
                yield text
        except LoralabError as e:
            raise rejected(str(e)) from None
        if not text:
            yield ""

    return respond


# The address of the client whose request is being answered: Gradio calls the login check with the
# username and password only, so a middleware (RememberClient) sets this for the request's task.
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("webchat_client_address", default="?")


class RememberClient:
    """Pure ASGI middleware: CLIENT_ADDRESS for the request's task (for LoginGuard's brake per client)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            CLIENT_ADDRESS.set((scope.get("client") or ("?", 0))[0])
        await self.app(scope, receive, send)


class LoginGuard:
    """Gradio's login check with a brake on guessing, per client address: a client's failed attempts are
    answered one at a time, each after `delay_s`, and after `max_failures` failures within `window_s`
    that client gets a 429 until the oldest of them leaves the window. Other clients are not slowed or
    locked out by someone else's guessing (behind a reverse proxy all clients share its address)."""

    def __init__(
        self, username: str, password: str, max_failures: int = 5, window_s: float = 60.0, delay_s: float = 1.0
    ):
        self.username, self.password = username, password
        self.max_failures, self.window_s, self.delay_s = max_failures, window_s, delay_s
        self.failures: dict[str, list[float]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def check(self, username: str, password: str) -> bool:
        """Gradio's `auth` function (a coroutine function: Gradio awaits only those)."""
        from fastapi import HTTPException

        client = CLIENT_ADDRESS.get()
        async with self.locks.setdefault(client, asyncio.Lock()):
            now = time.monotonic()
            self.forget_before(now - self.window_s)
            failures = self.failures.get(client, [])
            if len(failures) >= self.max_failures:
                wait = int(failures[0] + self.window_s - now) + 1
                raise HTTPException(429, f"too many failed logins from {client}; try again in {wait} s")
            ok = hmac.compare_digest(username.encode(), self.username.encode()) & hmac.compare_digest(
                password.encode(), self.password.encode()
            )
            if not ok:
                self.failures.setdefault(client, []).append(now)
                log.warning("webchat: failed login for user %r from %s", username[:40], client)
                await asyncio.sleep(self.delay_s)
            return ok

    def forget_before(self, start: float) -> None:
        """Drop failures older than the window, and clients left with none (the table stays small)."""
        for client in list(self.failures):
            kept = [t for t in self.failures[client] if t >= start]
            if kept:
                self.failures[client] = kept
            else:
                del self.failures[client]
        for client in [c for c, lock in self.locks.items() if c not in self.failures and not lock.locked()]:
            del self.locks[client]


def build_demo(engine: Engine):
    """The Gradio page for `engine`."""
    import gradio as gr

    cfg = engine.cfg
    models = [engine.base_name, *engine.adapter_names]
    respond = make_respond(engine)
    max_tokens_cap = min(4096, context_length(engine) or 4096)
    with gr.Blocks(title="loralab chat", fill_height=True) as demo:
        gr.Markdown(f"### loralab chat: `{engine.base_name}`")
        with gr.Row():
            model = quiet(
                gr.Dropdown(
                    models,
                    value=models[-1] if engine.adapter_names else models[0],
                    label="model (base or adapter)",
                    scale=2,
                    elem_id="model",
                )
            )
            system = gr.Textbox(cfg.default_system or "", label="system prompt", scale=3, elem_id="system")
        with gr.Row():
            temperature = quiet(
                gr.Slider(
                    0.0,
                    2.0,
                    value=cfg.temperature if cfg.do_sample else 0.0,
                    step=0.05,
                    label="temperature (0 = greedy)",
                )
            )
            top_p = quiet(gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top_p"))
            max_new = quiet(
                gr.Slider(
                    1, max_tokens_cap, value=min(cfg.max_new_tokens, max_tokens_cap), step=1, label="max new tokens"
                )
            )
        gr.ChatInterface(
            respond,
            chatbot=gr.Chatbot(elem_id="chatbot", scale=1),
            textbox=text_required(
                gr.Textbox(
                    placeholder="Type a message and press Enter", elem_id="message", submit_btn=True, stop_btn=True
                )
            ),
            additional_inputs=[model, system, temperature, top_p, max_new],
            fill_height=True,
        )
    return demo


def theme():
    """Gradio's default look with system fonts (its default fonts come from Google Fonts)."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo, host: str = "127.0.0.1", port: int = DEFAULT_PORT, auth: LoginGuard | None = None, block: bool = True):
    """Serve the page; everything that would reach the internet (share links, SSR, MCP, PWA) is off."""
    from starlette.middleware import Middleware

    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth.check if auth else None,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        inbrowser=False,
        show_error=True,
        quiet=True,
        prevent_thread_lock=not block,
        theme=theme(),
        app_kwargs={"middleware": [Middleware(RememberClient)]},
    )


def serve(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """`loralab webchat`: load the model and adapters once, then serve the page until Ctrl-C."""
    password = password or os.environ.get("WEBCHAT_PASSWORD") or None
    if bool(username) != bool(password):
        raise LoralabError("--username/--password: give both (the password may come from WEBCHAT_PASSWORD), or neither")
    host = host or "127.0.0.1"
    port = port or DEFAULT_PORT
    if not 0 < port < 65536:
        raise LoralabError(f"--port: expected a port number 1-65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1") and not username:
        log.warning("serving on %s without a login: anyone who can reach this address can use the model", host)
    check_sampling(GenerationSettings.from_config(cfg))  # the page's starting values
    engine = Engine(cfg)
    demo = build_demo(engine)
    log.info("web chat on http://%s:%d (models: %s)", host, port, ", ".join([engine.base_name, *engine.adapter_names]))
    launch(demo, host, port, LoginGuard(username, password) if username else None)
