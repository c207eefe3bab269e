"""The one place that sets up logging for every command."""

import logging
import os
import sys
import warnings


def setup_logging(verbose: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Readable `HH:MM:SS level message` lines on stderr (and optionally a file in the run folder)."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_loralab", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._loralab = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if log_file is not None:
        add_log_file(log_file)
    # Third-party libraries are chatty at INFO; keep their warnings, drop their noise.
    for name in ("transformers", "datasets", "httpx", "urllib3", "jieba", "filelock", "matplotlib", "absl"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    # peft looks for the base model's config under the adapter's base_model_name_or_path; for
    # builtin: models that is a loralab name, not a folder, and the vocabulary check it wants is moot.
    warnings.filterwarnings("ignore", message="Could not find a config file in builtin:")


def add_log_file(path: str | os.PathLike) -> None:
    """Also write the log to `path` (e.g. RUN_DIR/train.log), once per path."""
    path = os.fspath(path)
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
