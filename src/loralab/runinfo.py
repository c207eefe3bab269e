"""Self-describing run folders: what ran, with which settings, code and libraries."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

from loralab import __version__
from loralab.config import Config, save_config
from loralab.errors import LoralabError

LIBRARIES = [
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "optuna",
    "sacrebleu",
    "rouge-score",
    "nltk",
    "jieba",
    "rouge-chinese",
    "vllm",
    "llama-cpp-python",
]


def write_json(path: str | Path, obj) -> None:
    """Every JSON file in a run folder: indented, UTF-8, newline at the end."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def update_all_results(folder: str | Path, metrics: dict) -> None:
    """LLaMA-Factory's all_results.json (transformers' `save_metrics(combined=True)`): every stage's flat
    metrics of the folder, merged."""
    path = Path(folder) / "all_results.json"
    merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, {**merged, **metrics})


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "loralab": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The loralab checkout's commit (with '-dirty' for local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def check_output_dir(path: str | Path, overwrite: bool, allow_existing: bool = False) -> Path:
    """Refuse to write into a non-empty folder unless asked (overwrite_output_dir / --overwrite)."""
    path = Path(path)
    if path.is_file():
        raise LoralabError(f"output_dir: {path} is a file, expected a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or allow_existing):
        raise LoralabError(
            f"output_dir: {path} exists and is not empty; pass --overwrite (overwrite_output_dir=true) "
            "to replace it, --resume to continue it, or choose another output_dir"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_info(run_dir: str | Path, cfg: Config, tokenizer=None, **extra) -> None:
    """config.yaml (resolved), run_info.json (versions, commit, command line, extras), chat_template.jinja."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    info = {
        "loralab_version": __version__,
        "git_commit": git_commit(),
        "command": sys.argv,
        "seed": cfg.seed,
        "libraries": library_versions(),
        **extra,
    }
    write_json(run_dir / "run_info.json", info)
    if tokenizer is not None and tokenizer.chat_template:
        (run_dir / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
