"""`loralab api` driven by the official openai client: base model + two adapters in one server."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loralab.testing import make_random_adapter

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    yield Engine(Config(model_name_or_path=str(tiny_model), adapters=tiny_adapters, max_new_tokens=16,
                        torch_threads=1))
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
    chunks = list(client.chat.completions.create(model="beta", messages=HELLO, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
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
        model="alpha", max_tokens=6,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    parts = client.chat.completions.create(
        model="alpha", max_completion_tokens=6,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
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
        ({"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         400, "messages[0].content[0].type"),
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
    r = httpx.post(server.url + "/v1/chat/completions", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
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
    alone = [client.chat.completions.create(model="alpha", messages=p, max_tokens=8).choices[0].message.content
             for p in prompts[:3]]
    before = httpx.get(server.url + "/health").json()["largest_batch"]

    def ask(p):
        return client.chat.completions.create(model="alpha", messages=p, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, prompts))
    assert together[:3] == alone  # greedy batched output equals one-at-a-time output
    assert max(before, httpx.get(server.url + "/health").json()["largest_batch"]) > 1


def test_disconnect_mid_stream_cancels_generation(server, engine):
    long = [{"role": "user", "content": "Tell me a long story."}]
    cancelled = httpx.get(server.url + "/health").json()["cancelled"]
    body = {"model": "alpha", "messages": long, "max_tokens": 900, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
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
            return client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": text}],
                                                  max_tokens=4).choices[0].finish_reason
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
        [str(Path(sys.executable).with_name("loralab")), "api", f"model_name_or_path={tiny_model}",
         "max_new_tokens=8", "torch_threads=1", "--adapter", f"tuned={tiny_adapters['alpha']}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list()] == [str(tiny_model), "tuned"]
        r = client.chat.completions.create(model="tuned", messages=HELLO)
        assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
