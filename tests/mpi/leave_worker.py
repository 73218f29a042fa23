"""Under mpiexec, one facility's own launch that runs exactly as `mpifed run CONFIG --facility NAME`
(so a planned stop may make it leave, or the others go on without it), recording for an independent
check what the round rule is computed from: each facility leader writes its facility's model as it
stands before every exchange (local-NAME-ROUND.npy), and every rank the model it holds after every
round (global-NAME-RANK-ROUND.npy) and at the start (round 0); a facility coming back, every rank's
model once it trained ahead (ahead-NAME-RANK.npy) and once it is in (entered-NAME-RANK.npy). While
the file OUT/hold exists and facility c is out, the hub holds before its inner steps (so that c's next
job finds the round it left after still running). Exits with `mpifed run`'s code.

    mpiexec -n 2 python tests/mpi/leave_worker.py CONFIG NAME OUT [RESUME]
"""
import sys
import time
from pathlib import Path

import numpy as np

from mpifed import configfile
from mpifed.run import rank
from mpifed.run.trainer import Trainer

cfg = configfile.from_dict(configfile.load(sys.argv[1]))
name, out = sys.argv[2], Path(sys.argv[3])
build, sync, train_round = Trainer._build, Trainer._sync, Trainer.train_round
inner, train_ahead, regroup = Trainer._inner, Trainer.train_ahead, Trainer.regroup


def _global(trainer: Trainer, round_: int) -> None:
    np.save(out / f"global-{name}-{trainer.topo.facility.rank}-{round_}.npy", trainer.model_flat())


def recording_build(self: Trainer, *args) -> None:
    build(self, *args)
    _global(self, 0)


def recording_sync(self: Trainer, fragment: int, *args):
    local = self.model_flat()  # collective over the facility, as the sync itself is
    if self.topo.is_leader:
        np.save(out / f"local-{name}-{self.round}.npy", local)
    return sync(self, fragment, *args)


def recording_round(self: Trainer, round_: int) -> None:
    train_round(self, round_)
    _global(self, round_)


def holding_inner(self: Trainer, *args):
    while self.topo.is_global_root and "c" not in self.topo.facility_names and (out / "hold").exists():
        time.sleep(0.05)
    return inner(self, *args)


def recording_ahead(self: Trainer, waiting):
    world, told = train_ahead(self, waiting)
    np.save(out / f"ahead-{name}-{self.topo.facility.rank}.npy", self.model_flat())
    return world, told


def recording_regroup(self: Trainer, *args, newcomer=None, **kwargs) -> None:
    regroup(self, *args, newcomer=newcomer, **kwargs)
    if newcomer:
        np.save(out / f"entered-{name}-{self.topo.facility.rank}.npy", self.model_flat())


Trainer._build, Trainer._sync, Trainer.train_round = recording_build, recording_sync, recording_round
Trainer._inner, Trainer.train_ahead, Trainer.regroup = holding_inner, recording_ahead, recording_regroup
rank.end(rank.main_joined(cfg, name, resume=sys.argv[4] if len(sys.argv) > 4 else ""))
