"""Under mpiexec: a rank that fails or a peer that never answers must end the job, not hang it.

    mpiexec -n 2 python tests/mpi/abort_worker.py raise|stall
raise: rank 1 raises while rank 0 waits in a barrier.  stall: rank 1 sleeps while rank 0 waits in an
all-reduce under a 2 s deadline.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from mpifed.comm.watchdog import abort_on_error, deadline

comm = MPI.COMM_WORLD
with abort_on_error(comm):
    if sys.argv[1] == "raise":
        if comm.rank == 1:
            raise RuntimeError("rank one broke on purpose")
        comm.Barrier()
    else:
        if comm.rank == 1:
            time.sleep(120)
        with deadline(comm, 2.0, "the test exchange"):
            comm.Allreduce(MPI.IN_PLACE, np.ones(4), op=MPI.SUM)
