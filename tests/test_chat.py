"""`loralab chat`: scripted through a pipe, history and commands, Ctrl-C during a reply."""

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LORALAB = Path(sys.executable).with_name("loralab")


@pytest.fixture(scope="module")
def engine(tiny_model):
    import torch

    from loralab.config import Config
    from loralab.generate import Engine

    threads = torch.get_num_threads()
    yield Engine(Config(model_name_or_path=str(tiny_model), max_new_tokens=12, torch_threads=1))
    torch.set_num_threads(threads)


def reply(engine, messages, max_new_tokens=12):
    from loralab.generate import GenerationSettings

    return engine.generate([messages], GenerationSettings(max_new_tokens=max_new_tokens))[0].text


def user(text):
    return {"role": "user", "content": text}


def env():
    return dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_chat_through_a_pipe_keeps_history_and_obeys_commands(tiny_model, engine):
    script = "hello\n\nhow are you?\n/clear\nhello\n/system Answer in French.\nhello\n/bogus\n/exit\nnever read\n"
    proc = subprocess.run(
        [str(LORALAB), "chat", f"model_name_or_path={tiny_model}", "max_new_tokens=12", "torch_threads=1"],
        input=script.encode(),
        capture_output=True,
        timeout=120,
        env=env(),
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    r1 = reply(engine, [user("hello")])
    r2 = reply(engine, [user("hello"), {"role": "assistant", "content": r1}, user("how are you?")])
    r4 = reply(
        engine,
        [
            {"role": "system", "content": "Answer in French."},
            user("hello"),
            {"role": "assistant", "content": r1},
            user("hello"),
        ],
    )
    # stdout is exactly the replies, one per message: history before /clear, none right after it,
    # and the system prompt set mid-conversation applies to the whole history.
    assert proc.stdout.decode() == f"{r1}\n{r2}\n{r1}\n{r4}\n"
    assert len({r1, r2, r4}) == 3
    notes = proc.stderr.decode()
    assert "(history cleared)" in notes and "(system prompt set)" in notes and "unknown command /bogus" in notes


def test_session_history_clear_and_system(engine):
    from loralab.chat import ChatSession
    from loralab.generate import GenerationSettings

    session = ChatSession(engine, GenerationSettings(max_new_tokens=6))
    out, note = io.StringIO(), io.StringIO()
    assert session.handle("/system Be brief.", out, note)
    assert session.handle("hi", out, note)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert out.getvalue() == session.history[-1]["content"] + "\n"
    assert session.handle("/system", out, note) and session.system is None
    assert session.handle("/clear", out, note) and session.history == []
    assert not session.handle("/exit", out, note)


class InterruptAfter(io.StringIO):
    """A terminal that gets Ctrl-C after `n` streamed pieces."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_reply_but_not_the_session(engine):
    from loralab.chat import ChatSession
    from loralab.generate import GenerationSettings

    session = ChatSession(engine, GenerationSettings(max_new_tokens=40))
    full = reply(engine, [user("tell me a story")], max_new_tokens=40)
    out = InterruptAfter(4)
    partial = session.send("tell me a story", out)
    assert full.startswith(partial) and len(partial) < len(full)
    assert out.getvalue().endswith(" [interrupted]\n")
    assert session.history[-1] == {"role": "assistant", "content": partial}
    out2 = io.StringIO()
    again = session.send("go on", out2)  # the engine is free again and the history holds the partial reply
    assert out2.getvalue() == again + "\n"
    assert again == reply(engine, session.messages[:-1], max_new_tokens=40)


def test_sigint_during_a_reply_in_a_real_process(tiny_model):
    proc = subprocess.Popen(
        [str(LORALAB), "chat", f"model_name_or_path={tiny_model}", "max_new_tokens=1000", "torch_threads=1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    try:
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no reply within 60 s"
        first = proc.stdout.read1(4096)  # the reply has started streaming
        assert first
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/system Be brief.\n/exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (first + out).decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    # The reply stopped early, then the session went on: it still took commands and exited cleanly.
    assert text.endswith(" [interrupted]\n"), text[-300:]
    assert "(system prompt set)" in err.decode() and "Traceback" not in err.decode()


def test_oldest_turns_are_forgotten_when_the_context_is_full(engine):
    from loralab.chat import ChatSession, fit_context
    from loralab.generate import GenerationSettings

    system = "Be brief."
    turn = "apple banana " * 10  # ~40 tokens per turn with the tiny tokenizer: 12 turns do not fit
    history = [{"role": r, "content": f"{i} {turn}"} for i in range(6) for r in ("user", "assistant")]
    history.append(user("last question"))
    kept, budget = fit_context(engine, system, history, 700)
    assert budget == 700
    assert len(engine.prompt_ids([{"role": "system", "content": system}, *kept])) + 700 <= 1024
    assert kept[-1] == user("last question") and kept[0]["role"] == "user"
    assert 1 < len(kept) < 13 and kept == history[len(history) - len(kept) :]
    # A message that leaves less room than max_new_tokens gets a shorter reply budget ...
    long = [user("apple banana " * 100)]
    n_prompt = len(engine.prompt_ids([{"role": "system", "content": system}, *long]))
    assert n_prompt + 700 > 1024 and fit_context(engine, system, long, 700) == (long, 1024 - n_prompt)
    # ... and one that cannot fit at all is refused with a note; the session and its history go on.
    session = ChatSession(engine, GenerationSettings(max_new_tokens=700), system=system)
    session.history = history[:2]
    note = io.StringIO()
    assert session.handle("word " * 1100, io.StringIO(), note)
    assert "too long" in note.getvalue() and session.history == history[:2]


def test_a_template_that_refuses_the_conversation_is_one_line_and_the_session_goes_on(tiny_model, tmp_path):
    """Gemma/Mistral-style templates raise_exception("System role not supported"): an error line, not a crash."""
    from loralab.chat import ChatSession
    from loralab.config import Config
    from loralab.generate import Engine, GenerationSettings
    from loralab.testing import copy_refusing_system_prompts

    model = copy_refusing_system_prompts(tiny_model, tmp_path / "no-system-model")
    engine = Engine(Config(model_name_or_path=str(model), torch_threads=1))
    session = ChatSession(engine, GenerationSettings(max_new_tokens=4))
    out, note = io.StringIO(), io.StringIO()
    for line in ("/system Be brief.", "hello", "/system", "hello"):
        assert session.handle(line, out, note)
    assert "error: chat template: System role not supported\n" in note.getvalue()
    assert len(out.getvalue().splitlines()) == 1  # the refused message got no reply, the next one did
    assert [m["role"] for m in session.history] == ["user", "assistant"]


@pytest.mark.parametrize("redirect, message", [("0<&-", "stdin: closed"), (">&-", "stdout: closed")])
def test_chat_with_a_closed_stdin_or_stdout_ends_with_one_line(tiny_model, redirect, message):
    proc = subprocess.run(
        f"'{LORALAB}' chat model_name_or_path='{tiny_model}' {redirect}",
        shell=True,
        stderr=subprocess.PIPE,
        timeout=120,
        env=env(),
        stdin=subprocess.DEVNULL if redirect == ">&-" else None,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and f"error: {message}" in err and "Traceback" not in err, err[-2000:]


def test_reader_of_stdout_going_away_ends_the_session_quietly(tiny_model):
    """`loralab chat ... | head -1`: once the reader is gone the session ends, without a BrokenPipeError."""
    from loralab.chat import chat
    from loralab.config import Config

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone away
    with open(write_end, "w", encoding="utf-8") as stdout:
        chat(
            Config(model_name_or_path=str(tiny_model), max_new_tokens=20, torch_threads=1),
            stdin=io.StringIO("hi\nhello\n"),
            stdout=stdout,
        )
        stdout.write("more")  # stdout now leads to /dev/null: the interpreter's last flush cannot fail
        stdout.flush()
