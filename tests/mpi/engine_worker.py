"""Under mpiexec: train the same tiny model on the same data with one engine, two inner steps with a
model swap between them (as a round's exchange does), and save what the facility ends with.

    mpiexec -n N python tests/mpi/engine_worker.py ENGINE OUT.npz [key=value ...]

ENGINE is replica, fsdp, or deepspeed; key=value set the fsdp/deepspeed options and the model preset.
Rank 0 writes the whole model (assembled from every rank's owned pieces), the optimizer state in
layout order and the two step losses.
"""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
from mpi4py import MPI

from mpifed.comm import control
from mpifed.comm.topology import start_process_group, stop_process_group
from mpifed.config import DeepSpeedConfig, FsdpConfig
from mpifed.data.corpus import VOCAB_SIZE
from mpifed.engines import EngineSettings, make_engine
from mpifed.model import build_model

engine_name, out = sys.argv[1], sys.argv[2]
options = dict(arg.split("=", 1) for arg in sys.argv[3:])
comm = MPI.COMM_WORLD
torch.set_num_threads(1)
group, _ = start_process_group(comm)
settings = EngineSettings(
    group=group, weight_decay=0.1, grad_clip=float(options.get("clip", 0.5)), grad_accum=2,
    fsdp=FsdpConfig(replicas=int(options.get("replicas", 1)),
                    activation_checkpointing=options.get("checkpointing") == "1"),
    deepspeed=DeepSpeedConfig(zero_stage=int(options.get("stage", 2))))
model = build_model(options.get("preset", "llama-tiny"), 32, seed=0, vocab_size=VOCAB_SIZE)
engine = make_engine(engine_name, model, settings, micro_batch=2)
numel = engine.layout.numel

rng = np.random.default_rng(comm.rank)  # each rank its own data, the same for every engine
batches = [torch.from_numpy(rng.integers(0, 256, (2, 32))) for _ in range(4)]
losses = [engine.train_step(batches[:2], lr=1e-2)]


def flat_state(engine) -> dict[str, np.ndarray]:
    """The optimizer state in layout order, assembled from every rank's owned pieces."""
    state = engine.optimizer_state()
    out = {key: control.gather_pieces(comm, engine.owned_pieces(state[key]), numel) for key in ("exp_avg", "exp_avg_sq")}
    return {"step": state["step"], **out}


if options.get("reload") == "1":  # through the checkpoint path: out in layout order, reset, back in
    saved = flat_state(engine)
    engine.reset_optimizer()
    engine.load_optimizer_state(saved)
engine.loss(batches[0])  # a forward without backward (validation) before the exchange
# The exchange: every rank gets a new model (here: the current one scaled) through its held views.
engine.before_exchange()
owned_model = control.gather_pieces(comm, engine.owned(), numel)
for offset, values in engine.held():
    values[:] = owned_model[offset:offset + len(values)] * np.float32(0.9)
engine.after_exchange()
losses.append(engine.train_step(batches[2:], lr=5e-3))
engine.before_exchange()
final = control.gather_pieces(comm, engine.owned(), numel)
state = flat_state(engine)
val = engine.loss(batches[0])
val = control.allreduce(comm, [val])[0] / comm.size
if comm.rank == 0:
    np.savez(out, model=final, losses=np.array(losses), val=np.array([val]), **state)
stop_process_group()
