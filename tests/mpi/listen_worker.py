"""Under mpiexec: which TCP listeners torch adds to a rank. Lists the listening sockets this process holds
(the kernel's /proc/self/net/tcp and tcp6, matched to this process's descriptors) once MPI has started,
then again after `start_process_group` (the whole launch as one facility) and one all-reduce, and writes
both lists, this node's name and the store's announced address to OUT/rank-N.json.

    mpiexec -n 2 python tests/mpi/listen_worker.py OUT
"""
import json
import os
import socket
import sys
from pathlib import Path

from mpi4py import MPI

from mpifed.comm import topology
from mpifed.comm.watchdog import abort_on_error


def _address(hex_address: str) -> str:
    """"0100007F:1F90" (the kernel's byte order, 32-bit words) -> "127.0.0.1:8080"; IPv6 as "[::1]:8080"."""
    address, port = hex_address.split(":")
    raw = b"".join(int(address[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(address), 8))
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def listeners() -> list[str]:
    """"address:port" of every listening TCP socket this process holds a descriptor of, sorted."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(_address(fields[1]))
    return sorted(found)


comm = MPI.COMM_WORLD
out = Path(sys.argv[1])
with abort_on_error(comm):
    import torch
    import torch.distributed as dist

    before = listeners()
    topology.start_process_group(comm, "gloo", timeout_s=60)
    value = torch.ones(1)
    dist.all_reduce(value)  # gloo's pairs are connected by now
    after = listeners()
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # the process group wraps the TCPStore in prefix stores
        store = store.underlying_store
    seen = {"node": MPI.Get_processor_name(), "before": before, "after": after, "sum": float(value),
            "store": f"{store.host}:{store.port}", "gloo_interface": os.environ.get("GLOO_SOCKET_IFNAME", "")}
    comm.Barrier()  # every rank has looked before any closes its listeners
    topology.stop_process_group()
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(seen))
