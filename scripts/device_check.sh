#!/usr/bin/env bash
# GPU check of cuda_ext on an H100/H200 machine with PyTorch (CUDA build) and nvcc, no internet:
# install (carried wheels, then this repo), build the extension, run the GPU tests, run the benchmark.
# Every stage has its own timeout (together 7.7 minutes at most) and logs to OUTDIR/<stage>.log.
#
#   scripts/device_check.sh OUTDIR
set -uo pipefail

out=${1:?usage: scripts/device_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export SECATEURS_CUDA_CACHE=${SECATEURS_CUDA_CACHE:-$PWD/build/cuda_ext_cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

stage() {  # stage NAME SECONDS CMD...: run with a timeout, tee to OUTDIR/NAME.log, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee "$out/$name.log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$out/$name.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -n 2
  "$py" -c 'import torch as t; print("torch", t.__version__, "cuda", t.version.cuda, t.cuda.is_available())'
} 2>&1 | tee "$out/env.log"

soft_stage() {  # a stage whose failure is logged but does not fail the check
  local keep=$status
  stage "$@"
  status=$keep
}

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  stage wheels 45 "$py" -m pip install --no-index --no-deps "${wheels[@]}"
fi
# Editable install without dependencies (nothing can be fetched); PYTHONPATH above stands in if it fails.
soft_stage install 45 "$py" -m pip install --no-index --no-deps --no-build-isolation -e .
if stage build 150 "$py" -m cuda_ext.build; then
  stage pytest 100 "$py" -m pytest -m gpu tests/cuda_ext -q -rs
  stage bench 120 "$py" scripts/bench_dequant.py --out "$out"
fi
echo "device_check: $([ $status -eq 0 ] && echo OK || echo FAILED) (logs in $out)"
exit $status
