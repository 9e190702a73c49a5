#!/usr/bin/env bash
# Build llama.cpp's Python binding (llama-cpp-python) from source, CPU only, once; cache the wheel and install it.
# Used by scripts/gguf_check.py, scripts/bench_llama_cpp.py and the llama.cpp test in tests/compress/export (which
# is skipped when the binding is absent). A second call finds the cached wheel and only installs it.
#   bash scripts/build_llama_cpp.sh            # VERSION=0.3.36 JOBS=2 CACHE=~/.cache/secateurs/wheels
# Slow on a small machine (the whole of llama.cpp is compiled); the script prints the build time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=${VERSION:-0.3.36}
JOBS=${JOBS:-2}
CACHE=${CACHE:-$HOME/.cache/secateurs/wheels}
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  start=$(date +%s)
  # CPU only, no BLAS, no multimodal/server/example targets; -march=native because the wheel stays on this machine.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_CURL=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
  nice -n 10 "$VENV/bin/python" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$CACHE" \
    "llama-cpp-python==$VERSION"
  echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s (JOBS=$JOBS)"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi
# The binding's runtime dependencies (numpy, typing-extensions, diskcache, jinja2) are already installed or small.
"$VENV/bin/python" -m pip install -q "$wheel"
echo "installed $wheel"
