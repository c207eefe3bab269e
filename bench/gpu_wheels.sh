#!/usr/bin/env bash
# Wheels for a GPU machine without a package registry (run HERE, on a machine with PyPI), for gpu_check.sh.
#
#   bash bench/gpu_wheels.sh            # .whl/: what loralab needs beyond that machine's own packages (~30 MB)
#   bash bench/gpu_wheels.sh --qlora    # .whl-qlora/: the same minus jieba, plus bitsandbytes (QLoRA's own call)
#
# The GPU machine (python 3.12, torch 2.11 + CUDA, transformers 5.17, peft 0.21, accelerate 1.15, typer,
# sacrebleu, pyarrow, pandas, httpx ... already there) lacks these. Versions are the ones this checkout is
# tested with here (read from this python's installed packages), as manylinux x86_64 cp312 wheels; DeepSpeed
# has no wheel on PyPI and is built here from its sdist (pure Python with DS_BUILD_OPS=0: its CUDA ops
# are compiled just in time on the GPU machine when used). A call carries the tree and the wheels, 64 MiB
# at most: the script prints both sizes and fails above the limit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
QLORA=0
[ "${1:-}" = "--qlora" ] && QLORA=1
DEST="$REPO/.whl"
[ "$QLORA" = 1 ] && DEST="$REPO/.whl-qlora"
LIMIT_MB=64

# What loralab imports that the GPU machine's image does not have, with what those need in turn.
NEED=(datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection gguf
  rouge-score nltk rouge-chinese fastapi starlette uvicorn openai distro jiter sniffio hjson)
if [ "$QLORA" = 1 ]; then NEED+=(bitsandbytes); else NEED+=(jieba); fi

installed_version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null; }

rm -rf "$DEST" && mkdir -p "$DEST"
grep -qx "/$(basename "$DEST")/" "$REPO/.git/info/exclude" 2>/dev/null || echo "/$(basename "$DEST")/" >>"$REPO/.git/info/exclude"
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for name in "${NEED[@]}"; do
  v=$(installed_version "$name" || true)
  spec="$name${v:+==$v}"
  # A wheel for the GPU machine's platform where PyPI has one; else (pure Python published as an sdist
  # only: jieba, rouge-score) a wheel built here, which runs anywhere.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEST" "$spec" 2>/dev/null ||
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
done
# DeepSpeed: built from the sdist against this python's torch, without its CUDA ops.
ds=$(installed_version deepspeed || true)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed${ds:+==$ds}"

wheels_mb=$(du -sm "$DEST" | cut -f1)
tree_mb=$(( $(cd "$REPO" && git ls-files -z | xargs -0 cat | wc -c) / 1048576 + 1 ))
echo "$(ls "$DEST" | wc -l) wheels in $(basename "$DEST"): ${wheels_mb} MB; tracked tree: ${tree_mb} MB"
if [ $((wheels_mb + tree_mb)) -gt "$LIMIT_MB" ]; then
  echo "error: tree + wheels = $((wheels_mb + tree_mb)) MB, over the ${LIMIT_MB} MiB a device call carries" >&2
  exit 1
fi
