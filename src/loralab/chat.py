"""`loralab chat`: talk to a base model (and its adapter) in the terminal.

Replies stream token by token through `Engine.stream`. The conversation keeps its history until
/clear; /system TEXT sets the system prompt, /exit leaves. Ctrl-C during a reply stops that reply
and keeps the session (what was already printed stays in the history).

When stdin is not a terminal every line is one message and only the replies are printed (one per
line), so the command can be scripted: `printf 'hi\\n/clear\\nbye\\n' | loralab chat model_name_or_path=...`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import TextIO

from loralab.api import check_sampling, context_length
from loralab.config import Config
from loralab.errors import LoralabError
from loralab.generate import Engine, GenerationSettings

log = logging.getLogger(__name__)

HELP = "commands: /clear (forget the conversation), /system TEXT (set the system prompt; empty = the default), /exit"


class ChatSession:
    """One conversation with history; `send` streams a reply to `out` and records it."""

    def __init__(
        self, engine: Engine, settings: GenerationSettings, adapter: str | None = None, system: str | None = None
    ):
        self.engine, self.settings, self.adapter = engine, settings, adapter
        self.system = system
        self.history: list[dict] = []  # user/assistant turns, without the system prompt

    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def send(self, text: str, out: TextIO) -> str:
        """Add a user message, stream the reply to `out`, return it. Ctrl-C stops the reply early.

        A message the model cannot take (too long for its context, refused by its chat template)
        raises LoralabError and leaves the history as it was.
        """
        self.history, budget = fit_context(
            self.engine, self.system, [*self.history, {"role": "user", "content": text}], self.settings.max_new_tokens
        )
        settings = replace(self.settings, max_new_tokens=budget)
        parts: list[str] = []
        deltas = self.engine.stream(self.messages, settings, adapter=self.adapter)
        try:
            for delta in deltas:
                parts.append(delta)
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        finally:
            deltas.close()  # stops the generation thread (Ctrl-C, or `out` went away)
            out.write("\n")
            out.flush()
        reply = "".join(parts)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def handle(self, line: str, out: TextIO, note: TextIO) -> bool:
        """One input line: a command or a message. Returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                return False
            if command == "/clear":
                self.history = []
                note.write("(history cleared)\n")
            elif command == "/system":
                self.system = arg.strip() or None
                note.write(f"(system prompt {'set' if self.system else 'removed'})\n")
            elif command == "/help":
                note.write(HELP + "\n")
            else:
                note.write(f"unknown command {command}; {HELP}\n")
            note.flush()
            return True
        try:
            self.send(line, out)
        except LoralabError as e:  # a bad message ends that turn, not the session
            note.write(f"error: {e}\n")
            note.flush()
        return True


def fit_context(engine: Engine, system: str | None, history: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
    """Forget the oldest turns of `history` while prompt + reply would not fit the model's context.

    Returns the history that fits and the reply's token budget: max_new_tokens, or less when the
    last message alone leaves less room. A last message that does not fit at all is refused
    (LoralabError). A chat template that refuses the conversation raises LoralabError too.
    """
    limit = context_length(engine)
    prefix = [{"role": "system", "content": system}] if system else []
    n_prompt = len(engine.prompt_ids(prefix + history))  # also where a template's raise_exception surfaces
    if not limit:
        return history, max_new_tokens
    while n_prompt + max_new_tokens > limit and len(history) > 1:
        history = history[2 if len(history) > 2 else 1 :]  # a user turn and its reply
        log.warning("conversation too long for the model's %d-token context: forgot the oldest turn", limit)
        n_prompt = len(engine.prompt_ids(prefix + history))
    if n_prompt >= limit:
        raise LoralabError(f"message: {n_prompt} tokens, too long for the model's {limit}-token context; not sent")
    return history, min(max_new_tokens, limit - n_prompt)


def run(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> None:
    """The read-reply loop: a prompt per line on a terminal, bare replies when reading a pipe."""
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        stderr.write(
            f"chatting with {session.engine.base_name}"
            + (f" + adapter {session.adapter}" if session.adapter else "")
            + f"; {HELP}\n"
        )
    while True:
        try:
            if interactive:
                line = input("\nyou> ")
            else:
                line = stdin.readline()
                if not line:
                    break
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt ends the session
            stderr.write("\n")
            break
        except UnicodeDecodeError as e:
            raise LoralabError(f"stdin: not UTF-8 text (byte 0x{e.object[e.start]:02x}); send UTF-8") from None
        if interactive and line.strip() and not line.strip().startswith("/"):
            stdout.write("assistant> ")
        if not session.handle(line, stdout, stderr):
            break


def chat(cfg: Config, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """`loralab chat`: load the model (and adapter) once, then talk until /exit or end of input."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    # Python sets sys.stdin/stdout to None when the descriptor was closed (`0<&-`, `>&-`).
    if stdin is None:
        raise LoralabError("stdin: closed; pipe messages in (printf 'hi\\n' | loralab chat ...) or run in a terminal")
    if stdout is None:
        raise LoralabError("stdout: closed; replies need somewhere to go (a terminal, a file or a pipe)")
    settings = GenerationSettings.from_config(cfg)
    check_sampling(settings)
    # The chat talks to one model only: a single adapter is merged into the weights (faster tokens).
    engine = Engine(cfg, merge=True)
    adapter = engine.adapter_names[0] if engine.adapter_names else None
    if len(engine.adapter_names) > 1:
        log.info("several adapters loaded; chatting with the first: %s", adapter)
    # No system prompt of our own: the engine adds cfg.default_system to conversations without one.
    session = ChatSession(engine, settings, adapter)
    try:
        run(session, stdin, stdout, sys.stderr, interactive=stdin.isatty())
    except BrokenPipeError:
        # The reader of our stdout went away (`loralab chat ... | head -1`): nobody to answer, end quietly.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
