#!/usr/bin/env bash
# Runs one ddpm-jax command as N cooperating JAX processes on this machine (CPU only).
#
# Needs:  bash >= 5.1; the package installed in the current Python (or PYTHON=/path/to/python); a free
#         loopback port (picked automatically).
# Runs:   N copies of `python -m ddpm_jax.main <command> [flags]`, process i with
#           JAX_PLATFORMS=cpu, DEVICES_PER_PROCESS (default 2) fake CPU devices via XLA_FLAGS,
#           --coordinator_address=127.0.0.1:<port> --num_processes=N --process_id=i
#           --cpu_collectives=gloo
#         Output lines are prefixed with [i]. Waits for all; exits nonzero (the first failing
#         process's status) if any fails, after stopping the others, which would otherwise wait
#         for their lost peer.
#         Leave JAX_COMPILATION_CACHE_DIR unset: on CPU, only process 0 writes the persistent cache
#         and the others' keys differ, so process 0 would race ahead of peers that compile, and
#         gloo fails a collective whose peer lags by more than 30 s.
#
# Example (2 processes x 2 devices = one 4-device job; the global batch is config.train.batch_size):
#   launch/local_multiprocess.sh 2 train --config configs/test.py --workdir /tmp/ddpm_mp
#   launch/local_multiprocess.sh 2 sample --workdir /tmp/ddpm_mp --num_samples 16 --batch_size 8
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N {train|sample} [ddpm-jax flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$python" -m ddpm_jax.main "$@" \
      --coordinator_address="127.0.0.1:${port}" \
      --num_processes="${num_processes}" \
      --process_id="${i}" \
      --cpu_collectives=gloo \
      > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=($!)
done

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  rc=0
  finished=""
  wait -n -p finished "${remaining[@]}" || rc=$?
  [[ -n "$finished" ]] || break
  next=()
  for pid in "${remaining[@]}"; do [[ $pid == "$finished" ]] || next+=("$pid"); done
  remaining=("${next[@]+"${next[@]}"}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "process ${finished} exited with status ${rc}; stopping the others" >&2
    for pid in "${remaining[@]+"${remaining[@]}"}"; do kill "$pid" 2>/dev/null || true; done
  fi
done
exit "$status"
