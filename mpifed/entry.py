"""The per-rank program that `mpifed run` executes under mpiexec/srun: the only code that touches
`MPI.COMM_WORLD`. Parse -> build topology -> train -> close; any failure on any rank aborts the job."""
from __future__ import annotations

import sys

from mpi4py import MPI

from mpifed import topology, wire
from mpifed.config import RunConfig
from mpifed.watchdog import abort_on_error


def _refuse_to_mix_runs(comm: MPI.Intracomm, cfg: RunConfig, resume: str) -> None:
    """A fresh run must not write into a folder holding another run's checkpoints: its rounds would
    replace some of them, and a later --resume auto could pick up the other run's newest."""
    if resume:
        return
    from mpifed.checkpoint import main_files

    found = wire.bcast_int(comm, len(main_files(cfg.checkpoint.dir)) if comm.rank == 0 else None)
    if found:
        raise ValueError(f"checkpoint.dir {cfg.checkpoint.dir} already holds {found} checkpoint(s) of an earlier "
                         "run; pass --resume auto to continue it, or choose another folder")


def main(cfg: RunConfig, resume: str = "") -> int:
    comm = MPI.COMM_WORLD
    try:
        appnum = comm.Get_attr(MPI.APPNUM)
        indices = topology.facility_of_ranks([f.ranks for f in cfg.facility],
                                             wire.allgather_int(comm, appnum or 0))
        _refuse_to_mix_runs(comm, cfg, resume)
    except ValueError as exc:  # the same on every rank: say it once, exit cleanly
        if comm.rank == 0:
            print(f"mpifed run: error: {exc}", file=sys.stderr, flush=True)
        return 2
    from mpifed.checkpoint import CheckpointError
    from mpifed.data import DataError
    from mpifed.federation.reduce import FederationError
    from mpifed.model import ModelError

    with abort_on_error(comm, expected=(CheckpointError, FederationError, DataError, ModelError)):
        from mpifed.trainer import Trainer  # heavy imports (torch, transformers) only once MPI is up

        topo = topology.build(comm, indices[comm.rank], [f.name for f in cfg.facility], cfg.federation.roots)
        trainer = Trainer(cfg, topo, resume)
        trainer.run()
        trainer.close()
        topo.close()
    return 0
