#!/usr/bin/env bash
# Run `mpifed ARGS...` for one rank: inside the site's container when MPIFED_IMAGE is set, else the
# mpifed on PATH. Started once per rank by mpifed-srun.sh or mpifed-mpirun.sh (or by srun/mpirun directly).
#
#   MPIFED            the mpifed command (inside the container: its path there)        [mpifed]
#   MPIFED_IMAGE      the Apptainer/Singularity image (.sif); empty: no container
#   MPIFED_RUNTIME    apptainer | singularity                                          [apptainer]
#   MPIFED_GPU_FLAG   --nv on CUDA sites, --rocm on ROCm sites, empty on CPU sites
#   MPIFED_BINDS      comma-separated host paths to bind (scratch, project, the host MPI's fabric libraries)
#   MPI4PY_LIBMPI     a host MPI library (MPICH ABI: Cray MPICH, MPICH) to use instead of the embedded MPICH;
#                     its folder is bound into the container as well
#   MPIFED_CONTAINER_LIBS  colon-separated host library folders (e.g. RCCL's network plugin) bound in and put
#                     in front of the container's library path, before what a module already set there
# The container sees the job's whole environment (Apptainer passes it through): MPIFED_TOKEN, NCCL_*, FI_*.
set -euo pipefail

mpifed="${MPIFED:-mpifed}"
if [[ -z "${MPIFED_IMAGE:-}" ]]; then
    exec "$mpifed" "$@"
fi

args=(exec)
if [[ -n "${MPIFED_GPU_FLAG:-}" ]]; then
    args+=("$MPIFED_GPU_FLAG")
fi
binds="${MPIFED_BINDS:-}"
if [[ -n "${MPI4PY_LIBMPI:-}" ]]; then
    binds="${binds:+$binds,}$(dirname "$MPI4PY_LIBMPI")"
fi
if [[ -n "${MPIFED_CONTAINER_LIBS:-}" ]]; then
    # APPTAINERENV_/SINGULARITYENV_LD_LIBRARY_PATH: prepended, so a module's own value (LUMI's
    # singularity-bindings sets one for Cray MPICH) is kept behind it rather than replaced
    runtime="${MPIFED_RUNTIME:-apptainer}"
    variable="${runtime^^}ENV_LD_LIBRARY_PATH"
    current="${!variable:-}"
    export "$variable=$MPIFED_CONTAINER_LIBS${current:+:$current}"
    binds="${binds:+$binds,}${MPIFED_CONTAINER_LIBS//:/,}"
fi
if [[ -n "$binds" ]]; then
    args+=(--bind "$binds")
fi
exec "${MPIFED_RUNTIME:-apptainer}" "${args[@]}" "$MPIFED_IMAGE" "$mpifed" "$@"
