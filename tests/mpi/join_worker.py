"""Under mpiexec, one facility's own launch: join the others as `mpifed run CONFIG --facility NAME`
does, train, then every rank writes the sha256 of its model (from the torch module) to OUT.

    mpiexec -n 2 python tests/mpi/join_worker.py CONFIG NAME OUT
"""
import hashlib
import sys
from pathlib import Path

from mpi4py import MPI

from mpifed import configfile
from mpifed.comm import topology
from mpifed.comm.join import JoinError
from mpifed.comm.watchdog import abort_on_error
from mpifed.run import rank
from mpifed.run.trainer import Trainer

cfg = configfile.from_dict(configfile.load(sys.argv[1]))
name, out = sys.argv[2], Path(sys.argv[3])
with abort_on_error(MPI.COMM_WORLD, expected=(JoinError,)):
    joined = rank.join_world(MPI.COMM_WORLD, cfg, name)
with abort_on_error(joined.world):
    topo = topology.build(joined.world, joined.index, [f.name for f in joined.cfg.facility], cfg.federation.roots,
                          joined.token)
    trainer = Trainer(joined.cfg, topo)
    trainer.run()
    (out / f"digest-{name}-{topo.facility.rank}.txt").write_text(hashlib.sha256(trainer.model_flat().tobytes()).hexdigest())
    trainer.close()
    topo.close()
rank.end(0)  # as `mpifed run` ends
