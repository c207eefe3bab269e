"""The generation engine on the tiny models: batching, stopping, streaming, cancelling, sampling."""

import json

import pytest

from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.generate import Engine, GenerationSettings

# Prompts of clearly different lengths, so left padding really happens inside a batch.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the sum of 12 and 30?"}],
    [{"role": "user", "content": "Sort these words: cat, apple, banana. " * 4}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "hot"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 7}],
    [
        {"role": "user", "content": "Write the word in uppercase: apple"},
        {"role": "assistant", "content": "APPLE"},
        {"role": "user", "content": "And banana?"},
    ],
    [{"role": "user", "content": "0123456789 " * 3}],
]
GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(load_config(None, {"model_name_or_path": str(tiny_model)}))


@pytest.fixture(scope="module")
def chatml_engine(tiny_chatml_model):
    return Engine(load_config(None, {"model_name_or_path": str(tiny_chatml_model)}))


@pytest.mark.parametrize("which", ["engine", "chatml_engine"])
def test_batched_greedy_equals_one_at_a_time(request, which):
    eng = request.getfixturevalue(which)
    lengths = {len(eng.prompt_ids(c)) for c in CONVERSATIONS}
    assert len(lengths) == len(CONVERSATIONS)  # all different: every batch is padded
    single = [eng.generate([c], GREEDY, batch_size=1)[0] for c in CONVERSATIONS]
    for batch_size in (3, 16):
        batched = eng.generate(CONVERSATIONS, GREEDY, batch_size=batch_size)
        assert batched == single  # same text, token counts and finish reasons, in input order
    assert all(c.completion_tokens == 12 and c.finish_reason == "length" for c in single)
    assert [c.prompt_tokens for c in single] == [len(eng.prompt_ids(c)) for c in CONVERSATIONS]


def test_template_stop_tokens(engine, chatml_engine):
    assert engine.tokenizer.convert_tokens_to_ids("<|eot_id|>") in engine.stop_ids
    assert chatml_engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in chatml_engine.stop_ids


def test_stop_token_ends_reply(engine, monkeypatch):
    """A stop token id ends the row: excluded from the text and counts, finish_reason 'stop'."""
    conv = CONVERSATIONS[0]
    ids = engine.model.generate(
        __import__("torch").tensor([engine.prompt_ids(conv)]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=engine.stop_ids,
    )[0, len(engine.prompt_ids(conv)) :].tolist()
    # The random tiny model never says <|eot_id|>; declare one of its own tokens a stop token instead.
    j = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids + [ids[j]])
    out = engine.generate([conv, CONVERSATIONS[1]], GREEDY, batch_size=2)[0]
    assert out.finish_reason == "stop" and out.completion_tokens == j
    assert out.text == engine.tokenizer.decode(ids[:j], skip_special_tokens=True)


def test_stop_strings_and_streaming(engine):
    full = engine.generate(CONVERSATIONS, GREEDY)
    # A stop string taken from the middle of the first reply; the others may or may not contain it.
    text = full[0].text
    stop = next(
        text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2]
    )
    streamed: dict[int, list[str]] = {}
    out = engine.generate(
        CONVERSATIONS,
        GenerationSettings(max_new_tokens=12, stop=[stop]),
        batch_size=3,
        on_text=lambda i, d: streamed.setdefault(i, []).append(d),
    )
    assert out[0].text == text[: text.find(stop)] and out[0].finish_reason == "stop"
    for i, (c, f) in enumerate(zip(out, full)):
        assert "".join(streamed.get(i, [])) == c.text  # deltas add up to exactly the final text
        assert stop not in c.text
        if stop not in f.text:
            assert c == f
    # several deltas per row: it really streams
    assert max(len(v) for v in streamed.values()) > 3


def test_cancel_one_row(engine):
    full = engine.generate(CONVERSATIONS, GREEDY)
    seen: dict[int, int] = {}

    def on_text(i, delta):
        seen[i] = seen.get(i, 0) + 1
        return not (i == 2 and seen[i] >= 3)  # cancel row 2 after its third delta

    out = engine.generate(CONVERSATIONS, GREEDY, batch_size=4, on_text=on_text)
    assert out[2].finish_reason == "cancelled" and out[2].completion_tokens < 12
    assert full[2].text.startswith(out[2].text)
    assert [o for i, o in enumerate(out) if i != 2] == [o for i, o in enumerate(full) if i != 2]


def test_stream_and_close(engine):
    conv = CONVERSATIONS[3]
    final = engine.generate([conv], GREEDY)[0].text
    assert "".join(engine.stream(conv, GREEDY)) == final
    parts = engine.stream(conv, GenerationSettings(max_new_tokens=200))
    first = next(parts)
    parts.close()  # the consumer went away: generation is cancelled and the thread joined
    assert final.startswith(first)
    assert not engine.busy()  # the cancelled row left the engine
    assert engine.generate([conv], GREEDY)[0].text == final


def alone(eng, conv, settings, adapter=None):
    return eng.generate([conv], settings, adapter=adapter, batch_size=1)[0]


def test_rows_leave_and_join_mid_flight(engine, monkeypatch):
    """Continuous batching: rows finish at different steps (stop token, max_new_tokens), waiting
    requests join the running batch, and every row gets exactly its one-at-a-time greedy output."""
    lengths = [3, 12, 7, 12, 5, 9, 12]
    settings = [GenerationSettings(max_new_tokens=n) for n in lengths]
    expected = [alone(engine, c, s) for c, s in zip(CONVERSATIONS, settings)]
    first = [engine.submit(c, s) for c, s in zip(CONVERSATIONS[:3], settings[:3])]
    for _ in range(4):
        engine.step(max_rows=3)
    assert first[0].done.is_set() and not first[1].done.is_set()  # the 3-token row has left
    later = [engine.submit(c, s) for c, s in zip(CONVERSATIONS[3:], settings[3:])]  # join mid-flight
    engine.run(first + later, max_rows=3)
    assert [r.completion for r in first + later] == expected
    assert [c.completion_tokens for c in expected] == lengths
    assert not engine.busy()


def test_stop_token_rows_finish_at_different_steps(engine, monkeypatch):
    # The random tiny model never says <|eot_id|>: one of its own tokens (from the middle of a
    # reply) is declared a stop token, so rows end at different steps.
    reply = engine.submit(CONVERSATIONS[0], GREEDY)
    engine.run([reply])
    stop = next(t for j, t in enumerate(reply.tokens) if j >= 3 and t not in reply.tokens[:j])
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids + [stop])
    expected = [alone(engine, c, GREEDY) for c in CONVERSATIONS]
    assert len({c.completion_tokens for c in expected}) > 1 and any(c.finish_reason == "stop" for c in expected)
    assert engine.generate(CONVERSATIONS, GREEDY, batch_size=4) == expected


def test_cancelled_row_stops_within_one_step(engine):
    requests = [engine.submit(c, GenerationSettings(max_new_tokens=40)) for c in CONVERSATIONS[:3]]
    for _ in range(5):
        engine.step()
    n = len(requests[1].tokens)
    requests[1].cancel()
    engine.step()
    assert requests[1].done.is_set()
    assert requests[1].completion.finish_reason == "cancelled" and requests[1].completion.completion_tokens == n
    engine.run(requests)
    others = [alone(engine, c, GenerationSettings(max_new_tokens=40)) for c in CONVERSATIONS[:3]]
    assert [requests[0].completion, requests[2].completion] == [others[0], others[2]]
    assert others[1].text.startswith(requests[1].completion.text)


def test_seeded_sample_does_not_depend_on_batch_mates(engine):
    sample = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=3)
    solo = alone(engine, CONVERSATIONS[0], sample)
    mates = [engine.submit(c, GREEDY) for c in CONVERSATIONS[1:4]]
    row = engine.submit(CONVERSATIONS[0], sample)
    engine.run(mates + [row])
    assert row.completion == solo


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    from loralab.testing import make_random_adapter

    root = tmp_path_factory.mktemp("gen-adapters")
    return {name: str(make_random_adapter(tiny_model, root / name, seed)) for name, seed in (("alpha", 1), ("beta", 2))}


def test_mixed_adapters_in_one_batch(tiny_model, adapters):
    eng = Engine(load_config(None, {"model_name_or_path": str(tiny_model)}), adapters)
    jobs = [(c, a) for c in CONVERSATIONS[:3] for a in (None, "alpha", "beta")]
    expected = [alone(eng, c, GREEDY, a) for c, a in jobs]
    assert len({e.text for e in expected[:3]}) == 3  # the adapters really change the output
    requests = [eng.submit(c, GREEDY, adapter=a) for c, a in jobs]
    eng.run(requests)
    assert eng.stats["largest_batch"] == len(jobs)  # all in one batch: peft's mixed-adapter forward
    assert [r.completion for r in requests] == expected


def test_merged_adapter_matches_unmerged(tiny_model, adapters):
    cfg = load_config(None, {"model_name_or_path": str(tiny_model)})
    unmerged = Engine(cfg, {"alpha": adapters["alpha"]})
    merged = Engine(cfg, {"alpha": adapters["alpha"]}, merge=True)
    assert merged.merged and not hasattr(merged.model, "disable_adapter")
    assert merged.generate(CONVERSATIONS, GREEDY, adapter="alpha") == unmerged.generate(
        CONVERSATIONS, GREEDY, adapter="alpha"
    )
    with pytest.raises(LoralabError, match="merged"):
        merged.generate(CONVERSATIONS[:1], GREEDY)


def test_sampling_is_seeded(engine):
    sample = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, top_k=0, seed=7)
    a = engine.generate(CONVERSATIONS[:3], sample)
    b = engine.generate(CONVERSATIONS[:3], sample)
    assert a == b
    other = engine.generate(CONVERSATIONS[:3], GenerationSettings(**{**sample.as_dict(), "seed": 8}))
    greedy = engine.generate(CONVERSATIONS[:3], GREEDY)
    assert other != a and greedy != a
    settings = GenerationSettings.from_config(load_config(None, {"do_sample": True, "temperature": 0.5, "seed": 3}))
    assert settings.do_sample and settings.temperature == 0.5 and settings.seed == 3


def test_bad_settings_and_adapter(engine):
    with pytest.raises(LoralabError, match="max_new_tokens"):
        engine.generate(CONVERSATIONS[:1], GenerationSettings(max_new_tokens=0))
    with pytest.raises(LoralabError, match="top_p"):
        engine.generate(CONVERSATIONS[:1], GenerationSettings(top_p=1.5))
    with pytest.raises(LoralabError, match="not loaded"):
        engine.generate(CONVERSATIONS[:1], GREEDY, adapter="nope")


def test_vllm_backend_missing_is_clear(tiny_model):
    cfg = load_config(None, {"model_name_or_path": str(tiny_model), "infer_backend": "vllm"})
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and CUDA present")
    with pytest.raises(LoralabError, match="infer_backend: vllm") as err:
        Engine(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_smollm2_batched_equals_single():
    eng = Engine(load_config(None, {}))
    convs = [
        [{"role": "user", "content": q}]
        for q in (
            "What is the capital of France?",
            "Give three tips for staying healthy.",
            "Translate 'cat' to French.",
        )
    ]
    settings = GenerationSettings(max_new_tokens=24)
    assert eng.generate(convs, settings, batch_size=3) == [eng.generate([c], settings)[0] for c in convs]


def test_vllm_backend_requests(tiny_model, tmp_path, monkeypatch):
    """The vLLM path with a stand-in `vllm` module (vLLM needs CUDA): what it asks vLLM and what it returns."""
    import importlib.machinery
    import sys
    import types
    from types import SimpleNamespace

    import torch

    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            calls["generate"] = (prompts, params, lora_request)
            return [
                SimpleNamespace(
                    outputs=[
                        SimpleNamespace(text=f"reply {i}", token_ids=[5, 6, 7], finish_reason="length" if i else "stop")
                    ]
                )
                for i in range(len(prompts))
            ]

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    module("vllm", LLM=LLM, SamplingParams=lambda **kw: kw)
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=lambda name, id_, path: (name, id_, path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model), "r": 12}))
    eng = Engine(
        load_config(None, {"model_name_or_path": str(tiny_model), "infer_backend": "vllm"}), {"ad": str(adapter)}
    )
    assert (
        calls["init"]["model"] == str(tiny_model)
        and calls["init"]["enable_lora"]
        and calls["init"]["max_lora_rank"] == 16
    )
    deltas = []
    out = eng.generate(CONVERSATIONS[:2], GREEDY, adapter="ad", on_text=lambda i, d: deltas.append((i, d)))
    prompts, params, lora = calls["generate"]
    assert prompts == [{"prompt_token_ids": eng.prompt_ids(c)} for c in CONVERSATIONS[:2]]
    assert params["temperature"] == 0.0 and params["max_tokens"] == 12 and params["stop_token_ids"] == eng.stop_ids
    assert lora == ("ad", 1, str(adapter))
    assert [o.finish_reason for o in out] == ["stop", "length"] and out[0].text == "reply 0"
    assert deltas == [(0, "reply 0"), (1, "reply 1")]
    eng.generate(CONVERSATIONS[:1], GenerationSettings(do_sample=True, temperature=0.7, seed=1))
    assert calls["generate"][2] is None and calls["generate"][1]["temperature"] == 0.7


def test_a_row_whose_sampling_fails_fails_alone(engine, monkeypatch):
    """One request's sampling breaks mid-flight (after its batch mates have streamed text): it alone gets
    the error; the others finish exactly as they would alone, with nothing streamed twice or lost."""
    from loralab import sampling

    real_pick = sampling.pick_token

    def pick(r, scores):
        if r.settings.top_k == 7 and len(r.tokens) >= 3:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_pick(r, scores)

    monkeypatch.setattr(sampling, "pick_token", pick)
    alone = [engine.generate([c], GREEDY)[0] for c in CONVERSATIONS[:3]]
    streamed = [[] for _ in range(3)]
    rows = [engine.submit(c, GREEDY, on_text=streamed[i].append) for i, c in enumerate(CONVERSATIONS[:3])]
    bad = engine.submit(CONVERSATIONS[3], GenerationSettings(max_new_tokens=12, do_sample=True, top_k=7, seed=1))
    engine.run([*rows, bad])
    assert isinstance(bad.error, RuntimeError) and bad.completion is None
    assert [r.completion for r in rows] == alone and all(r.error is None for r in rows)
    assert ["".join(s) for s in streamed] == [c.text for c in alone]


@pytest.mark.parametrize(
    "knobs", [{"temperature": 1e-40}, {"top_p": 1e-45}, {"temperature": 1e-30, "top_p": 1e-30, "top_k": 1}]
)
def test_extreme_sampling_knobs_sample_the_best_token(engine, knobs):
    """Tiny temperatures and top_p keep only the best token (no NaN from inf - inf): the greedy reply."""
    greedy = engine.generate(CONVERSATIONS[:2], GREEDY)
    sampled = engine.generate(CONVERSATIONS[:2], GenerationSettings(max_new_tokens=12, do_sample=True, seed=5, **knobs))
    assert [c.text for c in sampled] == [c.text for c in greedy]


@pytest.mark.parametrize("key", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_knobs_are_refused_in_one_line(engine, key):
    with pytest.raises(LoralabError, match=f"{key}: got nan; expected a finite number"):
        engine.generate(CONVERSATIONS[:1], GenerationSettings(do_sample=True, **{key: float("nan")}))
