#!/usr/bin/env bash
# GPU check for an H200 machine (jax with CUDA preinstalled, no network).
# Runs `pytest -m gpu`, the Triton kernels against their references, the ceilings
# (device-to-device copy, pinned-host D2H/H2D) and the transfer benchmark as
# fractions of those ceilings, and the load-back/prefill overlap of a layer-wise
# load fused into the prefill (benchmarks/overlap_bench.py: overlap_ratio =
# t(fused) / (t(load) + t(prefill)), plus a bit-exactness check of the fused run).
# Logs go to $OUT (or gpu_check_out/); the table is printed last.
# Usage: bash scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAXHICACHE_TEST_PLATFORM=gpu
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-python3}"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$out/env.log"
timeout 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests > "$out/pytest_gpu.log" 2>&1
echo "pytest -m gpu exit $? (log: $out/pytest_gpu.log): $(tail -n 1 "$out/pytest_gpu.log")" | tee "$out/pytest_summary.txt"
timeout 420 "$py" scripts/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
