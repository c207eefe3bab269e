"""`loralab api` under attack on loopback, with the server settings `loralab api` runs with (api.server_config):
stalled headers and bodies are cut off, and a small request stays fast while oversized prompts, stalled
connections and unusable sampling values arrive together; no 5xx, no traceback in the server's output."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loralab.testing import free_port, stalled_connections

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 2.0
SMALL = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def engine(tiny_model):
    import torch

    from loralab.config import Config
    from loralab.generate import Engine

    threads = torch.get_num_threads()
    yield Engine(Config(model_name_or_path=str(tiny_model), max_new_tokens=16, torch_threads=1))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    """The app and uvicorn settings of `loralab api` (short timeouts, so the test is short)."""
    import uvicorn

    from loralab.api import allowed_hosts_for, create_app, server_config

    app = create_app(engine, allowed_hosts=allowed_hosts_for("127.0.0.1", None), body_timeout_s=BODY_TIMEOUT_S)
    port = free_port()
    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, header_timeout_s=HEADER_TIMEOUT_S))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    srv.url, srv.port, srv.model = f"http://127.0.0.1:{port}", port, engine.base_name
    yield srv
    srv.should_exit = True
    thread.join(timeout=40)
    assert not thread.is_alive(), "the server did not shut down"


def closed_by_server(s: socket.socket, wait: float) -> tuple[bool, bytes]:
    s.settimeout(wait)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
        return True, data
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data
    finally:
        s.close()


def small_request_s(url: str, model: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=SMALL | {"model": model}, timeout=60)
    return time.perf_counter() - t0, r.status_code


def test_stalled_headers_and_bodies_are_cut_off(server, capfd):
    t0 = time.perf_counter()
    heads, bodies = stalled_connections(server.port, 50), stalled_connections(server.port, 5, body=True)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # answered meanwhile
    closed = [closed_by_server(s, HEADER_TIMEOUT_S + 5) for s in heads]
    assert all(ok and not data for ok, data in closed), "a connection stalled in its headers stayed open"
    for s in bodies:  # a body that never completes: 408 in OpenAI's shape, then the connection closes
        ok, data = closed_by_server(s, BODY_TIMEOUT_S + 5)
        assert ok and data.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in data
    assert time.perf_counter() - t0 < HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 8
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-2000:]


def test_a_small_request_stays_fast_under_attack(server, capfd):
    """200 stalled connections, 30 prompts of ~1 MB (far over the context), 4 requests with tool schemas
    nested 900 deep and 6 with sampling values the sampler cannot use, all at once: a 3-token request is
    answered in a few seconds on a busy 2-core machine, and nothing is a 5xx."""
    idle, status = small_request_s(server.url, server.model)
    assert status == 200
    head = {"Content-Type": "application/json"}
    big = json.dumps(
        {"model": server.model, "messages": [{"role": "user", "content": "apple banana cherry " * 47_000}]}
    ).encode()
    deep = ('{"type": "object", "properties": {"a": ' * 450) + '{"type": "string"}' + "}}" * 450
    deep_tools = json.dumps(
        SMALL | {"model": server.model, "tools": [{"type": "function", "function": {"name": "f", "parameters": "@"}}]}
    ).replace('"@"', deep)
    bad_sampling = [SMALL | {"model": server.model} | b for b in ({"temperature": 1e-40}, {"top_p": 1e-45})] * 3
    statuses: list[int] = []

    def send(content: bytes | str) -> None:
        statuses.append(
            httpx.post(server.url + "/v1/chat/completions", content=content, headers=head, timeout=120).status_code
        )

    sockets = stalled_connections(server.port, 200)
    with ThreadPoolExecutor(40) as pool:
        jobs = [pool.submit(send, big) for _ in range(30)]
        jobs += [pool.submit(send, deep_tools) for _ in range(4)]
        jobs += [pool.submit(send, json.dumps(b)) for b in bad_sampling]
        time.sleep(0.3)  # the attack is under way
        latency, status = small_request_s(server.url, server.model)
        for job in jobs:
            job.result()
    for s in sockets:
        s.close()
    assert status == 200
    assert sorted(set(statuses)) == [400] and len(statuses) == 40, statuses
    print(
        f"attack: small request {latency * 1000:.0f} ms (idle {idle * 1000:.0f} ms) with 200 stalled, 30 x 1 MB, "
        f"4 x 900-deep tools, 6 bad sampling in flight"
    )
    assert latency < 10.0, f"a 3-token request took {latency:.1f}s under attack"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-2000:]


def test_connection_errors_are_one_line_a_minute_not_a_traceback_each(caplog):
    """~21,000 stalled connections once wrote 206,837 tracebacks (89 MB): asyncio logs every failed accept
    (too many open files) and every reset with a traceback. They become one warning line per message a minute."""
    import errno
    import logging

    from loralab.api import quiet_connection_errors

    quiet_connection_errors()
    asyncio_log = logging.getLogger("asyncio")
    for _ in range(1000):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            asyncio_log.error("socket.accept() out of system resource\nsocket: <socket>", exc_info=True)
    try:
        raise ValueError("a bug, not a connection")
    except ValueError:
        asyncio_log.error("Exception in callback", exc_info=True)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 2
    assert records[0].levelname == "WARNING" and records[0].exc_info is None
    assert records[0].getMessage() == "socket.accept() out of system resource: OSError: [Errno 24] Too many open files"
    assert records[1].exc_info is not None  # anything else keeps its traceback
