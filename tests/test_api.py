"""`loralab api` driven by the official openai client: base model + two adapters in one server."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loralab.testing import free_port, make_random_adapter

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    out = make_random_adapter(base, out, seed)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_adapter(tiny_model, root / name, seed)) for name, seed in (("alpha", 1), ("beta", 2))}


def wait_until_healthy(proc, port: int, timeout: float = 120) -> None:
    """Wait for a `loralab api` process to answer /health on 127.0.0.1:port (fail if it exits first)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread; stop() shuts it down."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_adapters):
    import torch

    from loralab.config import Config
    from loralab.generate import Engine

    # One torch thread: the tiny model gains nothing from more, and on a busy 2-core machine
    # two threads waiting on each other make every decoding step ~10x slower.
    threads = torch.get_num_threads()
    yield Engine(Config(model_name_or_path=str(tiny_model), adapters=tiny_adapters, max_new_tokens=16, torch_threads=1))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    from loralab.api import create_app

    srv = ServerThread(create_app(engine, api_key=KEY, max_batch_size=8))
    yield srv
    srv.stop()
    assert not srv.thread.is_alive()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_base_and_adapters(client, engine):
    ids = [m.id for m in client.models.list()]
    assert ids == [engine.base_name, "alpha", "beta"]
    assert client.models.retrieve(engine.base_name).id == engine.base_name  # ids may hold slashes
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_model_answers_differently_without_reloading(client, engine):
    replies = {}
    for model in (engine.base_name, "alpha", "beta", engine.base_name):
        r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=12)
        choice = r.choices[0]
        assert r.object == "chat.completion" and r.model == model
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(engine.prompt_ids(HELLO))
        assert 0 < r.usage.completion_tokens <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        if model in replies:  # greedy: the same model gives the same reply after the others ran
            assert choice.message.content == replies[model]
        replies[model] = choice.message.content
    assert len(set(replies.values())) == 3, replies


def test_finish_reason_length_and_usage(client):
    r = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_streaming_chunks_match_the_plain_reply(client):
    full = client.chat.completions.create(model="beta", messages=HELLO, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model="beta", messages=HELLO, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "expected the reply in several deltas"
    assert "".join(content) == full.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_format(server):
    body = {"model": "alpha", "messages": HELLO, "max_tokens": 4, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}


def test_stop_strings_and_seeded_sampling(client):
    full = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=12).choices[0].message.content
    stop = full[3:6]
    assert stop.strip(), full
    cut = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[: full.find(stop)]
    kw = dict(model="beta", messages=HELLO, max_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


def test_content_parts_developer_role_and_max_completion_tokens(client):
    plain = client.chat.completions.create(
        model="alpha",
        max_tokens=6,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    )
    parts = client.chat.completions.create(
        model="alpha",
        max_completion_tokens=6,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_tools_are_written_into_the_prompt_and_calls_come_back_as_tool_calls(client, engine, monkeypatch):
    from loralab import api

    with_tools = api.to_messages(api.ChatRequest.model_validate({"model": "m", "messages": HELLO, "tools": TOOLS}))
    r = client.chat.completions.create(model="alpha", messages=HELLO, tools=TOOLS, max_tokens=6)
    assert r.usage.prompt_tokens == len(engine.prompt_ids(with_tools)) > len(engine.prompt_ids(HELLO))
    # The random tiny model answers in words: a plain reply.
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")

    # A reply the tool format reads as a call (here every reply: the tiny model cannot write one).
    monkeypatch.setattr(api, "parse_tool_calls", lambda text, fmt: [("get_weather", {"city": "Zürich"})])
    r = client.chat.completions.create(model="alpha", messages=HELLO, tools=TOOLS, max_tokens=6)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Zürich"}
    chunks = list(client.chat.completions.create(model="alpha", messages=HELLO, tools=TOOLS, max_tokens=6, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls[0].index == 0
    assert deltas[0].tool_calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    # tool_choice "none", or a call of a tool the request did not define: text.
    r = client.chat.completions.create(model="alpha", messages=HELLO, tools=TOOLS, tool_choice="none", max_tokens=6)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    monkeypatch.setattr(api, "parse_tool_calls", lambda text, fmt: [("rm_rf", {})])
    r = client.chat.completions.create(model="alpha", messages=HELLO, tools=TOOLS, max_tokens=6)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


def test_the_tool_result_turn_continues_the_conversation(client, engine):
    from loralab import api

    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    served = api.to_messages(api.ChatRequest.model_validate({"model": "m", "messages": messages, "tools": TOOLS}))
    assert [m["role"] for m in served] == ["system", "user", "function", "observation"]
    r = client.chat.completions.create(model="beta", messages=messages, tools=TOOLS, max_tokens=4)
    assert r.usage.prompt_tokens == len(engine.prompt_ids(served))


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(
            base_url=server.url + "/v1",
            api_key=key or "x",
            max_retries=0,
            default_headers={} if key else {"Authorization": ""},
        )
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="alpha", messages=HELLO)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": "alpha"}, 400, "messages"),
        ({"model": "alpha", "messages": []}, 400, "messages"),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "alpha", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"model": "alpha", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi", "strict": 1}]}, 400, "messages[0].strict"),
        (
            {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0].type",
        ),
        ({"model": "nope", "messages": HELLO}, 404, "model"),
        ({"model": "alpha", "messages": HELLO, "n": 2}, 400, "n"),
        ({"model": "alpha", "messages": HELLO, "tools": []}, 400, "tools"),
        ({"model": "alpha", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "alpha", "messages": HELLO, "temperature": 9}, 400, "temperature"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
        ({"model": "alpha", "messages": HELLO, "max_tokens": 5000}, 400, "max_tokens"),
    ],
)
def test_client_mistakes_are_4xx_with_openai_error_json(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert param.split("[")[0] in error["message"]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="alpha", messages=HELLO, n=3)


def test_concurrent_requests_are_batched_and_match_single_replies(client, server, engine):
    prompts = [[{"role": "user", "content": f"Write the number {i} in words."}] for i in range(12)]
    alone = [
        client.chat.completions.create(model="alpha", messages=p, max_tokens=8).choices[0].message.content
        for p in prompts[:3]
    ]
    before = httpx.get(server.url + "/health").json()["largest_batch"]

    def ask(p):
        return client.chat.completions.create(model="alpha", messages=p, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, prompts))
    assert together[:3] == alone  # greedy batched output equals one-at-a-time output
    assert max(before, httpx.get(server.url + "/health").json()["largest_batch"]) > 1


def test_requests_for_different_adapters_share_the_running_batch(client, server, engine):
    """Base model and both adapters at once: one batch (peft's mixed-adapter forward), each reply as if alone."""
    jobs = [
        (model, [{"role": "user", "content": f"Count to {i}."}])
        for i in range(4)
        for model in (engine.base_name, "alpha", "beta")
    ]

    def ask(job):
        model, messages = job
        return client.chat.completions.create(model=model, messages=messages, max_tokens=10).choices[0].message.content

    alone = [ask(job) for job in jobs[:3]]
    steps = httpx.get(server.url + "/health").json()["steps"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    health = httpx.get(server.url + "/health").json()
    assert together[:3] == alone
    # 12 replies of up to 10 tokens in far fewer than 120 steps: the models decoded together
    assert health["steps"] - steps < 60 and health["largest_batch"] > 3


def test_disconnect_mid_stream_cancels_generation(server, engine):
    long = [{"role": "user", "content": "Tell me a long story."}]
    cancelled = httpx.get(server.url + "/health").json()["cancelled"]
    body = {"model": "alpha", "messages": long, "max_tokens": 900, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few deltas, then hang up
    assert any('"content"' in g for g in got)
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == cancelled:
        assert time.time() < deadline, "the stream's generation was not cancelled after the client left"
        time.sleep(0.1)


def test_one_failing_request_does_not_break_the_others(client, engine, monkeypatch):
    real = engine.prompt_ids

    def broken(messages):  # a request whose token ids make the model fail (an id outside its vocabulary)
        ids = real(messages)
        return ids + [10**6] if any("BOOM" in m["content"] for m in messages) else ids

    monkeypatch.setattr(engine, "prompt_ids", broken)
    prompts = ["BOOM"] + [f"question {i}" for i in range(5)]

    def ask(text):
        try:
            return (
                client.chat.completions.create(
                    model="alpha", messages=[{"role": "user", "content": text}], max_tokens=4
                )
                .choices[0]
                .finish_reason
            )
        except openai.InternalServerError as e:
            return e.body["type"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, prompts))
    assert results[0] == "server_error" and all(r in ("stop", "length") for r in results[1:]), results
    monkeypatch.undo()
    assert client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=2).choices[0].finish_reason


def test_host_port_and_adapter_flags(monkeypatch):
    from loralab.api import parse_adapter_flags, resolve_host_port
    from loralab.config import Config
    from loralab.errors import LoralabError

    cfg = Config()
    monkeypatch.delenv("API_HOST", raising=False)
    monkeypatch.delenv("API_PORT", raising=False)
    assert resolve_host_port(cfg, None, None) == ("127.0.0.1", 8000)
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_PORT", "9001")
    assert resolve_host_port(cfg, None, None) == ("0.0.0.0", 9001)
    assert resolve_host_port(cfg, "127.0.0.1", 8123) == ("127.0.0.1", 8123)
    monkeypatch.setenv("API_PORT", "http")
    with pytest.raises(LoralabError, match="API_PORT"):
        resolve_host_port(cfg, None, None)
    assert parse_adapter_flags(["a=/x", "b = /y"]) == {"a": "/x", "b": "/y"}
    with pytest.raises(LoralabError, match="--adapter"):
        parse_adapter_flags(["just-a-path"])


def test_loralab_api_command(tiny_model, tiny_adapters):
    """The real command: adapters from --adapter, key from API_KEY, host/port from API_HOST/API_PORT."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    env = dict(os.environ, API_KEY="env-key", API_HOST="127.0.0.1", API_PORT=str(port), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("loralab")),
            "api",
            f"model_name_or_path={tiny_model}",
            "max_new_tokens=8",
            "torch_threads=1",
            "--adapter",
            f"tuned={tiny_adapters['alpha']}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list()] == [str(tiny_model), "tuned"]
        r = client.chat.completions.create(model="tuned", messages=HELLO)
        assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- the bad-input corpus: every client mistake is a 4xx in OpenAI's error shape, never a 500 -----
def J(**fields):
    """A valid request body with some fields replaced (None removes the field)."""
    body = {"model": "alpha", "messages": HELLO, "max_tokens": 2} | fields
    return {k: v for k, v in body.items() if v is not None}


def M(**message):
    """A request whose only message is `message`."""
    return J(messages=[message])


NESTED = b"[" * 100_000 + b"]" * 100_000
NO_KEY, BAD_KEY = {"Authorization": ""}, {"Authorization": "Bearer wrong"}
# (id, method, path, body: dict | bytes | None, extra headers, expected status, expected param)
CORPUS = [
    # authentication and routing
    ("no-key", "POST", "/v1/chat/completions", J(), NO_KEY, 401, None),
    ("wrong-key", "POST", "/v1/chat/completions", J(), BAD_KEY, 401, None),
    ("basic-auth", "POST", "/v1/chat/completions", J(), {"Authorization": f"Basic {KEY}"}, 401, None),
    ("bearer-only", "GET", "/v1/models", None, {"Authorization": "Bearer"}, 401, None),
    ("models-no-key", "GET", "/v1/models", None, NO_KEY, 401, None),
    ("model-card-no-key", "GET", "/v1/models/alpha", None, NO_KEY, 401, None),
    ("get-completions", "GET", "/v1/chat/completions", None, {}, 405, None),
    ("put-models", "PUT", "/v1/models", None, {}, 405, None),
    ("unknown-route", "POST", "/v1/completions", J(), {}, 404, None),
    ("unknown-root", "GET", "/admin", None, {}, 404, None),
    ("unknown-model-card", "GET", "/v1/models/nope", None, {}, 404, "model"),
    # framing of the body
    ("empty-body", "POST", "/v1/chat/completions", b"", {}, 400, None),
    ("not-json", "POST", "/v1/chat/completions", b"{not json", {}, 400, None),
    ("trailing-garbage", "POST", "/v1/chat/completions", json.dumps(J()).encode() + b" x", {}, 400, None),
    ("json-array", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("json-string", "POST", "/v1/chat/completions", b'"hello"', {}, 400, None),
    ("json-null", "POST", "/v1/chat/completions", b"null", {}, 400, None),
    ("json-number", "POST", "/v1/chat/completions", b"42", {}, 400, None),
    (
        "invalid-utf8",
        "POST",
        "/v1/chat/completions",
        b'{"model": "alpha", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
        None,
    ),
    ("nested-100k-arrays", "POST", "/v1/chat/completions", NESTED, {}, 400, None),
    ("nested-objects", "POST", "/v1/chat/completions", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {}, 400, None),
    (
        "nan-literal",
        "POST",
        "/v1/chat/completions",
        b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        {},
        400,
        "temperature",
    ),
    (
        "infinity-literal",
        "POST",
        "/v1/chat/completions",
        b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        {},
        400,
        "top_p",
    ),
    (
        "form-content-type",
        "POST",
        "/v1/chat/completions",
        json.dumps(J()).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        400,
        None,
    ),
    (
        "text-content-type",
        "POST",
        "/v1/chat/completions",
        json.dumps(J()).encode(),
        {"Content-Type": "text/plain"},
        400,
        None,
    ),
    (
        "too-large",
        "POST",
        "/v1/chat/completions",
        json.dumps(M(role="user", content="x" * 1_100_000)).encode(),
        {},
        413,
        None,
    ),
    # the fields
    ("missing-model", "POST", "/v1/chat/completions", J(model=None), {}, 400, "model"),
    ("model-not-string", "POST", "/v1/chat/completions", J(model=7), {}, 400, "model"),
    ("unknown-model", "POST", "/v1/chat/completions", J(model="gpt-4"), {}, 404, "model"),
    ("model-surrogate", "POST", "/v1/chat/completions", J(model="al\ud800pha"), {}, 400, "model"),
    ("missing-messages", "POST", "/v1/chat/completions", J(messages=None), {}, 400, "messages"),
    ("empty-messages", "POST", "/v1/chat/completions", J(messages=[]), {}, 400, "messages"),
    ("messages-string", "POST", "/v1/chat/completions", J(messages="hi"), {}, 400, "messages"),
    ("message-string", "POST", "/v1/chat/completions", J(messages=["hi"]), {}, 400, "messages[0]"),
    ("message-null", "POST", "/v1/chat/completions", J(messages=[None]), {}, 400, "messages[0]"),
    ("role-wizard", "POST", "/v1/chat/completions", M(role="wizard", content="hi"), {}, 400, "messages[0].role"),
    ("role-tool-first", "POST", "/v1/chat/completions", M(role="tool", content="hi"), {}, 400, "messages"),
    (
        "role-tool-after-user",
        "POST",
        "/v1/chat/completions",
        J(messages=[*HELLO, {"role": "tool", "content": "hi"}]),
        {},
        400,
        "messages",
    ),
    ("role-missing", "POST", "/v1/chat/completions", M(content="hi"), {}, 400, "messages[0].role"),
    ("role-number", "POST", "/v1/chat/completions", M(role=1, content="hi"), {}, 400, "messages[0].role"),
    ("content-missing", "POST", "/v1/chat/completions", M(role="user"), {}, 400, "messages[0].content"),
    ("content-number", "POST", "/v1/chat/completions", M(role="user", content=5), {}, 400, "messages[0].content"),
    ("content-null", "POST", "/v1/chat/completions", M(role="user", content=None), {}, 400, "messages[0].content"),
    (
        "content-object",
        "POST",
        "/v1/chat/completions",
        M(role="user", content={"text": "hi"}),
        {},
        400,
        "messages[0].content",
    ),
    (
        "content-surrogate",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="a\ud800b"),
        {},
        400,
        "messages[0].content",
    ),
    (
        "content-low-surrogate",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="\udfffend"),
        {},
        400,
        "messages[0].content",
    ),
    (
        "part-image",
        "POST",
        "/v1/chat/completions",
        M(role="user", content=[{"type": "image_url", "image_url": {"url": "http://x"}}]),
        {},
        400,
        "messages[0].content[0].type",
    ),
    (
        "part-no-text",
        "POST",
        "/v1/chat/completions",
        M(role="user", content=[{"type": "text"}]),
        {},
        400,
        "messages[0].content[0].text",
    ),
    (
        "part-text-number",
        "POST",
        "/v1/chat/completions",
        M(role="user", content=[{"type": "text", "text": 3}]),
        {},
        400,
        "messages[0].content[0].text",
    ),
    (
        "part-surrogate",
        "POST",
        "/v1/chat/completions",
        M(role="user", content=[{"type": "text", "text": "\ud83d"}]),
        {},
        400,
        "messages[0].content[0].text",
    ),
    (
        "part-extra-field",
        "POST",
        "/v1/chat/completions",
        M(role="user", content=[{"type": "text", "text": "hi", "cache": True}]),
        {},
        400,
        "messages[0].content[0].cache",
    ),
    (
        "message-extra-field",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="hi", strict=1),
        {},
        400,
        "messages[0].strict",
    ),
    ("name-number", "POST", "/v1/chat/completions", M(role="user", content="hi", name=5), {}, 400, "messages[0].name"),
    ("tools-empty", "POST", "/v1/chat/completions", J(tools=[]), {}, 400, "tools"),
    (
        "tools-not-function",
        "POST",
        "/v1/chat/completions",
        J(tools=[{"type": "code", "function": {"name": "f"}}]),
        {},
        400,
        "tools[0].type",
    ),
    (
        "tool-name-spaces",
        "POST",
        "/v1/chat/completions",
        J(tools=[{"type": "function", "function": {"name": "a b"}}]),
        {},
        400,
        "tools[0].function.name",
    ),
    (
        "tool-choice-required",
        "POST",
        "/v1/chat/completions",
        J(tools=TOOLS, tool_choice="required"),
        {},
        400,
        "tool_choice",
    ),
    ("tool-choice-without-tools", "POST", "/v1/chat/completions", J(tool_choice="auto"), {}, 400, "tool_choice"),
    (
        "tool-calls-on-user",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="hi", tool_calls=[CALL]),
        {},
        400,
        "messages[0].tool_calls",
    ),
    (
        "tool-call-arguments-not-json",
        "POST",
        "/v1/chat/completions",
        J(
            messages=[
                *HELLO,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [CALL | {"function": {"name": "get_weather", "arguments": "city=Paris"}}],
                },
            ]
        ),
        {},
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "assistant-content-null-without-calls",
        "POST",
        "/v1/chat/completions",
        J(messages=[*HELLO, {"role": "assistant", "content": None}]),
        {},
        400,
        "messages[1].content",
    ),
    (
        "ok-tools",
        "POST",
        "/v1/chat/completions",
        J(tools=TOOLS, tool_choice="auto", parallel_tool_calls=True),
        {},
        200,
        None,
    ),
    ("unknown-field-prompt", "POST", "/v1/chat/completions", J(prompt="hi"), {}, 400, "prompt"),
    ("max-tokens-zero", "POST", "/v1/chat/completions", J(max_tokens=0), {}, 400, "max_tokens"),
    ("max-tokens-negative", "POST", "/v1/chat/completions", J(max_tokens=-5), {}, 400, "max_tokens"),
    ("max-tokens-string", "POST", "/v1/chat/completions", J(max_tokens="5"), {}, 400, "max_tokens"),
    ("max-tokens-float", "POST", "/v1/chat/completions", J(max_tokens=1.5), {}, 400, "max_tokens"),
    ("max-tokens-bool", "POST", "/v1/chat/completions", J(max_tokens=True), {}, 400, "max_tokens"),
    ("max-tokens-over-context", "POST", "/v1/chat/completions", J(max_tokens=5000), {}, 400, "max_tokens"),
    ("max-tokens-huge", "POST", "/v1/chat/completions", J(max_tokens=10**30), {}, 400, "max_tokens"),
    (
        "max-completion-tokens-zero",
        "POST",
        "/v1/chat/completions",
        J(max_completion_tokens=0),
        {},
        400,
        "max_completion_tokens",
    ),
    ("temperature-high", "POST", "/v1/chat/completions", J(temperature=9), {}, 400, "temperature"),
    ("temperature-negative", "POST", "/v1/chat/completions", J(temperature=-1), {}, 400, "temperature"),
    ("temperature-string", "POST", "/v1/chat/completions", J(temperature="hot"), {}, 400, "temperature"),
    ("top-p-zero", "POST", "/v1/chat/completions", J(top_p=0), {}, 400, "top_p"),
    ("top-p-high", "POST", "/v1/chat/completions", J(top_p=1.5), {}, 400, "top_p"),
    ("seed-over-64-bit", "POST", "/v1/chat/completions", J(seed=2**64, temperature=1), {}, 400, "seed"),
    ("seed-huge", "POST", "/v1/chat/completions", J(seed=10**40, temperature=1), {}, 400, "seed"),
    ("seed-under-64-bit", "POST", "/v1/chat/completions", J(seed=-(2**64)), {}, 400, "seed"),
    ("seed-float", "POST", "/v1/chat/completions", J(seed=1.5), {}, 400, "seed"),
    ("seed-string", "POST", "/v1/chat/completions", J(seed="7"), {}, 400, "seed"),
    ("n-two", "POST", "/v1/chat/completions", J(n=2), {}, 400, "n"),
    ("n-zero", "POST", "/v1/chat/completions", J(n=0), {}, 400, "n"),
    ("stream-yes", "POST", "/v1/chat/completions", J(stream="yes"), {}, 400, "stream"),
    ("stream-true-string", "POST", "/v1/chat/completions", J(stream="true"), {}, 400, "stream"),
    ("stream-one", "POST", "/v1/chat/completions", J(stream=1), {}, 400, "stream"),
    (
        "stream-options-without-stream",
        "POST",
        "/v1/chat/completions",
        J(stream_options={"include_usage": True}),
        {},
        400,
        "stream_options",
    ),
    (
        "stream-options-bad-usage",
        "POST",
        "/v1/chat/completions",
        J(stream=True, stream_options={"include_usage": "yes"}),
        {},
        400,
        "stream_options.include_usage",
    ),
    (
        "stream-options-extra",
        "POST",
        "/v1/chat/completions",
        J(stream=True, stream_options={"x": 1}),
        {},
        400,
        "stream_options.x",
    ),
    ("stop-five", "POST", "/v1/chat/completions", J(stop=list("abcde")), {}, 400, "stop"),
    ("stop-empty", "POST", "/v1/chat/completions", J(stop=""), {}, 400, "stop"),
    ("stop-number", "POST", "/v1/chat/completions", J(stop=5), {}, 400, "stop"),
    ("stop-surrogate", "POST", "/v1/chat/completions", J(stop=["\ud800"]), {}, 400, "stop[0]"),
    ("frequency-penalty", "POST", "/v1/chat/completions", J(frequency_penalty=1), {}, 400, "frequency_penalty"),
    ("presence-penalty", "POST", "/v1/chat/completions", J(presence_penalty=0.5), {}, 400, "presence_penalty"),
    ("logprobs", "POST", "/v1/chat/completions", J(logprobs=True), {}, 400, "logprobs"),
    ("user-number", "POST", "/v1/chat/completions", J(user=12), {}, 400, "user"),
    (
        "prompt-over-context",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="word " * 2000),
        {},
        400,
        "messages",
    ),
    (
        "many-messages-over-context",
        "POST",
        "/v1/chat/completions",
        J(messages=[{"role": "user", "content": "hello there"}] * 600),
        {},
        400,
        "messages",
    ),
    # near misses that are fine: the corpus must not refuse valid requests
    ("ok-stream-null", "POST", "/v1/chat/completions", J(stream=None) | {"stream": None}, {}, 200, None),
    (
        "ok-n-one-and-zero-penalties",
        "POST",
        "/v1/chat/completions",
        J(n=1, frequency_penalty=0, presence_penalty=0, logprobs=False),
        {},
        200,
        None,
    ),
    ("ok-largest-seed", "POST", "/v1/chat/completions", J(seed=2**63 - 1, temperature=1), {}, 200, None),
    (
        "ok-unicode-and-nul",
        "POST",
        "/v1/chat/completions",
        M(role="user", content="h\u00e9llo \U0001f600 \u0000"),
        {},
        200,
        None,
    ),
    ("ok-empty-content", "POST", "/v1/chat/completions", M(role="user", content=""), {}, 200, None),
    ("ok-model-card", "GET", "/v1/models/alpha", None, {}, 200, None),
]


# --- classes of inputs, each at several sizes or places (similar inputs will be tried again) -------------
def with_raw(body: dict, raw: str) -> bytes:
    """`body` as JSON with the string "@RAW@" replaced by raw JSON text (nesting json.dumps cannot write)."""
    return json.dumps(body).replace('"@RAW@"', raw).encode()


def schema_nested(levels: int) -> str:
    """A JSON schema whose objects and lists nest `levels` deep (each property level is two)."""
    n = levels // 2
    return '{"type": "object", "properties": {"a": ' * n + '{"type": "string"}' + "}}" * n


def arguments_nested(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


def tool(parameters=None, **function) -> list[dict]:
    return [{"type": "function", "function": {"name": "get_weather", **function, "parameters": parameters}}]


def assistant_calls(arguments: str, **call) -> list[dict]:
    function = {"name": "get_weather", "arguments": arguments}
    return [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": function} | call],
        },
    ]


ARGS = "messages[1].tool_calls[0].function.arguments"
CORPUS += [
    # Sampling knobs at and past the edges of what the sampler can work with (a 1e-40 temperature overflows).
    *[
        (f"temperature-{t!r}", "POST", "/v1/chat/completions", J(temperature=t), {}, 400, "temperature")
        for t in (1e-40, 5e-324, 1e-4, 0.000999, 2.000001)
    ],
    *[
        (f"top-p-{p!r}", "POST", "/v1/chat/completions", J(top_p=p), {}, 400, "top_p")
        for p in (1e-45, 5e-324, 1e-4, 0.000999, 1.000001)
    ],
    *[
        (f"ok-temperature-{t!r}", "POST", "/v1/chat/completions", J(temperature=t), {}, 200, None)
        for t in (0, 0.0, 0.001, 1, 2)
    ],
    *[
        (f"ok-top-p-{p!r}", "POST", "/v1/chat/completions", J(top_p=p, temperature=1), {}, 200, None)
        for p in (0.001, 0.5, 1)
    ],
    # Tool parameters nested deep: refused before anything renders them (900 levels made 3 million tokens).
    *[
        (
            f"tool-parameters-{n}-deep",
            "POST",
            "/v1/chat/completions",
            with_raw(J(tools=tool("@RAW@")), schema_nested(n)),
            {},
            400,
            "tools",
        )
        for n in (34, 100, 900)
    ],
    # ... so deep that the JSON body itself cannot be read.
    *[
        (
            f"tool-parameters-{n}-deep",
            "POST",
            "/v1/chat/completions",
            with_raw(J(tools=tool("@RAW@")), schema_nested(n)),
            {},
            400,
            None,
        )
        for n in (5_000, 20_000)
    ],
    (
        "ok-tool-parameters-30-deep",
        "POST",
        "/v1/chat/completions",
        with_raw(J(tools=tool("@RAW@")), schema_nested(30)),
        {},
        200,
        None,
    ),
    # Tool-call arguments (a JSON string) nested deep, below and above json's own recursion limit.
    *[
        (
            f"arguments-{n}-deep",
            "POST",
            "/v1/chat/completions",
            J(messages=assistant_calls(arguments_nested(n))),
            {},
            400,
            ARGS,
        )
        for n in (33, 900, 2_000, 100_000)
    ],
    (
        "ok-arguments-30-deep",
        "POST",
        "/v1/chat/completions",
        J(messages=assistant_calls(arguments_nested(30))),
        {},
        200,
        None,
    ),
    # Lone surrogates, escaped inside JSON text or as JSON strings, in every field that reaches the prompt.
    (
        "arguments-escaped-surrogate",
        "POST",
        "/v1/chat/completions",
        J(messages=assistant_calls('{"a": "\\ud800"}')),
        {},
        400,
        ARGS,
    ),
    (
        "arguments-escaped-surrogate-key",
        "POST",
        "/v1/chat/completions",
        J(messages=assistant_calls('{"\\udfff": 1}')),
        {},
        400,
        ARGS,
    ),
    (
        "arguments-surrogate",
        "POST",
        "/v1/chat/completions",
        J(messages=assistant_calls('{"a": "\ud800"}')),
        {},
        400,
        ARGS,
    ),
    (
        "call-id-surrogate",
        "POST",
        "/v1/chat/completions",
        J(messages=assistant_calls("{}", id="\ud800")),
        {},
        400,
        "messages[1].tool_calls[0].id",
    ),
    (
        "tool-description-surrogate",
        "POST",
        "/v1/chat/completions",
        J(tools=tool(description="\ud800")),
        {},
        400,
        "tools[0].function.description",
    ),
    *[
        (f"tool-parameters-surrogate-{where}", "POST", "/v1/chat/completions", J(tools=tool(params)), {}, 400, "tools")
        for where, params in (
            ("value", {"type": "object", "properties": {"city": {"type": "string", "description": "\ud800"}}}),
            ("key", {"type": "object", "properties": {"\udc00": {"type": "string"}}}),
            ("enum", {"type": "object", "properties": {"c": {"type": "string", "enum": ["a", "\ud83d"]}}}),
            ("required", {"type": "object", "required": ["\ud800"]}),
            ("default", {"type": "object", "properties": {"c": {"default": {"x": ["\udfff"]}}}}),
        )
    ],
    # Tool schemas the tool formats cannot write (LLaMA-Factory's `default` format reads them field by field).
    *[
        (f"tool-schema-{what}", "POST", "/v1/chat/completions", J(tools=tool(params)), {}, 400, param)
        for what, params, param in (
            ("string", "object", "tools[0].function.parameters"),
            ("list", [{"type": "string"}], "tools[0].function.parameters"),
            ("number", 5, "tools[0].function.parameters"),
            ("properties-string", {"properties": "city"}, "tools"),
            ("properties-list", {"properties": [{"type": "string"}]}, "tools"),
            ("property-string", {"properties": {"city": "string"}}, "tools"),
            ("property-null", {"properties": {"city": None}}, "tools"),
            ("property-list", {"properties": {"city": ["string"]}}, "tools"),
            ("required-string", {"properties": {}, "required": "city"}, "tools"),
            ("required-numbers", {"required": [1, 2]}, "tools"),
            ("enum-string", {"properties": {"c": {"enum": "ab"}}}, "tools"),
            ("enum-object", {"properties": {"c": {"enum": {"a": 1}}}}, "tools"),
            ("items-string", {"properties": {"c": {"type": "array", "items": "string"}}}, "tools"),
            ("items-list", {"properties": {"c": {"type": "array", "items": [{"type": "string"}]}}}, "tools"),
            ("type-number", {"properties": {"c": {"type": 5}}}, "tools"),
            ("type-object", {"type": {"a": 1}}, "tools"),
            ("description-number", {"properties": {"c": {"description": 5}}}, "tools"),
            ("nested-property-string", {"properties": {"c": {"properties": {"d": "x"}}}}, "tools"),
        )
    ],
    (
        "ok-tool-schema-rich",
        "POST",
        "/v1/chat/completions",
        J(
            tools=tool(
                {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "a city", "enum": ["Paris", "Zürich", 3]},
                        "days": {"type": ["integer", "null"]},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
                    },
                    "required": ["city"],
                }
            )
        ),
        {},
        200,
        None,
    ),
    ("ok-tool-without-parameters", "POST", "/v1/chat/completions", J(tools=tool()), {}, 200, None),
    # Deep nesting in fields that expect something flat: a type error naming the field, at any depth.
    *[
        (
            f"{field}-{n}-deep",
            "POST",
            "/v1/chat/completions",
            with_raw(J(**{field: "@RAW@"}), "[" * n + "]" * n),
            {},
            400,
            param,
        )
        for field, param in (
            ("tool_choice", "tool_choice"),
            ("stop", "stop[0]"),
            ("user", "user"),
            ("model", "model"),
            ("seed", "seed"),
            ("stream_options", "stream_options"),
        )
        for n in (40, 900)
    ],
    *[
        (
            f"content-{n}-deep",
            "POST",
            "/v1/chat/completions",
            with_raw(M(role="user", content="@RAW@"), "[" * n + "]" * n),
            {},
            400,
            "messages[0].content[0]",
        )
        for n in (40, 900)
    ],
]


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_corpus(server, case, caplog):
    name, method, path, body, headers, status, param = case
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | headers
    headers = {k: v for k, v in headers.items() if v}
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = httpx.request(method, server.url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text[:500]
    assert "Traceback" not in r.text
    assert not [rec for rec in caplog.records if rec.levelno >= 40], "the server logged an error"
    if status == 200:
        return
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"] and len(error["message"]) < 600
    if param:  # the message names the field
        assert param.split("[")[0].split(".")[0] in error["message"]
    if "context" in name:  # both lengths are named
        assert "1024" in error["message"] and "tokens" in error["message"]


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes as they are (a lying Content-Length, a chunked body) and read the status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_request_size_limit_is_checked_before_the_body_is_read(server):
    # Content-Length says 10 MB: refused at once, without waiting for (or reading) the body.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 10000000\r\n\r\n"
    )
    t0 = time.perf_counter()
    status, body = raw_request(server.port, head, b'{"model": ')
    assert status == 413 and time.perf_counter() - t0 < 5
    assert b'"code": "request_too_large"' in body
    # A chunked body (no Content-Length) is counted as it arrives.
    chunk = b"x" * 300_000

    def chunks():
        for _ in range(5):
            yield chunk

    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_large_prompt_does_not_stall_other_requests(server):
    """The prompt is rendered and tokenized off the event loop: /health answers while it is counted."""
    big = json.dumps(M(role="user", content="apple banana cherry " * 45_000)).encode()  # ~0.9 MB
    result = {}

    def send():
        result["r"] = httpx.post(
            server.url + "/v1/chat/completions",
            content=big,
            timeout=120,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )

    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.02)
    sender.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert slowest < 1.0, f"/health took {slowest:.2f}s while a large prompt was tokenized"


def test_health_shows_no_filesystem_path(server, tiny_model):
    text = httpx.get(server.url + "/health").text
    assert str(tiny_model) not in text and "/" not in text


def test_a_bug_is_a_500_in_openai_shape_with_a_request_id(server, engine, monkeypatch, caplog):
    def broken(messages):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(engine, "step", lambda *a, **k: broken(a))
    r = httpx.post(server.url + "/v1/chat/completions", json=J(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 500 and "Traceback" not in r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and "request id" in error["message"]
    request_id = error["message"].split("request id ")[1].split(";")[0]
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
    # A bug in the request handling itself goes through the app's catch-all handler, same shape.
    import loralab.api

    monkeypatch.setattr(loralab.api, "to_messages", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json=J(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json" and "Traceback" not in r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    request_id = error["message"].split("request id ")[1].split(";")[0]
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_a_template_that_refuses_a_conversation_is_a_400(tiny_model, tmp_path):
    """Gemma/Mistral-style templates call raise_exception(...) for conversations they do not support."""
    from fastapi.testclient import TestClient

    from loralab.api import create_app
    from loralab.config import Config
    from loralab.generate import Engine
    from loralab.testing import copy_refusing_system_prompts

    model = copy_refusing_system_prompts(tiny_model, tmp_path / "no-system-model")
    engine = Engine(Config(model_name_or_path=str(model), max_new_tokens=4, torch_threads=1))
    with TestClient(create_app(engine)) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": str(model),
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages" and "System role not supported" in r.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json={"model": str(model), "messages": HELLO})
        assert ok.status_code == 200


def test_load_with_disconnecting_clients(server, engine):
    """16 clients, streaming and not, some hanging up mid-reply: no 5xx, and a fresh request is answered promptly."""
    import asyncio

    statuses: list[int] = []
    cancelled_before = httpx.get(server.url + "/health").json()["cancelled"]
    t1 = time.perf_counter()
    assert (
        httpx.post(
            server.url + "/v1/chat/completions", json=J(max_tokens=4), headers={"Authorization": f"Bearer {KEY}"}
        ).status_code
        == 200
    )
    idle = time.perf_counter() - t1

    async def one(client, i):
        hang_up = i % 4 in (0, 1)  # half of the clients leave mid-reply: streaming (i % 4 == 0) or not (1)
        body = {
            "model": ["alpha", "beta", engine.base_name][i % 3],
            "max_tokens": 950 if hang_up else 24,
            "messages": [{"role": "user", "content": f"Tell me a long story about the number {i}."}],
            "stream": i % 2 == 0,
        }
        url = server.url + "/v1/chat/completions"
        if body["stream"]:
            async with client.stream("POST", url, json=body) as r:
                statuses.append(r.status_code)
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if hang_up and n >= 4:
                        return
        elif hang_up:
            with pytest.raises(httpx.TimeoutException):
                await client.post(url, json=body, timeout=0.3)
        else:
            statuses.append((await client.post(url, json=body)).status_code)

    async def run():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {KEY}"}) as c:
            for round_ in range(2):
                await asyncio.gather(*(one(c, round_ * 16 + i) for i in range(16)))

    t0 = time.perf_counter()
    asyncio.run(run())
    took = time.perf_counter() - t0
    assert statuses and all(s == 200 for s in statuses), statuses
    # The hung-up requests were cancelled, so a fresh request does not wait behind them.
    t1 = time.perf_counter()
    r = httpx.post(
        server.url + "/v1/chat/completions", json=J(max_tokens=4), headers={"Authorization": f"Bearer {KEY}"}
    )
    fresh = time.perf_counter() - t1
    assert r.status_code == 200 and fresh < 2.0, f"fresh request took {fresh:.2f}s after the load"
    health = httpx.get(server.url + "/health").json()
    assert health["cancelled"] - cancelled_before >= 12  # 16 hung up; a row may also end on its own first
    print(
        f"load: 32 requests from 16 clients in {took:.1f}s, fresh request {fresh * 1000:.0f} ms "
        f"(idle server: {idle * 1000:.0f} ms), {health['cancelled'] - cancelled_before} cancelled"
    )


def test_a_bad_sampling_request_leaves_the_streams_in_flight_untouched(server, engine):
    """Six streams are decoding when a request with a temperature the sampler cannot use arrives: it is
    a 400 before it reaches the batch, and every stream runs to its end with no error event."""
    headers = {"Authorization": f"Bearer {KEY}"}
    started = threading.Barrier(7)
    results: dict[int, list[str]] = {}

    def stream(i: int) -> None:
        body = J(model=["alpha", "beta", engine.base_name][i % 3], max_tokens=48, stream=True, temperature=1, seed=i)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:  # text has streamed: now the bad request comes
                    started.wait(timeout=30)
            if len(lines) < 4:  # (a reply that ended at once)
                started.wait(timeout=30)
            results[i] = lines

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    for bad in ({"temperature": 1e-40}, {"top_p": 1e-45}, {"temperature": 5e-324, "top_p": 1e-45}):
        r = httpx.post(server.url + "/v1/chat/completions", json=J(stream=True, **bad), headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] in bad
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(6))
    for lines in results.values():
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def test_only_the_servers_own_host_names_are_answered(engine):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends Host: evil.example."""
    from fastapi.testclient import TestClient

    from loralab.api import allowed_hosts_for, create_app

    assert allowed_hosts_for("127.0.0.1", None) == ["127.0.0.1", "localhost", "::1"]
    assert allowed_hosts_for("0.0.0.0", None) is None and allowed_hosts_for("10.1.2.3", None) == ["10.1.2.3"]
    assert allowed_hosts_for("127.0.0.1", ["chat.example"]) == ["chat.example"]
    app = create_app(engine, allowed_hosts=allowed_hosts_for("127.0.0.1", None))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "127.0.0.1"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "localhost.:80"):
            r = client.post("/v1/chat/completions", json=J(), headers={"host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    with TestClient(create_app(engine, allowed_hosts=["*"]), base_url="http://evil.example") as client:
        assert client.get("/health").status_code == 200
