"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own Python writer).

`write_model_gguf` writes a merged Llama-architecture model (SmolLM2, Llama 3.x) at f16, q8_0 or q4_0 with its
tokenizer and the chat template it was trained with; `write_lora_gguf` writes a peft LoRA adapter as a llama.cpp
LoRA GGUF. Facts taken from llama.cpp (its converter and loader), not its code: Q and K projection rows are
reordered for llama.cpp's rotary layout (`permute_qk`); a tied output matrix is left out (llama.cpp reuses the
token embedding); Llama 3.1+ rope scaling travels as a `rope_freqs.weight` tensor of per-frequency factors;
llama.cpp scales a LoRA by alpha / rank, rank read from the lora_a tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from loralab.errors import LoralabError
from loralab.templates import stop_token_ids

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# The text splitting before BPE (tokenizer.json's pre_tokenizer) -> llama.cpp's name for it (tokenizer.ggml.pre).
# A tokenizer that splits otherwise is refused: llama.cpp would silently tokenize the prompts differently.
# LLAMA3_SPLIT: Llama 3's split pattern, as in its tokenizer.json.
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if pre is None:
        return None
    if byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return "smollm"
    pattern = (first.get("pattern") or {}).get("Regex")
    if first.get("type") == "Split" and pattern == LLAMA3_SPLIT and byte_level(second, False):
        return "llama-bpe"
    return None


def tokenizer_metadata(tokenizer, vocab_size: int, model_name: str) -> dict:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary: tokens, their types, merges.

    Types (gguf.TokenType): special added tokens are CONTROL (never produced by splitting text), other added
    tokens USER_DEFINED, embedding rows past the vocabulary UNUSED.
    """
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise LoralabError(f"export_gguf: the tokenizer of {model_name} is not a fast (tokenizer.json) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise LoralabError(
            f"export_gguf: the tokenizer of {model_name} ({model.get('type')}, pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}) is not one llama.cpp reads the same way; "
            "supported: byte-level BPE as in GPT-2, SmolLM2 and Llama 3"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be larger than the vocabulary: padding rows
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges}


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (each head's first half rotates with its second half) -> llama.cpp's (adjacent pairs).

    The rows of each head are reordered; `unpermute_qk` is its inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_architecture(config, model_name: str) -> None:
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise LoralabError(
            f"export_gguf: {model_name} is {', '.join(architectures)}; GGUF export supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2, Llama 3.x); export without export_gguf and convert "
            "with llama.cpp's convert_hf_to_gguf.py"
        )


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3.1+ rope scaling as llama.cpp reads it: a divisor for each rotary frequency (None without it)."""
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    out = []
    for wavelength in 2 * math.pi / freqs:
        if wavelength < old_context / high:  # high frequencies: unscaled
            out.append(1.0)
        elif wavelength > old_context / low:  # low frequencies: scaled by the full factor
            out.append(factor)
        else:  # in between: a smooth blend
            smooth = (old_context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# GGUF type name -> (llama.cpp file type, quantization of matrices, of the embedding / output matrices)
def _types(kind: str):
    import gguf

    q = gguf.GGMLQuantizationType
    return {
        "f16": (gguf.LlamaFileType.MOSTLY_F16, q.F16, q.F16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, q.Q8_0, q.Q8_0),
        # 4-bit embeddings and output hurt most; llama.cpp's own quantizer also keeps them at more bits.
        "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, q.Q4_0, q.Q8_0),
    }[kind]


def gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """The model's weights as (GGUF name, float32 array), q/k permuted for llama.cpp, a tied output left out.

    One at a time: a converted copy lives only until the writer has taken its f16 / quantized form.
    """
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoralabError(f"export_gguf: no GGUF name for the weight {hf_name} of this Llama model")
        array = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_qk(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_qk(array, config.num_key_value_heads)
        yield name, array
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def write_model_gguf(model, tokenizer, path: Path, kind: str, name: str, add_bos: bool) -> Path:
    """Write `model` (merged, Llama architecture) with its tokenizer and chat template as one GGUF file.

    add_bos: whether llama.cpp / Ollama should put bos before a prompt (the template's prefix starts with it).
    """
    import gguf

    config = model.config
    check_architecture(config, name)
    file_type, matrix_type, edge_type = _types(kind)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, name)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_file_type(file_type)
    if kind != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    stops = [i for i in stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    if stops:  # the template's turn-closing token when it is not eos (llama.cpp stops at eot too)
        writer.add_eot_token_id(stops[0])
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)

    for tensor_name, array in gguf_tensors(model):
        qtype = gguf.GGMLQuantizationType.F32
        if array.ndim == 2:
            edge = tensor_name.startswith(("token_embd.", "output."))
            qtype = edge_type if edge else matrix_type
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if array.shape[-1] % block:  # rows that do not split into whole blocks stay at f16
                qtype = gguf.GGMLQuantizationType.F16
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, array.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_lora_gguf(adapter_dir: str | Path, config, path: Path) -> Path:
    """A peft LoRA adapter (adapter_model.safetensors) as a llama.cpp LoRA GGUF.

    Tensors `<gguf weight name>.lora_a` (rank x in) and `.lora_b` (out x rank), float32; lora_b of q/k permuted
    like the weights they add to. llama.cpp scales by alpha / rank, so rsLoRA's alpha / sqrt(rank) travels as
    alpha * sqrt(rank).
    """
    import gguf
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    check_architecture(config, str(adapter_dir))
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    why_not = (
        "it is not a LoRA adapter"
        if settings.get("peft_type") != "LORA"
        else "DoRA adapters have no llama.cpp form"
        if settings.get("use_dora")
        else "it trains whole modules too (modules_to_save)"
        if settings.get("modules_to_save")
        else "its layers have different ranks or alphas (rank_pattern / alpha_pattern)"
        if settings.get("rank_pattern") or settings.get("alpha_pattern")
        else ""
    )
    if why_not:
        raise LoralabError(f"export_gguf: {adapter_dir} cannot be written as a llama.cpp LoRA GGUF: {why_not}")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoralabError(f"export_gguf: {adapter_dir} has no adapter_model.safetensors")
    rank, alpha = settings["r"], float(settings["lora_alpha"])
    # llama.cpp multiplies by alpha / rank; rsLoRA multiplies by alpha / sqrt(rank).
    gguf_alpha = alpha * math.sqrt(rank) if settings.get("use_rslora") else alpha
    weights = load_file(str(weights_file))
    other = [k for k in weights if ".lora_A." not in k and ".lora_B." not in k]
    if other:  # e.g. LoRA on the embedding (lora_embedding_A): no llama.cpp LoRA tensor for it
        raise LoralabError(
            f"export_gguf: {adapter_dir} cannot be written as a llama.cpp LoRA GGUF: it holds {other[0]}"
        )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
    writer.add_name(adapter_dir.name)
    for key in sorted(weights):
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        b_key = key.replace(".lora_A.", ".lora_B.")
        if name is None or b_key not in weights:
            raise LoralabError(f"export_gguf: {adapter_dir}: no llama.cpp weight for the LoRA module {module}")
        lora_a, lora_b = weights[key].astype(np.float32), weights[b_key].astype(np.float32)
        if module.endswith("q_proj"):
            lora_b = permute_qk(lora_b, config.num_attention_heads)
        elif module.endswith("k_proj"):
            lora_b = permute_qk(lora_b, config.num_key_value_heads)
        writer.add_tensor(name + ".lora_a", lora_a)
        writer.add_tensor(name + ".lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
