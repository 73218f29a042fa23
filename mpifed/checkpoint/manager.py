"""Checkpoints across ranks: who writes which part of a round's checkpoint, and how a resumed run gives
every rank back exactly the state it had, so that resuming is bit-for-bit the same as never stopping.

The manager is built from explicit parts (the configuration, the communicators, the layout) and is
handed the training state to save or restore as `Parts` (engine, sampler, federation, token count); it
never sees the round loop. Every wait across facilities runs under its own deadline.

Writing (collective over the world): each facility leader gathers its ranks' data positions, RNG states
and error-feedback residuals and writes the facility file with the inner optimizer state; with R > 1,
root r of the first facility writes segment r; after a barrier the global root writes, verifies and
publishes the main file. Reading: world rank 0 reads the model and broadcasts it (as at a fresh start);
the first facility's roots read their outer-state segments and broadcast them to the other roots;
each facility leader reads its own facility file and hands every rank its part.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
from mpi4py import MPI

from mpifed import configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint.format import CheckpointError, VerifiedCheckpoint
from mpifed.comm import control
from mpifed.comm.topology import Topology
from mpifed.comm.watchdog import deadline
from mpifed.config import RunConfig
from mpifed.layout import FlatLayout

if TYPE_CHECKING:
    from mpifed.data.corpus import Sampler
    from mpifed.engines.base import Engine
    from mpifed.federation.reduce import Federation


@dataclass
class Parts:
    """One rank's training state as a checkpoint sees it: what is saved, and what a resume fills in."""

    engine: "Engine"
    """Its model values (held ranges) and inner optimizer state, in layout order."""
    sampler: "Sampler"
    """Its data position (epoch, offset)."""
    federation: "Federation"
    """On roots: the global segment, the outer optimizer's state and the error-feedback residual."""
    tokens_total: int
    """Tokens trained by all facilities so far."""


class CheckpointManager:
    """Saves round checkpoints and restores from them for one rank; every method is collective over the
    world. `model_config` (JSON) and `base_digest` (LoRA's frozen base) are stored with each checkpoint."""

    def __init__(self, cfg: RunConfig, topo: Topology, layout: FlatLayout, model_config: str,
                 base_digest: str = "") -> None:
        self.cfg, self.topo, self.layout = cfg, topo, layout
        self.model_config, self.base_digest = model_config, base_digest
        self.directory = Path(cfg.checkpoint.dir)

    def _deadline(self, what: str) -> ContextManager[None]:
        return deadline(self.topo.world, self.cfg.federation.timeout_s, what)

    # ------------------------------------------------------------------------------------------ saving
    def save(self, round_: int, parts: Parts) -> "Callable[[], None] | None":
        """Write round `round_`'s checkpoint. On the global root it returns the call that publishes it
        (rename, `latest`, pruning), so the round's metrics line can be written first; nothing is
        published unless the whole checkpoint verified."""
        topo, cfg, fed = self.topo, self.cfg, parts.federation
        f32 = cfg.checkpoint.fletcher32
        arrays = self._facility_arrays(parts)
        if topo.is_leader:
            checkpoint.write_facility(self.directory, round_, topo.facility_name, arrays,
                                      {"ranks": topo.facility.size, "engine": cfg.facility[topo.facility_index].engine},
                                      f32)
        if topo.n_roots > 1 and topo.facility_index == 0 and topo.root_index is not None:
            start = fed.segments[topo.root_index][0]
            checkpoint.write_segment(self.directory, round_, topo.root_index, start, fed.theta, fed.outer_state(), f32)
        with self._deadline("waiting for every part of the checkpoint"):
            topo.world.Barrier()
        if not topo.is_global_root:
            return None
        one_root = topo.n_roots == 1
        attrs = dict(tokens=parts.tokens_total, model_config=self.model_config,
                     facilities=json.dumps([asdict(f) for f in cfg.facility]), config=configfile.dump_toml(cfg),
                     base_digest=self.base_digest)
        pending = checkpoint.write_main(self.directory, round_, attrs, self.layout, fed.segments,
                                        fed.outer_state_names, list(topo.facility_names),
                                        model=fed.theta if one_root else None,
                                        outer=fed.outer_state() if one_root else None, fletcher32=f32)

        def publish() -> None:
            checkpoint.publish(pending)
            checkpoint.prune(self.directory, cfg.checkpoint.keep)

        return publish

    def _facility_arrays(self, parts: Parts) -> dict[str, np.ndarray]:
        """This facility's resume state, assembled on its leader (collective over the facility)."""
        fac, leader = self.topo.facility, self.topo.is_leader
        arrays = self._gather_optimizer(parts.engine)
        positions = np.array([parts.sampler.epoch, parts.sampler.position], np.int64)
        rng = torch.get_rng_state().numpy()
        gathered = {"ranks/data": np.empty((fac.size, 2), np.int64),
                    "ranks/torch_rng": np.empty((fac.size, len(rng)), np.uint8)}
        fac.Gather(positions, gathered["ranks/data"] if leader else None, root=0)
        fac.Gather(rng, gathered["ranks/torch_rng"] if leader else None, root=0)
        feedback = parts.federation.feedback
        if self.cfg.federation.compress != "none":
            counts, displs = parts.federation.segment_counts()
            residual = np.empty(self.layout.numel, np.float32) if leader else None
            mine = feedback.residual if feedback is not None else np.empty(0, np.float32)
            fac.Gatherv(mine, [residual, counts, displs, MPI.FLOAT] if leader else None, root=0)
            gathered["exchange/residual"] = residual
        return {**arrays, **gathered} if leader else {}

    def _gather_optimizer(self, engine: "Engine") -> dict[str, np.ndarray]:
        """The inner optimizer state in layout order, on the facility leader, assembled from what each
        rank owns (so its shape depends neither on the engine nor on the facility size)."""
        fac = self.topo.facility
        state = engine.optimizer_state()
        if not control.bcast_int(fac, int(bool(state)) if self.topo.is_leader else None):
            return {}
        out = {"optimizer/step": state["step"]}
        for key in (k for k in state if k != "step"):
            out[f"optimizer/{key}"] = control.gather_pieces(fac, engine.owned_pieces(state[key]), self.layout.numel,
                                                            root=0)
        return out if self.topo.is_leader else {}

    # ---------------------------------------------------------------------------------------- resuming
    def choose(self, target: str) -> VerifiedCheckpoint | None:
        """World rank 0 picks (and fully verifies) the checkpoint named by --resume; every rank gets it."""
        world = self.topo.world
        chosen = ""
        if world.rank == 0:
            try:
                verified = checkpoint.resolve(target)
            except CheckpointError as exc:
                chosen = f"!{exc}"
            else:
                chosen = str(verified.path) if verified else ""
        with self._deadline("choosing the checkpoint to resume from"):
            chosen = control.allgather_str(world, chosen if world.rank == 0 else "")[0]
        if chosen.startswith("!"):
            raise CheckpointError(f"--resume {target}: {chosen[1:]}")
        return checkpoint.verify(chosen, check_data=False) if chosen else None

    def _check_compatible(self, verified: VerifiedCheckpoint, parts: Parts) -> None:
        saved = [(f["name"], f["ranks"]) for f in verified.facilities]
        ours = [(f.name, f.ranks) for f in self.cfg.facility]
        problems = []
        if verified.layout.fingerprint != self.layout.fingerprint:
            problems.append("the model architecture differs (layout fingerprint)")
        if verified.base_digest != self.base_digest:
            problems.append("the frozen base model under the LoRA adapters differs (or LoRA was switched on or off)")
        if saved != ours:
            problems.append(f"facilities (name, ranks) differ: checkpoint {saved}, config {ours}")
        if verified.outer_state != parts.federation.outer_state_names:
            problems.append(f"the checkpoint holds outer state {verified.outer_state}, federation.outer = "
                            f"{self.cfg.federation.outer!r} needs {parts.federation.outer_state_names}")
        if problems:
            raise CheckpointError(f"cannot resume from {verified.path}: {'; '.join(problems)}")

    def restore(self, verified: VerifiedCheckpoint, parts: Parts) -> None:
        """Give every rank its state from `verified`, into `parts` (its token count included)."""
        self._check_compatible(verified, parts)
        topo, fed, engine = self.topo, parts.federation, parts.engine
        model = checkpoint.read_flat(verified.path, self.layout, "model") if topo.world.rank == 0 else None
        with self._deadline("sending the checkpointed model"):
            model = control.bcast_array(topo.world, model, np.float32)
        engine.before_exchange()
        for offset, values in engine.held():
            values[:] = model[offset:offset + len(values)]
        engine.after_exchange()
        outer: dict[str, np.ndarray] = {}
        theta = None
        if topo.root_index is not None:
            start, stop = fed.segments[topo.root_index]
            theta = model[start:stop]
            for name in verified.outer_state:
                mine = checkpoint.read_flat(verified.path, self.layout, f"outer/{name}", start, stop) \
                    if topo.facility_index == 0 else np.empty(stop - start, np.float32)
                with self._deadline("sending the checkpointed outer state"):
                    topo.roots.Bcast(mine, root=0)
                outer[name] = mine
        arrays = checkpoint.read_facility(verified, topo.facility_name)[0] if topo.is_leader else {}
        residual = self._restore_facility(arrays, parts)
        fed.restore(theta, outer, residual, engine.owned(), verified.round)
        parts.tokens_total = verified.tokens

    def _restore_facility(self, arrays: dict[str, np.ndarray], parts: Parts) -> np.ndarray | None:
        """Hand every rank of the facility its part of the leader's `arrays`; returns this root's residual."""
        fac, leader = self.topo.facility, self.topo.is_leader
        names = control.allgather_str(fac, ",".join(k for k in arrays if k.startswith("optimizer/")) if leader else "")[0]
        state = {key.split("/", 1)[1]: control.bcast_array(fac, arrays.get(key).reshape(-1) if leader else None,
                                                           np.float32)
                 for key in names.split(",") if key}
        parts.engine.load_optimizer_state(state)
        positions = np.empty(2, np.int64)
        fac.Scatter(arrays.get("ranks/data") if leader else None, positions, root=0)
        parts.sampler.restore(int(positions[0]), int(positions[1]))
        rng = np.empty(len(torch.get_rng_state()), np.uint8)
        fac.Scatter(arrays.get("ranks/torch_rng") if leader else None, rng, root=0)
        torch.set_rng_state(torch.from_numpy(rng))
        if self.cfg.federation.compress == "none":
            return None
        counts, displs = parts.federation.segment_counts()
        root = self.topo.root_index
        mine = np.empty(counts[root] if root is not None else 0, np.float32)
        # A checkpoint from a run without compression has no residual: start from zero.
        residual = arrays.get("exchange/residual", np.zeros(self.layout.numel, np.float32)) if leader else None
        fac.Scatterv([residual, counts, displs, MPI.FLOAT] if leader else None, mine, root=0)
        return mine if root is not None else None
