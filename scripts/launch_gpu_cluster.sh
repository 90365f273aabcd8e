#!/usr/bin/env bash
# Train on several GPU nodes: one process per node driving all of its GPUs, joined by
# jax.distributed. Two ways to start it:
#
# 1. SLURM (jax.distributed reads the job's layout itself):
#      sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_gpu_cluster.sh \
#          --config configs/koniq10k.py --workdir /shared/runs/koniq --config.mesh.fsdp=8 ...
# 2. By hand, on every node, with the coordinator's address (node 0) and each node's rank:
#      COORDINATOR=node0:1234 NUM_NODES=4 NODE_RANK=<0..3> scripts/launch_gpu_cluster.sh \
#          --config configs/koniq10k.py --workdir /shared/runs/koniq ...
#
# WORKDIR, the dataset's data_dir and the model files must be on storage every node sees; prepare
# the dataset once before the first multi-node run (see scripts/launch_tpu_pod.sh). Re-running the
# same command resumes from WORKDIR/checkpoints/latest.
#SBATCH --job-name=dpiqa-teacher
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" ]]; then
  exec srun --ntasks-per-node=1 dpiqa-jax train --distributed "$@"
fi
: "${COORDINATOR:?host:port of node 0}" "${NUM_NODES:?number of nodes}" "${NODE_RANK:?rank of this node}"
exec dpiqa-jax train --coordinator "$COORDINATOR" --num-processes "$NUM_NODES" --process-id "$NODE_RANK" "$@"
