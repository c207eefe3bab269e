"""Merge LoRA adapters into their base model: a plain safetensors model folder (transformers, vLLM).

`loralab export CONFIG adapter_name_or_path=RUN export_dir=OUT` (LLaMA-Factory's key names). The
folder gets the merged weights, the tokenizer with the run's chat template, and a generation config
whose eos ids include the template's turn-closing token, so servers stop where the model was taught to.

With `export_gguf=f16,q8_0` (a loralab key; LLaMA-Factory has none) the folder also gets, for llama.cpp and
Ollama: the merged model as `model-<type>.gguf` at each type, each adapter alone as a llama.cpp LoRA GGUF
(`adapter.gguf`, or `adapter-1.gguf`, ... when several are merged), and an Ollama `Modelfile`
(`ollama create NAME -f DIR/Modelfile`) that runs the merged model, or with `export_ollama=adapter` the base
model's GGUF (`base-<type>.gguf`) plus `adapter.gguf`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from loralab import gguf_export, models, ollama, runinfo
from loralab.config import Config
from loralab.errors import LoralabError
from loralab.templates import stop_token_ids

log = logging.getLogger(__name__)


def check_export_dir(cfg: Config, overwrite: bool) -> Path:
    if not cfg.export_dir:
        raise LoralabError("export_dir: not set; pass export_dir=FOLDER for the merged model")
    target = Path(cfg.export_dir)
    if target.is_file():
        raise LoralabError(f"export_dir: {target} is a file, expected a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise LoralabError(f"export_dir: {target} exists and is not empty; pass --overwrite to replace it")
    return target


def export(cfg: Config, overwrite: bool = False) -> Path:
    """Load base + adapters (merged in order), save into export_dir atomically; returns the folder."""
    if not cfg.adapter_paths:
        raise LoralabError(
            "adapter_name_or_path: not set; pass the adapter (run) folder to merge, "
            "e.g. adapter_name_or_path=runs/my-run"
        )
    if cfg.quantization_bit:
        raise LoralabError(
            "quantization_bit: a quantized base cannot be merged; unset it to merge into full-precision weights"
        )
    target = check_export_dir(cfg, overwrite)
    for path in cfg.adapter_paths:
        models.check_adapter_base(cfg, path)
    if cfg.gguf_types:  # refuse before the minutes of merging, not after
        from transformers import AutoConfig

        path, gguf_file = models.resolve_model_path(cfg.model_name_or_path)
        gguf_export.check_architecture(
            AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=cfg.trust_remote_code),
            cfg.model_name_or_path,
        )

    if cfg.export_ollama == "adapter" and not cfg.gguf_types:
        raise LoralabError("export_ollama: adapter needs export_gguf (the GGUF types to write, e.g. q8_0)")
    if cfg.export_ollama == "adapter" and len(cfg.adapter_paths) != 1:
        raise LoralabError(
            "export_ollama: adapter (Ollama runs the base model's GGUF plus adapter.gguf) needs exactly one "
            f"adapter_name_or_path, got {len(cfg.adapter_paths)}"
        )

    from peft import PeftModel
    from safetensors import SafetensorError

    # Write next to the target and rename at the end: a failed export never leaves half a model there.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = models.load_tokenizer(cfg)
        model = models.load_model(cfg)
        info = {
            "base_model": cfg.model_name_or_path,
            "adapters": cfg.adapter_paths,
            "template": cfg.template,
            "libraries": runinfo.library_versions(),
            "git_commit": runinfo.git_commit(),
        }
        base_gguf = None
        if cfg.export_ollama == "adapter":  # the base model's GGUF, before the adapter is merged into it
            base_gguf = write_base_gguf(cfg, model, tokenizer, tmp)
        for path in cfg.adapter_paths:
            try:
                model = PeftModel.from_pretrained(model, path).merge_and_unload()
            except (RuntimeError, ValueError, SafetensorError, EOFError, OSError) as e:  # a damaged adapter file too
                raise LoralabError(
                    f"adapter_name_or_path: cannot merge {path} into {cfg.model_name_or_path} "
                    f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                ) from None
            log.info("merged %s", path)
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cfg.gguf_types:
            info["gguf"] = write_gguf_files(cfg, model, tokenizer, tmp, target.name, base_gguf)
        runinfo.write_json(tmp / "loralab_export.json", info)
        if target.exists():
            shutil.rmtree(target)  # only reached with --overwrite (or an empty folder)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote merged model to %s", target)
    return target


def write_base_gguf(cfg: Config, model, tokenizer, folder: Path) -> str:
    """The base model (no adapter) at the first GGUF type, for Ollama's FROM + ADAPTER; its file name."""
    kind = cfg.gguf_types[0]
    add_bos = ollama.template_starts_with_bos(tokenizer)
    path = gguf_export.write_model_gguf(model, tokenizer, folder / f"base-{kind}.gguf", kind, "base", add_bos)
    log.info("wrote %s", path.name)
    return path.name


def adapter_gguf_names(adapter_paths: list[str]) -> list[str]:
    return (
        ["adapter.gguf"] if len(adapter_paths) == 1 else [f"adapter-{i}.gguf" for i in range(1, len(adapter_paths) + 1)]
    )


def write_gguf_files(cfg: Config, model, tokenizer, folder: Path, name: str, base_gguf: str | None = None) -> dict:
    """The merged model at each of cfg.gguf_types, each adapter as a LoRA GGUF, and an Ollama Modelfile.

    base_gguf: the base model's GGUF already written (export_ollama: adapter): the Modelfile runs it plus the
    adapter, which must then be written.
    """
    add_bos = ollama.template_starts_with_bos(tokenizer)
    written: dict = {"models": {}, "adapters": {}, "base": base_gguf}
    for kind in cfg.gguf_types:
        path = gguf_export.write_model_gguf(model, tokenizer, folder / f"model-{kind}.gguf", kind, name, add_bos)
        written["models"][kind] = path.name
        log.info("wrote %s", path.name)
    for adapter, file_name in zip(cfg.adapter_paths, adapter_gguf_names(cfg.adapter_paths)):
        try:
            gguf_export.write_lora_gguf(adapter, model.config, folder / file_name)
        except LoralabError as e:  # the merged model still serves; only the adapter-alone file is missing
            if base_gguf:
                raise LoralabError(f"{e}; use export_ollama: merged") from None
            log.warning("%s; the merged model GGUFs are written, the adapter alone is not", e)
            continue
        written["adapters"][adapter] = file_name
        log.info("wrote %s (LoRA of %s)", file_name, adapter)
    if base_gguf:
        modelfile = ollama.modelfile(cfg, tokenizer, f"./{base_gguf}", add_bos, adapter="./adapter.gguf")
    else:
        modelfile = ollama.modelfile(cfg, tokenizer, f"./model-{cfg.gguf_types[0]}.gguf", add_bos)
    (folder / "Modelfile").write_text(modelfile, encoding="utf-8")
    written["modelfile"] = "Modelfile"
    return written
