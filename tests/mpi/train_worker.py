"""Under mpiexec: train with CONFIG exactly as `mpifed run` does, then every rank writes the sha256 of
its model's parameters (read from the torch module, not from the federation's buffers) to OUT. Under
LoRA, each facility leader also saves the frozen base as its engine holds it (base-RANK.safetensors).

    mpiexec -n 6 python tests/mpi/train_worker.py CONFIG OUT
"""
import hashlib
import sys
from pathlib import Path

from mpi4py import MPI

from mpifed import configfile
from mpifed.comm import control, topology
from mpifed.comm.watchdog import abort_on_error
from mpifed.run import rank
from mpifed.run.trainer import Trainer

cfg = configfile.from_dict(configfile.load(sys.argv[1]))
out = Path(sys.argv[2])
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks([f.ranks for f in cfg.facility], control.allgather_int(comm, 0))
    topo = topology.build(comm, indices[comm.rank], [f.name for f in cfg.facility], cfg.federation.roots)
    trainer = Trainer(cfg, topo)
    trainer.run()
    (out / f"digest-{comm.rank}.txt").write_text(hashlib.sha256(trainer.model_flat().tobytes()).hexdigest())
    if cfg.lora.rank:
        from safetensors.torch import save_file

        frozen = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
                  for name, p in trainer.engine.model().named_parameters() if not p.requires_grad}
        if topo.facility.rank == 0:
            save_file(frozen, str(out / f"base-{comm.rank}.safetensors"))
    trainer.close()
    topo.close()
rank.end(0)  # as `mpifed run` ends
