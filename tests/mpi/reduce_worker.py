"""Under mpiexec: ROUNDS federated rounds on known values, written out for an independent numpy check.

In round t, facility f's model is θ_global − Δ(f, t) with Δ(f, t) = 0.01·normal(seed=[f, t]); rank r of
facility f trained (10(f+1) + r)(t+1) tokens; θ_global starts as normal(seed=7). Ownership is `replica`
(each rank owns a contiguous 1/n of the model and holds all of it) or `sharded` (rank r owns and holds
every n-th chunk of 37 values). `poison=F:nan|F:big` makes facility F's update NaN or 1000x larger in
every round. Facilities not sampled in a round (federation.sample) leave their model untouched.
Each rank writes OUT/rank-N.npy (its held values, NaN elsewhere) and OUT/rank-N.json.

    mpiexec -n 6 python tests/mpi/reduce_worker.py 1,2,3 OUT replica ROUNDS NUMEL [federation.key=value ...]
"""
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpifed import configfile
from mpifed.comm import control, topology
from mpifed.comm.watchdog import abort_on_error
from mpifed.federation.reduce import Federation, sampled

sizes = [int(s) for s in sys.argv[1].split(",")]
out, mode, rounds, numel = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
settings = dict(arg.split("=", 1) for arg in sys.argv[6:])
poison = settings.pop("poison", None)
fed = configfile.from_dict(configfile.apply_sets({"facility": [{"name": f"fac{i}", "ranks": s} for i, s in enumerate(sizes)]},
                                         [f"federation.{k}={v}" for k, v in settings.items()])).federation
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks(sizes, control.allgather_int(comm, comm.Get_attr(MPI.APPNUM) or 0))
    topo = topology.build(comm, indices[comm.rank], [f"fac{i}" for i in range(len(sizes))], fed.roots)
    f, r, n = topo.facility_index, topo.facility.rank, topo.facility.size
    model = np.random.default_rng(7).standard_normal(numel).astype(np.float32)
    if mode == "replica":
        start, stop = numel * r // n, numel * (r + 1) // n
        owned = [(start, model[start:stop])]
        held = [(0, model)]
    else:
        # handed over last chunk first: engines need not list their views in offset order
        owned = [(a, model[a:min(a + 37, numel)]) for a in range(37 * r, numel, 37 * n)][::-1]
        held = owned
    federation = Federation(topo, fed, numel, owned, held)
    report = {"facility": f, "bytes_inter": [], "left_out": [], "facility_tokens": []}
    for t in range(rounds):
        train = sampled(len(sizes), fed.sample, 0, t + 1)[f]
        delta = 0.01 * np.random.default_rng([f, t]).standard_normal(numel).astype(np.float32)
        if poison and int(poison.split(":")[0]) == f:
            delta = delta * np.float32(np.nan if poison.endswith("nan") else 1000)
        for offset, values in held:
            if train:
                values -= delta[offset:offset + len(values)]
        tokens = (10 * (f + 1) + r) * (t + 1) if train else 0
        exchange = federation.synchronise(owned, held, tokens, train)
        report["bytes_inter"].append(exchange.bytes_inter)
        report["left_out"].append(list(exchange.left_out))
        report["facility_tokens"].append(exchange.facility_tokens)
    mine = np.full(numel, np.nan, np.float32)
    for offset, values in held:
        mine[offset:offset + len(values)] = values
    np.save(out / f"rank-{comm.rank}.npy", mine)
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(report))
    topo.close()
