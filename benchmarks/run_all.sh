#!/usr/bin/env bash
# Runs every benchmark with CPU settings, writes JSON to benchmarks/results/ and RESULTS.md.
#
#   bash benchmarks/run_all.sh            # about 12 minutes on 2 quiet cores
#   bash benchmarks/run_all.sh --quick    # smoke test: tiny batches and iteration counts
#
# PY runs the JAX benchmarks, TORCH_PY (an interpreter with torch + diffusers + jax) the
# comparison with PyTorch; NOTE (optional) becomes a banner line in RESULTS.md.
# On a GPU/TPU host run the three scripts with their defaults instead (see their docstrings).
set -euo pipefail
cd "$(dirname "$0")/.."

pick() { for p in "$@"; do if [ -x "$p" ] || command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi; done; }
PY=${PY:-$(pick /tmp/venv312/bin/python python3 python)}
TORCH_PY=${TORCH_PY:-$(pick /tmp/venv311/bin/python python3 python)}
OUT=${OUT:-benchmarks/results}
NOTE=${NOTE:-}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

QUICK=()
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); fi
# Settings, unless --quick (whose own tiny batches and counts then apply).
settings() { if [ ${#QUICK[@]} -eq 0 ]; then echo "$@"; else echo --quick; fi; }

mkdir -p "$OUT"
rm -f "$OUT"/train_throughput_*.json "$OUT"/sample_throughput.json "$OUT"/vs_pytorch.json
start=$(date +%s)
step() { echo; echo "=== $* ($(($(date +%s) - start)) s)"; }

step "training step: digits, float32 and bfloat16"
# shellcheck disable=SC2046
"$PY" benchmarks/train_throughput.py --models digits --dtypes float32,bfloat16 \
  --out "$OUT/train_throughput_1_digits.json" \
  $(settings --per_device_batch 32 --warmup 1 --iters 3 --repeats 1)

step "training step: cifar10 (35.7M), float32 and bfloat16"
# shellcheck disable=SC2046
"$PY" benchmarks/train_throughput.py --models cifar10 --dtypes float32,bfloat16 \
  --out "$OUT/train_throughput_2_cifar10.json" \
  $(settings --per_device_batch 2 --warmup 1 --iters 3 --repeats 1)

step "training step: the library's step against the same step in a length-1 lax.scan"
# shellcheck disable=SC2046
"$PY" benchmarks/train_throughput.py --models digits,cifar10 --dtypes float32 \
  --variants library,scanned --out "$OUT/train_throughput_3_scan.json" \
  $(settings --per_device_batch digits=8,cifar10=1 --warmup 0 --iters 1 --repeats 1)

step "sampling: scan vs host loop, ancestral and DDIM-50 (cifar10 at T=100)"
# shellcheck disable=SC2046
"$PY" benchmarks/sample_throughput.py --out "$OUT/sample_throughput.json" \
  $(settings --per_device_batch digits=16,cifar10=1 --num_timesteps digits=1000,cifar10=100)

step "against PyTorch: train and sample steps"
# shellcheck disable=SC2046
"$TORCH_PY" benchmarks/vs_pytorch.py --out "$OUT/vs_pytorch.json" \
  $(settings --per_device_batch digits=32,cifar10=2)

step "RESULTS.md"
"$PY" benchmarks/report.py --results "$OUT" --out benchmarks/RESULTS.md ${NOTE:+--note "$NOTE"}
echo "done in $(($(date +%s) - start)) s"
