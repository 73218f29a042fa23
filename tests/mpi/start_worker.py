"""Under mpiexec: build every rank's trainer for CONFIG exactly as `mpifed run` does (its start, or its
resume), optionally train, and write what each rank then holds of the model to OUT/held-RANK.npz
(offsets and values, read from the engine). With --limit-mb, first limit this process's address space
to what it has mapped so far plus that many MiB (`resource.setrlimit`): a rank that allocates more
fails; --probe then tries one whole fp32 model more (OUT/probe-RANK.txt: "room" or "no room"), and
OUT/mapped-RANK.txt says how much the rank mapped beyond what it had when the limit was set (or would
have been), OUT/resident-RANK.txt how far its resident peak rose beyond what it held then.

    mpiexec -n 4 python tests/mpi/start_worker.py CONFIG OUT [--limit-mb N] [--probe] [--resume X] [--train]
"""
import argparse
import resource
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpifed import configfile
from mpifed.comm import control, topology
from mpifed.comm.watchdog import abort_on_error
from mpifed.run import rank
from mpifed.run.trainer import Trainer


def mapped_bytes(key: str = "VmSize") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("out", type=Path)
parser.add_argument("--limit-mb", type=int, default=0)
parser.add_argument("--resume", default="")
parser.add_argument("--train", action="store_true")
parser.add_argument("--probe", action="store_true", help="then try to allocate one whole fp32 model")
args = parser.parse_args()
cfg = configfile.from_dict(configfile.load(args.config))
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks([f.ranks for f in cfg.facility], control.allgather_int(comm, 0))
    topo = topology.build(comm, indices[comm.rank], [f.name for f in cfg.facility], cfg.federation.roots)
    import torch.distributed.fsdp  # noqa: F401 - the libraries mapped before the limit: it bounds what
    import transformers.models.llama.modeling_llama  # noqa: F401 - the rank allocates, not its code
    if any(f.engine == "deepspeed" for f in cfg.facility):
        import deepspeed  # noqa: F401
    before, resident = mapped_bytes(), mapped_bytes("VmRSS")
    if args.limit_mb:
        limit = before + args.limit_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    trainer = Trainer(cfg, topo, args.resume)
    if args.train:
        trainer.run()
    trainer.engine.before_exchange()  # the views hold the engine's own values now
    held = trainer.engine.held()
    np.savez(args.out / f"held-{comm.rank}.npz", offsets=np.array([o for o, _ in held], np.int64),
             **{f"v{i}": values for i, (_, values) in enumerate(held)})
    if args.probe:  # is there room left for one whole copy of the model? (there must not be)
        try:
            whole = np.ones(trainer.layout.numel, np.float32)
            room = "room"
            del whole
        except MemoryError:
            room = "no room"
        (args.out / f"probe-{comm.rank}.txt").write_text(room)
    trainer.close()
    # how much address space the rank took beyond what it had mapped when the limit was set
    (args.out / f"mapped-{comm.rank}.txt").write_text(str(mapped_bytes("VmPeak") - before))
    (args.out / f"resident-{comm.rank}.txt").write_text(str(mapped_bytes("VmHWM") - resident))
    topo.close()
rank.end(0)  # as `mpifed run` ends
