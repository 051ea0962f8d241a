#!/usr/bin/env bash
# Trains ddpm-jax on a Cloud TPU VM slice (one process per TPU VM worker, all running one job).
#
# Needs:  the gcloud CLI, logged in, with a project and the TPU API enabled; a GCS bucket for the
#         workdir that the TPU VMs' service account can write; this repository checked out here.
# Runs:   1. creates the TPU VM slice $TPU_NAME (or reuses it if it exists);
#         2. copies this checkout's HEAD commit (git archive: commit local changes first) to every
#            worker and installs it there with jax[tpu], gcsfs and google-cloud-storage (gs://
#            paths for orbax, the PNG grids and TensorBoard);
#         3. optionally copies a prepared tfds dataset from $DATA_GCS to each worker's local disk;
#         4. starts the same command on every worker, detached (nohup, log in ~/ddpm_train.log):
#              python3 -m ddpm_jax.main train --config configs/$CONFIG --workdir $WORKDIR \
#                  --distributed=on --config.data.data_dir=$DATA_DIR "$@"
#            `--distributed=on`: jax.distributed.initialize() finds the other workers through the
#            TPU metadata server. The global batch is config.train.batch_size; each worker feeds
#            its own slice of it. Process 0 alone logs metrics and writes samples/TensorBoard.
#         Preemption: on SIGTERM the workers agree on a step, write its checkpoint and exit 75.
#         Running this script again (after recreating a preempted spot slice) resumes from the
#         newest checkpoint in $WORKDIR.
#
# Environment (defaults in brackets):
#   TPU_NAME [ddpm-pod]   ZONE [us-central2-b]   ACCELERATOR_TYPE [v4-32]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]   SPOT [0: on-demand; 1: --spot]
#   WORKDIR (required, gs://bucket/path)   CONFIG [cifar10.py]
#   DATA_GCS (optional: gs:// copy of a `tfds build --file_format=array_record` data dir)
#   DATA_DIR [$HOME/tensorflow_datasets on the workers: where tfds data are read, DATA_GCS goes]
#   PIP_EXTRA (optional: more pip requirements, e.g. a pinned "jax[tpu]==0.x")
#
# Example:
#   WORKDIR=gs://my-bucket/ddpm/cifar10 DATA_GCS=gs://my-bucket/tensorflow_datasets \
#     launch/tpu_pod.sh --config.train.num_steps=800000
#   gcloud compute tpus tpu-vm ssh ddpm-pod --zone us-central2-b --worker=0 \
#     --command 'tail -f ~/ddpm_train.log'
set -euo pipefail

TPU_NAME=${TPU_NAME:-ddpm-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-cifar10.py}
DATA_GCS=${DATA_GCS:-}
DATA_DIR=${DATA_DIR:-'$HOME/tensorflow_datasets'}  # expanded on the workers
PIP_EXTRA=${PIP_EXTRA:-}
: "${WORKDIR:?set WORKDIR to a gs://bucket/path for checkpoints, samples and TensorBoard}"

tpu=(gcloud compute tpus tpu-vm)
on_all=("${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all)

# 1. The slice.
if "${tpu[@]}" describe "$TPU_NAME" --zone "$ZONE" > /dev/null 2>&1; then
  echo "Reusing TPU VM $TPU_NAME in $ZONE."
else
  spot_flag=()
  [[ "$SPOT" == 1 ]] && spot_flag=(--spot)
  "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" "${spot_flag[@]}"
fi

# 2. The code, on every worker.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$(dirname "$0")/.." archive --format=tar.gz --prefix=ddpm_jax/ -o "$archive" HEAD
"${tpu[@]}" scp "$archive" "$TPU_NAME":ddpm_jax.tar.gz --zone "$ZONE" --worker=all
"${on_all[@]}" --command "
  set -e
  rm -rf ~/ddpm_jax && tar xzf ~/ddpm_jax.tar.gz -C ~
  python3 -m pip install -q -U pip
  python3 -m pip install -q 'jax[tpu]' gcsfs google-cloud-storage ~/ddpm_jax ${PIP_EXTRA}
"

# 3. The data (optional), on every worker's local disk.
if [[ -n "$DATA_GCS" ]]; then
  "${on_all[@]}" --command "mkdir -p ${DATA_DIR} && gcloud storage rsync -r ${DATA_GCS} ${DATA_DIR}"
fi

# 4. The same command on every worker. Arguments are quoted for the remote shell (DATA_DIR is
#    not: it may name the workers' $HOME).
extra=""
(($#)) && extra=$(printf ' %q' "$@")
"${on_all[@]}" --command "
  cd ~/ddpm_jax
  nohup python3 -m ddpm_jax.main train --config $(printf %q "configs/${CONFIG}") \
    --workdir $(printf %q "${WORKDIR}") \
    --distributed=on --config.data.data_dir=${DATA_DIR}${extra} < /dev/null > ~/ddpm_train.log 2>&1 &
  echo \"\$(hostname): started (pid \$!), log ~/ddpm_train.log\"
"
