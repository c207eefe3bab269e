"""Merge LoRA adapters into their base model: a plain safetensors model folder (transformers, vLLM).

`loralab export CONFIG adapter_name_or_path=RUN export_dir=OUT` (LLaMA-Factory's key names). The
folder gets the merged weights, the tokenizer with the run's chat template, and a generation config
whose eos ids include the template's turn-closing token, so servers stop where the model was taught to.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from loralab import models, runinfo
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

    from peft import PeftModel

    tokenizer = models.load_tokenizer(cfg)
    model = models.load_model(cfg)
    for path in cfg.adapter_paths:
        try:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        except (RuntimeError, ValueError) as e:
            raise LoralabError(
                f"adapter_name_or_path: cannot merge {path} into {cfg.model_name_or_path} "
                f"({str(e).splitlines()[0][:200]})"
            ) from None
        log.info("merged %s", path)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)

    # Write next to the target and rename at the end: a failed export never leaves half a model there.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "base_model": cfg.model_name_or_path,
            "adapters": cfg.adapter_paths,
            "template": cfg.template,
            "libraries": runinfo.library_versions(),
            "git_commit": runinfo.git_commit(),
        }
        runinfo.write_json(tmp / "loralab_export.json", info)
        if target.exists():
            shutil.rmtree(target)  # only reached with --overwrite (or an empty folder)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote merged model to %s", target)
    return target
