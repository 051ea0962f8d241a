#!/usr/bin/env bash
# Runs every benchmark with CPU settings into benchmarks/results/, then renders RESULTS.md.
#
#   bash benchmarks/run_all.sh            # CPU settings (--cpu)
#   bash benchmarks/run_all.sh --quick    # smoke test: tiny models, one iteration
#
# PY runs the JAX benchmarks, TORCH_PY (torch + diffusers + jax) the comparison with PyTorch.
# On a GPU: python benchmarks/gpu_check.py (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TORCH_PY=${TORCH_PY:-/work/venv311/bin/python}
MODE=${1:---cpu}
if [ "$MODE" = --quick ]; then OUT=${OUT:-/tmp/ddpm_bench_quick}; else OUT=${OUT:-benchmarks/results}; fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONPATH=${PYTHONPATH:-$PWD}

"$PY" benchmarks/train_throughput.py "$MODE" --out "$OUT/train_throughput.json"
"$PY" benchmarks/sample_throughput.py "$MODE" --out "$OUT/sample_throughput.json"
"$TORCH_PY" benchmarks/vs_pytorch.py "$MODE" --out "$OUT/vs_pytorch.json"
if [ "$MODE" = --cpu ]; then "$PY" benchmarks/report.py --results "$OUT"; fi
