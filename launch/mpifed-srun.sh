#!/usr/bin/env bash
# Start every rank of this SLURM allocation with srun, each through mpifed-container.sh:
#   launch/mpifed-srun.sh run mpifed.toml --facility NAME
#
#   MPIFED_SRUN_MPI   srun's --mpi plugin: pmi2 for MPICH-family MPIs (the embedded wheel, Cray MPICH)  [pmi2]
#   MPIFED_RANKS      ranks to start                                                   [$SLURM_NTASKS]
# Extra srun options go in SRUN_ARGS (e.g. SRUN_ARGS="--cpu-bind=cores").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a extra <<< "${SRUN_ARGS:-}"
exec srun --mpi="${MPIFED_SRUN_MPI:-pmi2}" --ntasks="${MPIFED_RANKS:-${SLURM_NTASKS:?run inside a SLURM allocation or set MPIFED_RANKS}}" \
    "${extra[@]}" "$here/mpifed-container.sh" "$@"
