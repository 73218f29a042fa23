"""A rank blocked in MPI for good, as a hub waiting on a peer that vanished: stop handlers installed,
then a receive that no one will ever match. The main thread never returns to Python.

    python tests/mpi/blocked_worker.py        (prints "ready" just before the receive)
"""
import numpy as np
from mpi4py import MPI

from mpifed.run import stop

stop.install()
print("ready", flush=True)
MPI.COMM_SELF.Recv(np.empty(1), source=0, tag=7)
