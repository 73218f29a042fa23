"""Under mpiexec: build the Topology for SIZES (e.g. 1,2,3) with R roots and write what each rank sees
to OUT/rank-N.json; with --torch also bootstrap each facility's gloo group and all-reduce the ranks.

    mpiexec -n 6 python tests/mpi/topology_worker.py 1,2,3 1 OUT [--torch]
"""
import json
import sys
from pathlib import Path

from mpi4py import MPI

from mpifed.comm import control, topology
from mpifed.comm.watchdog import abort_on_error

sizes = [int(s) for s in sys.argv[1].split(",")]
n_roots, out, use_torch = int(sys.argv[2]), Path(sys.argv[3]), "--torch" in sys.argv
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks(sizes, control.allgather_int(comm, comm.Get_attr(MPI.APPNUM) or 0))
    topo = topology.build(comm, indices[comm.rank], [f"fac{i}" for i in range(len(sizes))], n_roots)
    seen = {
        "launch_rank": comm.rank, "facility": topo.facility_index, "world_rank": topo.world.rank,
        "world_size": topo.world.size, "facility_rank": topo.facility.rank, "facility_size": topo.facility.size,
        "root_index": topo.root_index,
        "roots_size": topo.roots.size if topo.roots != MPI.COMM_NULL else None,
        "roots_rank": topo.roots.rank if topo.roots != MPI.COMM_NULL else None,
        "inter": {str(k): [c.size, c.remote_size] for k, c in topo.inter.items()},
        "offsets": list(topo.facility_offsets), "global_root": topo.is_global_root,
    }
    if use_torch:
        import torch
        import torch.distributed as dist

        topology.start_process_group(topo.facility, "gloo", timeout_s=60)
        value = torch.tensor([float(topo.world.rank)])
        dist.all_reduce(value)
        seen["torch_sum"] = float(value)
        seen["torch_size"] = dist.get_world_size()
        topology.stop_process_group()
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(seen))
    topo.close()
