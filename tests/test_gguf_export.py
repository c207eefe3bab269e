"""GGUF / Ollama export: the f16 GGUF read back equals the merged model (q/k un-permuted) and transformers reads
it back with the same tokenization; q8_0 / q4_0 dequantize close; the LoRA GGUF holds the adapter; the Modelfile's
TEMPLATE, run by Go's text/template as Ollama runs it, gives loralab's prompt; other architectures are refused."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.export import export
from loralab.gguf_export import unpermute_qk
from loralab.models import load_tokenizer
from loralab.ollama import go_template, template_starts_with_bos
from loralab.templates import render
from loralab.testing import make_random_adapter

GO_RENDERER = Path(__file__).parent / "fixtures" / "ollama_template" / "main.go"
PROMPTS = ["Hello! How can I help you today?", "What is 12 + 30?\n\nThe sum is 42.", "  spaces  and\ttabs ü 😀"]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> tuple[Path, Path, object]:
    work = tmp_path_factory.mktemp("gguf")
    adapter = make_random_adapter(tiny_model, work / "adapter", seed=3)
    cfg = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "adapter_name_or_path": str(adapter),
            "export_dir": str(work / "out"),
            "export_gguf": "f16,q8_0,q4_0",
            "template": "llama3",
        },
    )
    return export(cfg), adapter, cfg


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _hf_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _gguf_name(hf_name: str, n_layers: int) -> str:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf_name, try_suffixes=(".weight",))


def _as_hf(tensor, hf_name: str, config: dict) -> np.ndarray:
    """A GGUF tensor read back (dequantized) in HF's layout: q/k rows un-permuted."""
    import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    data = data.reshape([int(d) for d in reversed(tensor.shape)]) if data.ndim > 1 or len(tensor.shape) > 1 else data
    if hf_name.endswith("q_proj.weight"):
        data = unpermute_qk(data, config["num_attention_heads"])
    elif hf_name.endswith("k_proj.weight"):
        data = unpermute_qk(data, config["num_key_value_heads"])
    return data


def test_f16_gguf_equals_merged_weights(exported):
    folder, _, _ = exported
    config = json.loads((folder / "config.json").read_text())
    weights = _hf_weights(folder)
    reader = _reader(folder / "model-f16.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(weights)  # untied model: output.weight is there too
    for hf_name, w in weights.items():
        got = _as_hf(tensors[_gguf_name(hf_name, config["num_hidden_layers"])], hf_name, config)
        expected = w.astype(np.float16).astype(np.float32) if w.ndim == 2 else w  # norms stay f32
        np.testing.assert_array_equal(got, expected, err_msg=hf_name)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "llama3"}))
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template  # the template it was trained with
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # llama3 writes bos first


def test_transformers_reads_the_gguf_back(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, cfg = exported
    hf_tok = AutoTokenizer.from_pretrained(folder)
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "llama3"}))
    prompt = render(tokenizer, [{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    for text in [*PROMPTS, prompt]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert gguf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf", dtype=torch.float32)
    ids = torch.tensor([hf_tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = merged(ids).logits, from_gguf(ids).logits
    assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


@pytest.mark.parametrize("kind,tolerance", [("q8_0", 0.01), ("q4_0", 0.2)])
def test_quantized_ggufs_dequantize_close(exported, kind, tolerance):
    folder, _, _ = exported
    config = json.loads((folder / "config.json").read_text())
    tensors = {t.name: t for t in _reader(folder / f"model-{kind}.gguf").tensors}
    for hf_name, w in _hf_weights(folder).items():
        tensor = tensors[_gguf_name(hf_name, config["num_hidden_layers"])]
        got = _as_hf(tensor, hf_name, config)
        if w.ndim == 2 and w.shape[-1] % 32 == 0:
            assert tensor.tensor_type.name in ("Q8_0", "Q4_0"), hf_name
        error = np.abs(got - w).mean() / np.abs(w).mean()
        assert error < tolerance, (hf_name, error)


def test_lora_gguf_holds_the_adapter(exported):
    from safetensors.numpy import load_file

    folder, adapter, _ = exported
    config = json.loads((folder / "config.json").read_text())
    settings = json.loads((adapter / "adapter_config.json").read_text())
    reader = _reader(folder / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == settings["lora_alpha"]
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == len(weights)
    for key, w in weights.items():
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        part = "lora_a" if ".lora_A." in key else "lora_b"
        tensor = tensors[_gguf_name(module + ".weight", config["num_hidden_layers"]) + "." + part]
        got = np.asarray(tensor.data, dtype=np.float32).reshape(w.shape)
        if part == "lora_b" and module.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"]
            got = unpermute_qk(got, heads)
        np.testing.assert_array_equal(got, w, err_msg=key)


def test_modelfile_names_model_template_and_stops(exported):
    folder, _, _ = exported
    text = (folder / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and 'TEMPLATE """' in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and "PARAMETER temperature 0" in text
    assert "PARAMETER num_predict 512" in text
    info = json.loads((folder / "loralab_export.json").read_text())
    assert info["gguf"]["models"] == {k: f"model-{k}.gguf" for k in ("f16", "q8_0", "q4_0")}


def test_ollama_adapter_mode_writes_the_base_and_an_adapter_line(tiny_model, exported, tmp_path):
    folder, adapter, cfg = exported
    values = {**cfg.model_dump(exclude_defaults=True), "export_dir": str(tmp_path / "out"), "export_gguf": "q8_0,f16"}
    out = export(load_config(None, {**values, "export_ollama": "adapter"}))
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./base-q8_0.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    # the base file holds the base model's weights, not the merged ones
    config = json.loads((out / "config.json").read_text())
    base_q = _hf_weights(tiny_model)["model.layers.0.self_attn.q_proj.weight"]
    merged_q = _hf_weights(out)["model.layers.0.self_attn.q_proj.weight"]
    tensor = {t.name: t for t in _reader(out / "base-q8_0.gguf").tensors}["blk.0.attn_q.weight"]
    got = _as_hf(tensor, "model.layers.0.self_attn.q_proj.weight", config)
    assert np.abs(got - base_q).max() < np.abs(got - merged_q).max() / 10
    values["export_dir"] = str(tmp_path / "refused")
    with pytest.raises(LoralabError, match="export_ollama: adapter .* needs exactly one adapter_name_or_path, got 2"):
        export(
            load_config(None, {**values, "export_ollama": "adapter", "adapter_name_or_path": f"{adapter},{adapter}"})
        )
    with pytest.raises(LoralabError, match="export_ollama: adapter needs export_gguf"):
        export(load_config(None, {**values, "export_ollama": "adapter", "export_gguf": None}))
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(
    "change,why",
    [
        ({"use_dora": True}, "DoRA adapters have no llama.cpp form"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "different ranks or alphas"),
    ],
)
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(exported, tmp_path, change, why):
    from transformers import AutoConfig

    from loralab.gguf_export import write_lora_gguf

    folder, adapter, _ = exported
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    settings = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(LoralabError, match=f"export_gguf: .* cannot be written as a llama.cpp LoRA GGUF: .*{why}"):
        write_lora_gguf(copy, AutoConfig.from_pretrained(folder), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_modelfile_without_builtin_template_says_so(tiny_model):
    from loralab.ollama import modelfile

    cfg = load_config(None, {"model_name_or_path": str(tiny_model), "do_sample": True, "temperature": 0.7})
    text = modelfile(cfg, load_tokenizer(cfg), "./model-q8_0.gguf", add_bos=True)
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert "FROM ./model-q8_0.gguf" in text and "PARAMETER temperature 0.7" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text  # the tokenizer's own template closes turns with it


def test_other_architectures_and_types_are_refused(tiny_model, tmp_path):
    other = tmp_path / "mistral"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    adapter = make_random_adapter(other, tmp_path / "adapter", seed=1)
    values = {"model_name_or_path": str(other), "adapter_name_or_path": str(adapter), "export_dir": str(tmp_path / "o")}
    with pytest.raises(LoralabError, match=r"export_gguf: .* is MistralForCausalLM; GGUF export supports"):
        export(load_config(None, {**values, "export_gguf": "f16"}))
    assert not (tmp_path / "o").exists()
    with pytest.raises(LoralabError, match=r"export_gguf.*expected a comma list of f16, q8_0, q4_0"):
        load_config(None, {**values, "export_gguf": "f16,q5_k"})
    assert load_config(None, {**values, "export_gguf": ["F16", "q8_0"]}).gguf_types == ["f16", "q8_0"]


@pytest.mark.parametrize(
    "pre_tokenizer,name",
    [
        ("gpt2", "gpt-2"),
        ("digits", "smollm"),  # SmolLM2's own tokenizer.json: digits split one by one, then GPT-2's split
        ("llama3", "llama-bpe"),
        ("whitespace", None),
    ],
)
def test_pre_tokenizer_named_for_llama_cpp_or_refused(tiny_model, pre_tokenizer, name):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from loralab.gguf_export import LLAMA3_SPLIT, tokenizer_metadata

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.backend_tokenizer.pre_tokenizer = {
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "digits": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        "llama3": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        "whitespace": pre_tokenizers.Whitespace(),
    }[pre_tokenizer]
    if name is None:
        with pytest.raises(LoralabError, match="export_gguf: the tokenizer of tiny .* is not one llama.cpp reads"):
            tokenizer_metadata(tokenizer, len(tokenizer), "tiny")
        return
    vocab = tokenizer_metadata(tokenizer, len(tokenizer) + 3, "tiny")
    assert vocab["pre"] == name
    assert vocab["tokens"][-3:] == [f"[PAD{len(tokenizer) + i}]" for i in range(3)]  # embedding rows past the vocab
    assert vocab["tokens"][tokenizer.convert_tokens_to_ids("<|eot_id|>")] == "<|eot_id|>"


# --- the Modelfile's TEMPLATE under Go's text/template -------------------------------------------------------
@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go; .ci/run installs it)")
    work = tmp_path_factory.mktemp("go")
    binary = work / "render"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "GOCACHE": str(work / "cache"), "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(binary), str(GO_RENDERER)], check=True, env=env, timeout=300)

    def run(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
        payload = json.dumps({"template": template, "messages": messages, "tools": tools or []})
        done = subprocess.run([binary], input=payload, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi {{ there }}"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def _same_prompt(go_render, model: Path, template: str, messages: list[dict], tool_format: str | None = None):
    cfg = load_config(None, {"model_name_or_path": str(model), "template": template, "tool_format": tool_format})
    tokenizer = load_tokenizer(cfg)
    add_bos = template_starts_with_bos(tokenizer)
    ours = render(tokenizer, messages, add_generation_prompt=True)
    go = go_template(template, tool_format, add_bos, tokenizer.bos_token or "", tokenizer.eos_token)
    ollama_messages = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
    theirs = go_render(go, ollama_messages, [{"type": "function", "function": t} for t in messages[0].get("tools", [])])
    assert (tokenizer.bos_token if add_bos else "") + theirs == ours


def test_modelfile_as_written_renders_loralabs_prompt(go_render, exported):
    """The TEMPLATE block read out of the written Modelfile (quoting included), not the function's return value."""
    folder, _, _ = exported
    text = (folder / "Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "llama3"}))
    ours = render(tokenizer, TWO_TURNS, add_generation_prompt=True)
    assert tokenizer.bos_token + go_render(template, TWO_TURNS) == ours


@pytest.mark.parametrize("template", ["llama3", "mistral", "alpaca", "vicuna", "default"])
def test_go_template_two_turns_with_system_llama3_style(go_render, tiny_model, template):
    _same_prompt(go_render, tiny_model, template, TWO_TURNS)


@pytest.mark.parametrize("template", ["smollm2", "chatml", "qwen"])
def test_go_template_two_turns_with_system_chatml_style(go_render, tiny_chatml_model, template):
    _same_prompt(go_render, tiny_chatml_model, template, TWO_TURNS)
    _same_prompt(go_render, tiny_chatml_model, template, TWO_TURNS[1:])  # no system: the template's default


@pytest.mark.parametrize("template,model", [("smollm2", "chatml"), ("llama3", "llama3"), ("mistral", "llama3")])
def test_go_template_with_tools(go_render, tiny_model, tiny_chatml_model, template, model):
    with_tools = [{**TWO_TURNS[0], "tools": [WEATHER]}, *TWO_TURNS[1:]]
    folder = tiny_chatml_model if model == "chatml" else tiny_model
    _same_prompt(go_render, folder, template, with_tools, tool_format="default")
    no_system_text = [{"role": "system", "content": "", "tools": [WEATHER]}, TWO_TURNS[1]]
    _same_prompt(go_render, folder, template, no_system_text, tool_format="default")


@pytest.mark.slow
def test_smollm2_gguf_tokenizes_like_hf(tmp_path):
    """The real SmolLM2 tokenizer and tied embeddings (no output.weight)."""
    from transformers import AutoTokenizer

    adapter = make_random_adapter(_builtin_folder(), tmp_path / "adapter", seed=2, target_modules=["q_proj", "v_proj"])
    cfg = load_config(
        None,
        {
            "adapter_name_or_path": str(adapter),
            "export_dir": str(tmp_path / "out"),
            "export_gguf": "f16",
            "template": "smollm2",
        },
    )
    folder = export(cfg)
    reader = _reader(folder / "model-f16.gguf")
    # builtin:smollm2 is read from a GGUF by transformers, which rebuilds its tokenizer GPT-2 style (no digit
    # split); its vocabulary has no token joining a digit to anything, so both splits give the same ids.
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    hf_tok = AutoTokenizer.from_pretrained(folder)
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    texts = [*PROMPTS, "In 2024, 1234567 people paid $3.50 each.", "(Hello) don't\n\n  x:=y; ÄÖÜ 東京"]
    for text in texts:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert gguf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    llm = _llama(folder / "model-f16.gguf")
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "smollm2"}))
    prompt = render(tokenizer, TWO_TURNS, add_generation_prompt=True)
    for text in [*texts, prompt]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text


def _builtin_folder() -> Path:
    from loralab.models import ensure_builtin_model

    return ensure_builtin_model("smollm2-135m-instruct")


def test_llama3_rope_scaling_travels_as_rope_freqs():
    """Llama 3.1+ long-context rope: llama.cpp divides each rotary frequency by rope_freqs; the result must be
    transformers' own llama3 frequencies."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loralab.gguf_export import gguf_tensors

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )
    tensors = dict(gguf_tensors(LlamaForCausalLM(config)))
    factors = tensors["rope_freqs.weight"]
    dim = 64 // 4
    plain = 1.0 / (500000.0 ** (np.arange(0, dim, 2) / dim))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    np.testing.assert_allclose(plain / factors, expected.numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0  # some frequencies kept, some scaled fully
    config_plain = LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert "rope_freqs.weight" not in dict(gguf_tensors(LlamaForCausalLM(config_plain)))


# --- llama.cpp itself reads the files (llama-cpp-python, when installed) --------------------------------------
def _llama(path: Path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False, **kw)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_llama_cpp_reads_model_and_lora_ggufs(exported, tiny_model, tmp_path):
    """llama.cpp tokenizes like the HF tokenizer, its logits for the f16 GGUF are the merged model's (f16 error),
    and the base model's GGUF plus the LoRA GGUF gives the same logits as the merged one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.gguf_export import write_model_gguf

    folder, _, _ = exported
    llm = _llama(folder / "model-f16.gguf")
    hf_tok = AutoTokenizer.from_pretrained(folder)
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "llama3"}))
    prompt = render(tokenizer, [*TWO_TURNS], add_generation_prompt=True)
    for text in [*PROMPTS, prompt]:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == hf_tok(text, add_special_tokens=False)["input_ids"]
        ), text
    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_llama_logits(llm, ids), expected, atol=2e-2)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_gguf = write_model_gguf(base, tokenizer, tmp_path / "base-f16.gguf", "f16", "base", add_bos=True)
    with_lora = _llama(base_gguf, lora_path=str(folder / "adapter.gguf"))
    np.testing.assert_allclose(_llama_logits(with_lora, ids), expected, atol=2e-2)
    plain = _llama(base_gguf)
    assert np.abs(_llama_logits(plain, ids) - expected).max() > 0.1  # the adapter is what makes them equal


def test_ollama_path_gives_loralabs_token_ids(go_render, exported):
    """What Ollama feeds llama.cpp: the Modelfile's TEMPLATE rendered, then tokenized with the GGUF's add_bos and
    special tokens parsed; the ids must be loralab's encode_prompt ids."""
    from loralab.templates import encode_prompt

    folder, _, _ = exported
    llm = _llama(folder / "model-f16.gguf")
    template = (folder / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(folder), "template": "llama3"}))
    text = go_render(template, TWO_TURNS)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == encode_prompt(tokenizer, TWO_TURNS)
