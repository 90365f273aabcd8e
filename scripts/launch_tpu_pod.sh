#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one process per host, all started at once by `--worker=all`;
# jax.distributed finds the other hosts by itself on TPU VMs (`--distributed`).
#
#   TPU=my-v4-32 ZONE=us-central2-b CONFIG=configs/koniq10k.py WORKDIR=/mnt/shared/runs/koniq \
#       scripts/launch_tpu_pod.sh --config.dataset.manual_dir=/mnt/shared/koniq10k \
#       --config.model.sd_dir=/mnt/shared/sd-v1-5 --config.model.embeddings=/mnt/shared/quality_embeddings.pth
#
# Every host must see the same WORKDIR, DATA_DIR and model files (a Filestore/NFS mount or a
# gcsfuse-mounted bucket): orbax writes each host's shards into WORKDIR/checkpoints. Prepare the
# dataset once before the first multi-host run (one host, any machine):
#   python -c "from dpiqa_jax.data.source import prepare; prepare('koniq10k', '$DATA_DIR', '/mnt/shared/koniq10k')"
# For the full teacher on 16 GB chips add --config.mesh.fsdp=<chips per host or more> (see
# benchmarks/memory.py). Re-running the same command resumes from WORKDIR/checkpoints/latest.
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${CONFIG:?config file}" "${WORKDIR:?shared run folder}"
DATA_DIR="${DATA_DIR:-/mnt/shared/tensorflow_datasets}"
REPO_DIR="${REPO_DIR:-dpiqa_jax}"  # the checkout on every host (same path)

printf -v extra '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO_DIR
  dpiqa-jax train --distributed --config $CONFIG --workdir $WORKDIR --config.dataset.data_dir=$DATA_DIR $extra
"
