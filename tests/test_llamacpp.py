"""infer_backend: llamacpp: the engine's rows decoded by llama.cpp (llama-cpp-python), prompts as loralab's token ids.

The tests that run llama.cpp use builtin SmolLM2, whose packaged Q4_1 GGUF llama.cpp reads directly, an
f16 GGUF of it (parity with the HF engine), and the tiny model's GGUFs (LoRA adapters); they skip when
llama-cpp-python is absent.
"""

import threading

import pytest

from loralab.config import Config
from loralab.errors import LoralabError
from loralab.llamacpp_backend import adapter_gguf, model_gguf

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}],
]


def test_a_model_folder_is_refused_with_the_export_command(tiny_model):
    with pytest.raises(LoralabError, match=r"model_name_or_path: .*needs a \.gguf.*loralab export"):
        model_gguf(Config(model_name_or_path=str(tiny_model), infer_backend="llamacpp"))
    with pytest.raises(LoralabError, match="GGUF file .* not found"):
        model_gguf(Config(model_name_or_path="/nowhere/model.gguf", infer_backend="llamacpp"))


def test_adapter_needs_exactly_one_lora_gguf(tmp_path):
    with pytest.raises(LoralabError, match=r"adapter 'a': infer_backend: llamacpp needs a llama.cpp LoRA GGUF"):
        adapter_gguf("a", str(tmp_path))
    (tmp_path / "one.gguf").write_bytes(b"")
    assert adapter_gguf("a", str(tmp_path)) == tmp_path / "one.gguf"
    assert adapter_gguf("a", str(tmp_path / "one.gguf")) == tmp_path / "one.gguf"
    (tmp_path / "two.gguf").write_bytes(b"")
    with pytest.raises(LoralabError, match="several .gguf files"):
        adapter_gguf("a", str(tmp_path))


def test_backend_absent_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from loralab.llamacpp_backend import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(LoralabError, match=r"loralab\[llamacpp\]"):
        check_installed()


# --- llama.cpp itself ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpp_engine():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'loralab[llamacpp]')")
    from loralab.generate import Engine

    return Engine(
        Config(
            model_name_or_path="builtin:smollm2-135m-instruct",
            infer_backend="llamacpp",
            torch_threads=1,
            max_new_tokens=24,
        )
    )


def test_stream_generate_and_prefix_reuse_agree(cpp_engine):
    from loralab.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=24)
    replies = cpp_engine.generate(PROMPTS, settings)
    assert all(r.text and r.finish_reason in ("stop", "length") for r in replies)
    assert replies[0].prompt_tokens == len(cpp_engine.prompt_ids(PROMPTS[0]))
    streamed = "".join(cpp_engine.stream(PROMPTS[0], settings))
    assert streamed == replies[0].text
    # the same prompt again: the cached prefix is reused, and the reply does not change
    reused = cpp_engine.stats["prompt_tokens_reused"]
    assert cpp_engine.generate(PROMPTS[:1], settings)[0].text == replies[0].text
    assert cpp_engine.stats["prompt_tokens_reused"] - reused == replies[0].prompt_tokens - 1


def test_length_stop_strings_and_seeded_sampling(cpp_engine):
    from loralab.generate import GenerationSettings

    short = cpp_engine.generate(PROMPTS[1:2], GenerationSettings(max_new_tokens=3))[0]
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    full = cpp_engine.generate(PROMPTS[1:2], GenerationSettings(max_new_tokens=24))[0].text
    word = full.split()[2]
    cut = cpp_engine.generate(PROMPTS[1:2], GenerationSettings(max_new_tokens=24, stop=[word]))[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(word)]
    sampled = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=7)
    a, b = (cpp_engine.generate(PROMPTS[1:2], sampled)[0].text for _ in range(2))
    assert a == b  # a seeded row has its own RNG
    other = GenerationSettings(**{**sampled.as_dict(), "seed": 8})
    assert any(cpp_engine.generate(PROMPTS[1:2], other)[0].text != a for _ in range(3))


def test_a_cancelled_stream_stops_and_the_next_request_is_served(cpp_engine):
    from loralab.generate import GenerationSettings

    cancelled = cpp_engine.stats["cancelled"]
    stream = cpp_engine.stream(PROMPTS[1], GenerationSettings(max_new_tokens=200))
    next(stream)
    stream.close()
    assert cpp_engine.stats["cancelled"] == cancelled + 1 and not cpp_engine.busy()
    assert cpp_engine.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=4))[0].completion_tokens >= 1


def test_api_serves_llamacpp_with_concurrent_requests(cpp_engine):
    pytest.importorskip("httpx")  # fastapi's TestClient
    from fastapi.testclient import TestClient

    from loralab.api import create_app

    with TestClient(create_app(cpp_engine, max_batch_size=4)) as client:
        body = {"model": cpp_engine.base_name, "messages": PROMPTS[0], "max_tokens": 8}
        one = client.post("/v1/chat/completions", json=body).json()
        results = []

        def ask():
            results.append(client.post("/v1/chat/completions", json=body).json())

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r["choices"][0]["message"]["content"] for r in results] == [one["choices"][0]["message"]["content"]] * 3
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 2


@pytest.mark.slow
def test_an_f16_gguf_gives_the_hf_engines_greedy_replies(cpp_engine, tmp_path):
    """SmolLM2 written as an f16 GGUF (by the export's writer) on llama.cpp vs the HF engine (fp32)."""
    from transformers import AutoModelForCausalLM

    from loralab.generate import Engine, GenerationSettings
    from loralab.gguf_export import write_model_gguf
    from loralab.models import resolve_model_path
    from loralab.ollama import template_starts_with_bos

    hf = Engine(Config(model_name_or_path="builtin:smollm2-135m-instruct", torch_threads=1))
    folder, _ = resolve_model_path("builtin:smollm2-135m-instruct")
    gguf = write_model_gguf(
        AutoModelForCausalLM.from_pretrained(folder),
        hf.tokenizer,
        tmp_path / "smollm2-f16.gguf",
        "f16",
        "smollm2",
        template_starts_with_bos(hf.tokenizer),
    )
    f16 = Engine(Config(model_name_or_path=str(gguf), infer_backend="llamacpp", torch_threads=1))
    assert [f16.prompt_ids(p) for p in PROMPTS] == [hf.prompt_ids(p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=32)
    assert [c.text for c in f16.generate(PROMPTS, settings)] == [c.text for c in hf.generate(PROMPTS, settings)]


# --- LoRA GGUFs on the tiny model (written by `loralab export ... export_gguf=f16`) ----------------


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_model, tmp_path_factory):
    """The tiny model's base GGUF, and for two random adapters: the merged f16 GGUF and the LoRA GGUF."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'loralab[llamacpp]')")
    from transformers import AutoModelForCausalLM

    from loralab.config import load_config
    from loralab.export import export
    from loralab.gguf_export import write_model_gguf
    from loralab.models import load_tokenizer
    from loralab.ollama import template_starts_with_bos
    from loralab.testing import make_random_adapter

    work = tmp_path_factory.mktemp("llamacpp-gguf")
    tokenizer = load_tokenizer(Config(model_name_or_path=str(tiny_model)))
    base = write_model_gguf(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        tokenizer,
        work / "base-f16.gguf",
        "f16",
        "tiny",
        template_starts_with_bos(tokenizer),
    )
    out = {"base": base}
    for name, seed in (("alpha", 1), ("beta", 2)):
        adapter = make_random_adapter(tiny_model, work / f"{name}-peft", seed=seed)
        folder = export(
            load_config(
                None,
                {
                    "model_name_or_path": str(tiny_model),
                    "adapter_name_or_path": str(adapter),
                    "export_dir": str(work / name),
                    "export_gguf": "f16",
                },
            )
        )
        out[name] = (folder / "model-f16.gguf", folder / "adapter.gguf")
    return out


def test_an_export_folder_serves_its_lora_gguf(tiny_ggufs):
    merged, lora = tiny_ggufs["alpha"]
    assert merged.parent == lora.parent  # the export folder holds the merged model and the adapter
    assert adapter_gguf("alpha", str(lora.parent)) == lora


def test_several_lora_ggufs_each_request_its_own(tiny_ggufs):
    from loralab.generate import Engine, GenerationSettings

    settings = GenerationSettings(max_new_tokens=12)
    prompt = [[{"role": "user", "content": "hello there, how are you"}]]
    engine = Engine(
        Config(
            model_name_or_path=str(tiny_ggufs["base"]),
            infer_backend="llamacpp",
            adapters={"alpha": str(tiny_ggufs["alpha"][1]), "beta": str(tiny_ggufs["beta"][1])},
            torch_threads=1,
        )
    )
    order = ["alpha", None, "beta", "alpha", None]  # each switch drops the cache made with the other adapter
    texts = [engine.generate(prompt, settings, adapter=a)[0].text for a in order]
    assert len(set(texts[:3])) == 3  # each adapter changes the reply
    assert texts[3:] == [texts[0], texts[1]]  # switching back gives the same replies: no stale cache
    # the LoRA GGUF on the base gives the merged GGUF's reply (f16 rounding aside: the first tokens)
    for name in ("alpha", "beta"):
        merged = Engine(Config(model_name_or_path=str(tiny_ggufs[name][0]), infer_backend="llamacpp", torch_threads=1))
        with_lora = engine.generate(prompt, settings, adapter=name)[0].text
        assert merged.generate(prompt, settings)[0].text[:8] == with_lora[:8]
    with pytest.raises(LoralabError, match="adapter: 'gamma' is not loaded"):
        engine.generate(prompt, settings, adapter="gamma")


def test_an_adapter_that_is_no_lora_gguf_is_one_line(tiny_ggufs, tmp_path):
    from loralab.generate import Engine

    with pytest.raises(LoralabError, match="adapter 'x': llama.cpp cannot load"):
        Engine(
            Config(
                model_name_or_path=str(tiny_ggufs["base"]),
                infer_backend="llamacpp",
                adapters={"x": str(tiny_ggufs["alpha"][0])},  # a model GGUF, not a LoRA
                torch_threads=1,
            )
        )
