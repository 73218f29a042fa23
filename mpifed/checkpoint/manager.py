"""Checkpoints across ranks: who writes which part of a round's checkpoint, and how a resumed run gives
every rank back exactly the state it had, so that resuming is bit-for-bit the same as never stopping.

The manager is built from explicit parts (the configuration, the communicators, the layout) and is
handed the training state to save or restore as `Parts` (engine, sampler, federation, token count); it
never sees the round loop. Every wait across facilities runs under its own deadline.

No two sites need to share a filesystem. Writing (collective over the world): each facility leader
gathers its ranks' data positions, RNG states and error-feedback residuals and writes the facility part,
with the inner optimizer state, into its own site's `checkpoint.dir`; with R > 1, root r of the first
facility writes segment r; the parts' content digests travel over MPI to the global root, which writes,
checks and publishes the main file (model, outer state, the digests) in the hub's folder. Resuming: the
global root offers the newest main file that verifies, every facility leader checks its own part of that
round against the recorded digest, and they go back a round until all agree. World rank 0 then
broadcasts the model (as at a fresh start), the first facility's roots read their outer-state segments
and broadcast them to the other roots, and each leader hands every rank of its facility its part.
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


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint every site agreed to resume from (the same on every rank)."""

    round: int
    """The round it was written after."""
    tokens: int
    """Tokens trained by all facilities up to then."""
    path: str
    """Its main file, as the hub's site sees it."""


@dataclass
class Parts:
    """One rank's training state as a checkpoint sees it: what is saved, and what a resume fills in."""

    engine: "Engine"
    """Its model values (held ranges) and inner optimizer state, in layout order."""
    sampler: "Sampler"
    """Its data position (epoch, offset)."""
    federation: "Federation"
    """On roots: the global segment, the outer optimizer's state and the exchange's error-feedback state."""
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
        self.resume_dir = self.directory
        """Where this site's own part of the checkpoint to resume from is (set by `choose`)."""

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
            part = checkpoint.write_facility(self.directory, round_, topo.facility_name, arrays,
                                             {"ranks": topo.facility.size,
                                              "engine": cfg.facility[topo.facility_index].engine}, f32)
        if topo.n_roots > 1 and topo.facility_index == 0 and topo.root_index is not None:
            start = fed.segments[topo.root_index][0]
            checkpoint.write_segment(self.directory, round_, topo.root_index, start, fed.theta, fed.outer_state(), f32)
        with self._deadline(f"checkpoint of round {round_}: collecting every site's part"):
            said = control.allgather_str(topo.world, checkpoint.part_digest(part) if topo.is_leader else "")
        digests = {name: said[first] for name, first in zip(topo.facility_names, topo.facility_offsets)}
        if topo.is_leader and not topo.is_global_root and cfg.checkpoint.keep:
            # one more than the hub keeps: the newest part's main file may not be published yet
            checkpoint.prune_parts(self.directory, topo.facility_name, cfg.checkpoint.keep + 1)
        if not topo.is_global_root:
            return None
        one_root = topo.n_roots == 1
        attrs = dict(tokens=parts.tokens_total, model_config=self.model_config,
                     facilities=json.dumps([asdict(f) for f in cfg.facility]), config=configfile.dump_toml(cfg),
                     base_digest=self.base_digest)
        pending = checkpoint.write_main(self.directory, round_, attrs, self.layout, fed.segments,
                                        fed.outer_state_names, list(topo.facility_names),
                                        model=fed.theta if one_root else None,
                                        outer=fed.outer_state() if one_root else None, fletcher32=f32,
                                        part_digests=digests)

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
        fed = parts.federation
        if fed.local_differs:  # the local model itself (not its distance to the global one: that rounds)
            gathered["federation/local"] = control.gather_pieces(fac, parts.engine.owned(), self.layout.numel, root=0)
            gathered["federation/tokens"] = np.array([*fed.tokens, fed.flushed], np.int64)
        counts, displs = fed.segment_counts()
        for name in fed.exchange_state_names:  # each root's segment of it, assembled in layout order
            whole = np.empty(self.layout.numel, np.float32) if leader else None
            mine = fed.exchange_state()[name] if self.topo.root_index is not None else np.empty(0, np.float32)
            fac.Gatherv(mine, [whole, counts, displs, MPI.FLOAT] if leader else None, root=0)
            gathered[f"exchange/{name}"] = whole
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
    def choose(self, target: str, parts: Parts) -> ResumePoint | None:
        """The checkpoint named by --resume (a main file, or a folder's newest) that every site can
        verify its part of: the global root offers main files newest first (each verified in full), every
        facility leader checks its own part in its own folder, and they go back until all agree. None
        when there is none; a CheckpointError, on every rank, when a named file cannot be used."""
        world, topo = self.topo.world, self.topo
        found = checkpoint.candidates(target) if world.rank == 0 else []
        single = len(found) == 1 and found[0] == Path(target)
        self.resume_dir = checkpoint.parts_folder(target)
        refusal = ""  # on the global root: why a named file cannot be used
        while True:
            offer = None
            if world.rank == 0:
                offer = json.dumps({"error": refusal}) if refusal else self._offer(found, single, parts)
            with self._deadline("resume: choosing the checkpoint"):
                point = json.loads(control.bcast_str(world, offer))
            if "error" in point:
                raise CheckpointError(point["error"])
            if not point:
                return None
            problem = self._check_own_part(point) if topo.is_leader else ""
            with self._deadline(f"resume: every site checking its part of round {point['round']}"):
                problems = [p for p in control.allgather_str(world, problem) if p]
            if not problems:
                return ResumePoint(point["round"], point["tokens"], point["path"])
            if world.rank == 0 and single:
                refusal = f"--resume {target}: {'; '.join(problems)}"
            elif world.rank == 0:
                print(f"mpifed: skipping checkpoint {Path(point['path']).name}: {'; '.join(problems)}", flush=True)

    def _offer(self, found: list[Path], single: bool, parts: Parts) -> str:
        """On the global root: the next candidate of `found` as JSON ({} when none is left, {"error"} to
        stop every rank)."""
        while found:
            path = found.pop(0)
            try:
                verified = checkpoint.verify(path, facilities="none")
            except CheckpointError as exc:
                if single:
                    return json.dumps({"error": f"--resume {path}: {exc}"})
                print(f"mpifed: skipping checkpoint {path.name}: {exc}", flush=True)
                continue
            problems = self._incompatibilities(verified, parts)
            if problems:
                return json.dumps({"error": f"cannot resume from {verified.path}: {'; '.join(problems)}"})
            return json.dumps({"round": verified.round, "tokens": verified.tokens, "path": str(verified.path),
                               "digests": verified.part_digests})
        return "{}"

    def _check_own_part(self, point: dict) -> str:
        """On a facility leader: why its part of the offered round cannot be used here ("" if it can)."""
        name = self.topo.facility_name
        path = self.resume_dir / checkpoint.facility_name(point["round"], name)
        try:
            checkpoint.check_part(path, point["digests"].get(name, ""))
        except CheckpointError as exc:
            return f"facility {name}: {exc}"
        return ""

    def _incompatibilities(self, verified: VerifiedCheckpoint, parts: Parts) -> list[str]:
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
        return problems

    def restore(self, point: ResumePoint, parts: Parts) -> None:
        """Give every rank its state from the checkpoint `choose` agreed on, into `parts` (its token count
        included)."""
        topo, fed, engine = self.topo, parts.federation, parts.engine
        path = Path(point.path)  # the hub's file: read only by ranks of the first facility, at the hub's site
        model = checkpoint.read_flat(path, self.layout, "model") if topo.world.rank == 0 else None
        with self._deadline("resume: sending the checkpointed model"):
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
            for name in fed.outer_state_names:
                mine = checkpoint.read_flat(path, self.layout, f"outer/{name}", start, stop) \
                    if topo.facility_index == 0 else np.empty(stop - start, np.float32)
                with self._deadline("resume: sending the checkpointed outer state"):
                    topo.roots.Bcast(mine, root=0)
                outer[name] = mine
        arrays = checkpoint.read_facility(self.resume_dir, point.round, topo.facility_name)[0] if topo.is_leader else {}
        exchange = self._restore_facility(arrays, parts)
        if not fed.local_differs:
            fed.restore(theta, outer, exchange, engine.owned(), point.round)
            parts.tokens_total = point.tokens
            return
        # A checkpoint of a run without fragments or overlap has no local model (it equals the global one,
        # as after a flush) and, not posting after it, no weights.
        leader = topo.is_leader
        kept = control.bcast_array(topo.facility, arrays.get("federation/tokens", np.array([0] * len(fed.fragments)
                                                                                            + [1], np.int64))
                                   if leader else None, np.int64).tolist()
        fed.restore(theta, outer, exchange, engine.owned(), point.round, kept[:-1], bool(kept[-1]))
        if control.bcast_int(topo.facility, int("federation/local" in arrays) if leader else None):
            local = control.bcast_array(topo.facility, arrays.get("federation/local") if leader else None, np.float32)
            engine.before_exchange()
            for offset, values in engine.held():
                values[:] = local[offset:offset + len(values)]
            engine.after_exchange()
        parts.tokens_total = point.tokens

    def _restore_facility(self, arrays: dict[str, np.ndarray], parts: Parts) -> dict[str, np.ndarray]:
        """Hand every rank of the facility its part of the leader's `arrays`; returns this root's segment of
        the exchange's state (empty arrays off the roots)."""
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
        counts, displs = parts.federation.segment_counts()
        root = self.topo.root_index
        exchange = {}
        for name in parts.federation.exchange_state_names:
            mine = np.empty(counts[root] if root is not None else 0, np.float32)
            # A checkpoint without this state (a run without compression, or before the second residual
            # existed) starts it from zero.
            whole = arrays.get(f"exchange/{name}", np.zeros(self.layout.numel, np.float32)) if leader else None
            fac.Scatterv([whole, counts, displs, MPI.FLOAT] if leader else None, mine, root=0)
            exchange[name] = mine
        return exchange
