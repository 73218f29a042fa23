"""Under mpiexec: one federated round on known values. Facility f's model is normal(seed=100+f), split
across its ranks like the replica engine's owned ranges; rank r of facility f trained 10*(f+1)+r tokens;
the global model before the round is normal(seed=7). Every rank writes its model after the round to
OUT/rank-N.npy and its exchange to OUT/rank-N.json.

    mpiexec -n 6 python tests/mpi/reduce_worker.py 1,2,3 ROOTS NUMEL OUT
"""
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpifed import topology, wire
from mpifed.federation.outer import FedAvg
from mpifed.federation.reduce import federated_round
from mpifed.watchdog import abort_on_error

sizes = [int(s) for s in sys.argv[1].split(",")]
n_roots, numel, out = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks(sizes, wire.allgather_int(comm, comm.Get_attr(MPI.APPNUM) or 0))
    topo = topology.build(comm, indices[comm.rank], [f"fac{i}" for i in range(len(sizes))], n_roots)
    f, r, n = topo.facility_index, topo.facility.rank, topo.facility.size
    local = np.random.default_rng(100 + f).standard_normal(numel).astype(np.float32)
    start, stop = numel * r // n, numel * (r + 1) // n
    global_flat = np.random.default_rng(7).standard_normal(numel).astype(np.float32)
    exchange = federated_round(topo, [(start, local[start:stop])], [(0, local)], global_flat,
                               tokens=10 * (f + 1) + r, outer=FedAvg(), timeout_s=60)
    assert np.array_equal(local, global_flat), "held values must equal the new global model"
    np.save(out / f"rank-{comm.rank}.npy", local)
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(
        {"facility": f, "bytes_inter": exchange.bytes_inter, "facility_tokens": exchange.facility_tokens}))
    topo.close()
