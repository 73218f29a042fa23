"""Checkpoints across ranks: who writes which part of a round's checkpoint, and how a resumed run gives
every rank back exactly the state it had, so that resuming is bit-for-bit the same as never stopping.

Writing (collective over the world): each facility leader gathers its ranks' data positions, RNG states
and error-feedback residuals and writes the facility file with the inner optimizer state; with R > 1,
root r of the first facility writes segment r; after a barrier the global root writes, verifies and
publishes the main file. Reading: world rank 0 reads the model and broadcasts it (as at a fresh start);
the first facility's roots read their outer-state segments and broadcast them to the other roots;
each facility leader reads its own facility file and hands every rank its part.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from mpi4py import MPI

from mpifed import checkpoint, configfile, wire
from mpifed.checkpoint import CheckpointError, Summary

if TYPE_CHECKING:
    from mpifed.trainer import Trainer


def _facility_arrays(trainer: "Trainer") -> dict[str, np.ndarray]:
    """This facility's resume state, assembled on its leader (collective over the facility)."""
    fac, leader = trainer.topo.facility, trainer.topo.facility.rank == 0
    arrays = _gather_optimizer(trainer)
    positions = np.array([trainer.sampler.epoch, trainer.sampler.position], np.int64)
    rng = torch.get_rng_state().numpy()
    gathered = {"ranks/data": np.empty((fac.size, 2), np.int64), "ranks/torch_rng": np.empty((fac.size, len(rng)), np.uint8)}
    fac.Gather(positions, gathered["ranks/data"] if leader else None, root=0)
    fac.Gather(rng, gathered["ranks/torch_rng"] if leader else None, root=0)
    feedback = trainer.federation.feedback
    if trainer.cfg.federation.compress != "none":
        counts, displs = trainer.federation.segment_counts()
        residual = np.empty(trainer.layout.numel, np.float32) if leader else None
        mine = feedback.residual if feedback is not None else np.empty(0, np.float32)
        fac.Gatherv(mine, [residual, counts, displs, MPI.FLOAT] if leader else None, root=0)
        gathered["exchange/residual"] = residual
    return {**arrays, **gathered} if leader else {}


def _gather_optimizer(trainer: "Trainer") -> dict[str, np.ndarray]:
    """The inner optimizer state in layout order, on the facility leader, assembled from what each rank
    owns (so its shape depends neither on the engine nor on the facility size)."""
    fac, engine = trainer.topo.facility, trainer.engine
    state = engine.optimizer_state()
    if not wire.bcast_int(fac, int(bool(state)) if fac.rank == 0 else None):
        return {}
    out = {"optimizer/step": state["step"]}
    for key in (k for k in state if k != "step"):
        out[f"optimizer/{key}"] = wire.gather_pieces(fac, engine.owned_pieces(state[key]), trainer.layout.numel, root=0)
    return out if fac.rank == 0 else {}


def save(trainer: "Trainer", round_: int) -> "Callable[[], None] | None":
    """Write round `round_`'s checkpoint; collective over the world. On the global root it returns the
    call that publishes it (rename, `latest`, pruning), so the round's metrics line can be written
    first; nothing is published unless the whole checkpoint verified."""
    topo, cfg, fed = trainer.topo, trainer.cfg, trainer.federation
    directory, f32 = Path(cfg.checkpoint.dir), cfg.checkpoint.fletcher32
    arrays = _facility_arrays(trainer)
    if topo.facility.rank == 0:
        checkpoint.write_facility(directory, round_, topo.facility_name, arrays,
                                  {"ranks": topo.facility.size, "engine": cfg.facility[topo.facility_index].engine}, f32)
    if topo.n_roots > 1 and topo.facility_index == 0 and topo.root_index is not None:
        start = fed.segments[topo.root_index][0]
        checkpoint.write_segment(directory, round_, topo.root_index, start, fed.theta, fed.outer_state(), f32)
    with trainer.across("waiting for every part of the checkpoint"):
        topo.world.Barrier()
    if topo.is_global_root:
        one_root = topo.n_roots == 1
        attrs = dict(tokens=trainer.tokens_total, model_config=trainer.model_config.to_json_string(),
                     facilities=json.dumps([asdict(f) for f in cfg.facility]), config=configfile.dump_toml(cfg),
                     base_digest=trainer.base_digest)
        pending = checkpoint.write_main(directory, round_, attrs, trainer.layout, fed.segments, fed.outer_state_names,
                                        list(topo.facility_names), model=fed.theta if one_root else None,
                                        outer=fed.outer_state() if one_root else None, fletcher32=f32)

        def publish() -> None:
            checkpoint.publish(pending)
            checkpoint.prune(directory, cfg.checkpoint.keep)

        return publish
    return None


def choose(world: MPI.Intracomm, target: str) -> Summary | None:
    """World rank 0 picks (and fully verifies) the checkpoint named by --resume; every rank gets it."""
    chosen = ""
    if world.rank == 0:
        try:
            summary = checkpoint.resolve(target)
        except CheckpointError as exc:
            chosen = f"!{exc}"
        else:
            chosen = str(summary.path) if summary else ""
    chosen = wire.allgather_str(world, chosen if world.rank == 0 else "")[0]
    if chosen.startswith("!"):
        raise CheckpointError(f"--resume {target}: {chosen[1:]}")
    return checkpoint.verify(chosen, check_data=False) if chosen else None


def _check_compatible(trainer: "Trainer", summary: Summary) -> None:
    saved = [(f["name"], f["ranks"]) for f in summary.facilities]
    ours = [(f.name, f.ranks) for f in trainer.cfg.facility]
    problems = []
    if summary.layout.fingerprint != trainer.layout.fingerprint:
        problems.append("the model architecture differs (layout fingerprint)")
    if summary.base_digest != trainer.base_digest:
        problems.append("the frozen base model under the LoRA adapters differs (or LoRA was switched on or off)")
    if saved != ours:
        problems.append(f"facilities (name, ranks) differ: checkpoint {saved}, config {ours}")
    if summary.outer_state != trainer.federation.outer_state_names:
        problems.append(f"the checkpoint holds outer state {summary.outer_state}, federation.outer = "
                        f"{trainer.cfg.federation.outer!r} needs {trainer.federation.outer_state_names}")
    if problems:
        raise CheckpointError(f"cannot resume from {summary.path}: {'; '.join(problems)}")


def restore(trainer: "Trainer", summary: Summary) -> None:
    """Give every rank its state from `summary`; collective over the world."""
    _check_compatible(trainer, summary)
    topo, fed = trainer.topo, trainer.federation
    model = checkpoint.read_flat(summary.path, trainer.layout, "model") if topo.world.rank == 0 else None
    model = wire.bcast_array(topo.world, model, np.float32)
    trainer.engine.before_exchange()
    for offset, values in trainer.engine.held():
        values[:] = model[offset:offset + len(values)]
    trainer.engine.after_exchange()
    outer: dict[str, np.ndarray] = {}
    theta = None
    if topo.root_index is not None:
        start, stop = fed.segments[topo.root_index]
        theta = model[start:stop]
        for name in summary.outer_state:
            mine = checkpoint.read_flat(summary.path, trainer.layout, f"outer/{name}", start, stop) \
                if topo.facility_index == 0 else np.empty(stop - start, np.float32)
            topo.roots.Bcast(mine, root=0)
            outer[name] = mine
    arrays = checkpoint.read_facility(summary, topo.facility_name)[0] if topo.facility.rank == 0 else {}
    residual = _restore_facility(trainer, arrays)
    fed.restore(theta, outer, residual, trainer.engine.owned())
    trainer.tokens_total = summary.tokens


def _restore_facility(trainer: "Trainer", arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Hand every rank of the facility its part of the leader's `arrays`; returns this root's residual."""
    fac, leader = trainer.topo.facility, trainer.topo.facility.rank == 0
    names = wire.allgather_str(fac, ",".join(k for k in arrays if k.startswith("optimizer/")) if leader else "")[0]
    state = {key.split("/", 1)[1]: wire.bcast_array(fac, arrays.get(key).reshape(-1) if leader else None, np.float32)
             for key in names.split(",") if key}
    trainer.engine.load_optimizer_state(state)
    positions = np.empty(2, np.int64)
    fac.Scatter(arrays.get("ranks/data") if leader else None, positions, root=0)
    trainer.sampler.restore(int(positions[0]), int(positions[1]))
    rng = np.empty(len(torch.get_rng_state()), np.uint8)
    fac.Scatter(arrays.get("ranks/torch_rng") if leader else None, rng, root=0)
    torch.set_rng_state(torch.from_numpy(rng))
    if trainer.cfg.federation.compress == "none":
        return None
    counts, displs = trainer.federation.segment_counts()
    root = trainer.topo.root_index
    mine = np.empty(counts[root] if root is not None else 0, np.float32)
    # A checkpoint from a run without compression has no residual: start from zero.
    residual = arrays.get("exchange/residual", np.zeros(trainer.layout.numel, np.float32)) if leader else None
    fac.Scatterv([residual, counts, displs, MPI.FLOAT] if leader else None, mine, root=0)
    return mine if root is not None else None
