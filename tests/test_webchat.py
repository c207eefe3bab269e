"""`loralab webchat`: the chat function in-process, and the page end to end in headless Chromium."""

import os
import string

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from loralab.testing import CHROMIUM, CHROMIUM_FLAGS, free_port  # noqa: E402 (after the analytics switch)


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_adapters):
    import torch

    from loralab.config import Config
    from loralab.generate import Engine

    threads = torch.get_num_threads()
    yield Engine(
        Config(
            model_name_or_path=str(tiny_model),
            adapters={"alpha": tiny_adapters["alpha"]},
            max_new_tokens=64,
            torch_threads=1,
        )
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model, tmp_path_factory):
    from loralab.testing import make_random_adapter as make_adapter

    return {"alpha": str(make_adapter(tiny_model, tmp_path_factory.mktemp("webchat-adapter") / "alpha", 1))}


def final(gen):
    texts = list(gen)
    return texts[-1], texts


def test_respond_streams_and_switches_models(engine):
    from loralab.generate import GenerationSettings
    from loralab.webchat import make_respond

    respond = make_respond(engine)
    base, texts = final(respond("hello", [], engine.base_name, "", 0.0, 1.0, 12))
    assert len(texts) > 1 and all(b.startswith(a) for a, b in zip(texts, texts[1:])), "replies grow as they stream"
    hello = [[{"role": "user", "content": "hello"}]]
    assert base == engine.generate(hello, GenerationSettings(max_new_tokens=12))[0].text
    tuned, _ = final(respond("hello", [], "alpha", "", 0.0, 1.0, 12))
    assert tuned != base
    # gradio 6 hands history back with content as a list of text parts; the system box is used.
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": base}]},
    ]
    again, _ = final(respond("more", history, engine.base_name, "Be brief.", 0.0, 1.0, 12))
    expected = engine.generate(
        [
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": base},
                {"role": "user", "content": "more"},
            ]
        ],
        GenerationSettings(max_new_tokens=12),
    )[0].text
    assert again == expected
    with pytest.raises(gr.Error, match="unknown model"):
        list(respond("hello", [], "nope", "", 0.0, 1.0, 12))
    with pytest.raises(gr.Error, match="context"):
        list(respond("word " * 900, [], "alpha", "", 0.0, 1.0, 500))


def test_login_is_required_when_set_and_guessing_is_braked(engine):
    import time

    import httpx

    from loralab.webchat import LoginGuard, build_demo, launch

    port = free_port()
    demo = build_demo(engine)
    launch(
        demo,
        "127.0.0.1",
        port,
        auth=LoginGuard("ada", "s3cret", max_failures=3, window_s=2.5, delay_s=0.1),
        block=False,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/config").status_code in (401, 403)
        with httpx.Client() as c:
            assert c.post(url + "/login", data={"username": "ada", "password": "s3cret"}).status_code == 200
            assert c.get(url + "/config").status_code == 200
        # Guessing: failures are answered one at a time after a delay, then refused outright for a while.
        t0 = time.perf_counter()
        codes = [
            httpx.post(url + "/login", data={"username": "ada", "password": f"guess{i}"}).status_code for i in range(5)
        ]
        assert codes == [400, 400, 400, 429, 429] and time.perf_counter() - t0 >= 0.3
        refused = httpx.post(url + "/login", data={"username": "ada", "password": "s3cret"})
        assert refused.status_code == 429 and "too many failed logins" in refused.text
        # The brake is per client: someone else (another loopback address) is neither locked out nor slowed.
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
            assert other.post(url + "/login", data={"username": "ada", "password": "s3cret"}).status_code == 200
            assert other.post(url + "/login", data={"username": "ada", "password": "nope"}).status_code == 400
            assert other.post(url + "/login", data={"username": "ada", "password": "s3cret"}).status_code == 200
        time.sleep(2.6)  # the window passes: the right password works again
        assert httpx.post(url + "/login", data={"username": "ada", "password": "s3cret"}).status_code == 200
    finally:
        demo.close()


def test_rejected_inputs_are_errors_in_the_page_without_a_traceback_in_the_log(engine, capfd):
    """Gradio's API accepts any value: out-of-range sliders, unknown models, oversize conversations."""
    from gradio_client import Client

    from loralab.webchat import build_demo, launch

    port = free_port()
    demo = build_demo(engine)
    launch(demo, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        base = engine.base_name
        ok = client.predict("hello", base, "", 0.0, 1.0, 4, api_name="/respond")
        assert isinstance(ok, str)
        bad = [
            ("hello", "nope", "", 0.0, 1.0, 4, "not in the list of choices"),
            ("hello", base, "", 0.0, 1.0, -5, "less than minimum"),
            ("hello", base, "", 7.0, 1.0, 4, "greater than maximum"),
            ("hello", base, "", 0.0, 0.0, 4, "less than minimum"),
            ("word " * 1100, base, "", 0.0, 1.0, 60, "context"),
            # Sampling values the sampler cannot work with, at and past the edges; a missing message.
            ("hello", base, "", 1e-40, 1.0, 4, "temperature"),
            ("hello", base, "", 5e-324, 1.0, 4, "temperature"),
            ("hello", base, "", 0.0009, 1.0, 4, "temperature"),
            (None, base, "", 0.0, 1.0, 4, "message"),
            ("hello", base, None, 0.0, 1.0, 4, None),
            ("hello\ud800", base, "", 0.0, 1.0, 4, "surrogate|invalid input"),
        ]
        for *args, expected in bad:
            if expected is None:  # accepted
                assert isinstance(client.predict(*args, api_name="/respond"), str)
                continue
            with pytest.raises(Exception, match=expected):
                client.predict(*args, api_name="/respond")
        # Sampling at the smallest accepted temperature works.
        assert isinstance(client.predict("hello", base, "", 0.001, 0.05, 4, api_name="/respond"), str)
    finally:
        demo.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]


def test_serve_refuses_half_a_login(engine, monkeypatch):
    from loralab.config import Config
    from loralab.errors import LoralabError
    from loralab.webchat import serve

    monkeypatch.delenv("WEBCHAT_PASSWORD", raising=False)
    with pytest.raises(LoralabError, match="--username/--password"):
        serve(Config(), username="ada")


def alnum(text: str) -> str:
    return "".join(ch for ch in text if ch in string.ascii_letters + string.digits)


def test_page_streams_a_reply_in_a_real_browser(engine, artifacts_dir, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: install Debian's chromium (apt-get install chromium; .ci/run does this)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="python package playwright (test extra) missing")
    from loralab.webchat import build_demo, launch

    port = free_port()
    demo = build_demo(engine)
    launch(demo, "127.0.0.1", port, block=False)
    outside = []  # every request that tried to leave the machine
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1100, "height": 800},
            )

            def only_local(route):
                if route.request.url.startswith(f"http://127.0.0.1:{port}"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            browser.route("**/*", only_local)
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.locator("#message textarea")
            box.wait_for(timeout=60_000)
            # Record every text the reply bubble shows, to see it grow while streaming.
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll('#chatbot .bot');
                    if (!bots.length) return;
                    const t = bots[bots.length - 1].innerText;
                    if (t && window.seen[window.seen.length - 1] !== t) window.seen.push(t);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            box.fill("Hello there")
            box.press("Enter")
            page.locator("#chatbot .bot").last.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => !document.querySelector('#message .stop-button') && window.seen.length > 0", timeout=60_000
            )
            page.wait_for_timeout(300)
            page.screenshot(path=str(artifacts_dir / "webchat.png"), full_page=True)
            shown = page.locator("#chatbot .bot").last.inner_text()
            seen = page.evaluate("window.seen")
            user_text = page.locator("#chatbot .user").last.inner_text()

            # Clear the history, switch to the base model, ask again.
            page.get_by_role("button", name="Clear").click()
            page.wait_for_function("() => !document.querySelector('#chatbot .bot, #chatbot .user')", timeout=30_000)
            page.get_by_role("combobox", name="model (base or adapter)").click()
            page.get_by_role("option", name=engine.base_name).click()
            box.fill("Hello there")
            box.press("Enter")
            page.locator("#chatbot .bot").last.wait_for(timeout=60_000)
            page.wait_for_function("() => !document.querySelector('#message .stop-button')", timeout=60_000)
            page.wait_for_timeout(300)
            from_base = page.locator("#chatbot .bot").last.inner_text()
            turns = page.locator("#chatbot .bot").count()
            browser.close()
    finally:
        demo.close()
    from loralab.generate import GenerationSettings

    expected = engine.generate(
        [[{"role": "user", "content": "Hello there"}]], GenerationSettings(max_new_tokens=64), adapter="alpha"
    )[0].text
    base = engine.generate([[{"role": "user", "content": "Hello there"}]], GenerationSettings(max_new_tokens=64))[
        0
    ].text
    assert turns == 1 and alnum(from_base) == alnum(base) != alnum(expected), (from_base, base)
    assert "Hello there" in user_text
    assert alnum(shown) and alnum(shown) == alnum(expected), (shown, expected)
    assert len(seen) > 1, f"the reply did not stream: {seen}"
    assert outside == [], f"the page tried to reach the network: {outside}"
    assert (artifacts_dir / "webchat.png").stat().st_size > 10_000
