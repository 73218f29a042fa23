#!/usr/bin/env bash
# Start the ranks with the MPI's own launcher (inside an allocation, or on a workstation), each through
# mpifed-container.sh:
#   MPIFED_RANKS=4 launch/mpifed-mpirun.sh run mpifed.toml --facility NAME
#
#   MPIEXEC         the launcher: mpiexec of the embedded MPICH, or the site's mpirun     [mpiexec]
#   MPIFED_RANKS    ranks to start                                                   [$SLURM_NTASKS or 1]
# Extra launcher options go in MPIEXEC_ARGS.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a extra <<< "${MPIEXEC_ARGS:-}"
exec "${MPIEXEC:-mpiexec}" -n "${MPIFED_RANKS:-${SLURM_NTASKS:-1}}" "${extra[@]}" "$here/mpifed-container.sh" "$@"
