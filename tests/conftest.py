"""Shared fixtures: offline mode, a tiny Llama model, the real data when present."""

import os
from pathlib import Path

import pytest

# Tests never touch the Hugging Face hub; the model cache of builtin models is shared between runs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("LORALAB_ALPACA", REPO.parent / "shared" / "data" / "alpaca_data_cleaned.json"))
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the Llama 3 chat template (made once per test session)."""
    from loralab.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_chatml_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML template."""
    from loralab.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-chatml") / "model", style="chatml")


@pytest.fixture(scope="session")
def alpaca_file() -> Path:
    if not ALPACA.is_file():
        pytest.skip(f"real alpaca data not found at {ALPACA} (set LORALAB_ALPACA)")
    return ALPACA


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
