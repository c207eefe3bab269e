"""The one place that sets up logging for every command."""

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator


def setup_logging(verbose: bool = False) -> None:
    """Readable `HH:MM:SS level message` lines on stderr."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_loralab", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._loralab = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # Third-party libraries are chatty at INFO; keep their warnings, drop their noise.
    for name in ("transformers", "datasets", "httpx", "urllib3", "jieba", "filelock", "matplotlib", "absl"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    # peft looks for the base model's config under the adapter's base_model_name_or_path; for
    # builtin: models that is a loralab name, not a folder, and the vocabulary check it wants is moot.
    warnings.filterwarnings("ignore", message="Could not find a config file in builtin:")


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[None]:
    """Also write the log to `path` (e.g. RUN_DIR/train.log) until the block ends.

    One process may run many stages (sweeps train many times, `loralab run` trains then evaluates):
    each run's file gets only that run's lines. A path already attached by an outer block is left to it.
    """
    path = os.path.abspath(path)
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
