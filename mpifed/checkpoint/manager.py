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
round against the recorded digest, and they go back a round until all agree. World rank 0 then streams
the model to every rank, bucket by bucket and each rank only what its engine holds (as at a fresh
start), the first facility's roots read their outer-state segments and broadcast them to the other
roots, and each leader streams every rank of its facility its own ranges of the part.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import numpy as np
import torch

from mpifed import configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint import isolated, retention
from mpifed.checkpoint.format import CheckpointError, CheckpointRefused, VerifiedCheckpoint
from mpifed.comm import control, pieces
from mpifed.comm.across import spread
from mpifed.comm.topology import Topology
from mpifed.comm.watchdog import deadline
from mpifed.config import RunConfig
from mpifed.layout import FlatLayout
from mpifed.logs import LOG

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


KEPT_GLOBAL = "global/model"
"""In the part of a facility that left: the global model of the round it left after."""


@dataclass(frozen=True)
class OwnPart:
    """What a facility coming back restored from its own part (`CheckpointManager.restore_own_part`)."""

    path: Path | None
    """The part (None: there was none, and nothing was restored)."""
    round: int
    """The round it was written after."""
    kept_global: bool
    """Whether it kept the global model of that round, now in the engine."""


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
        if topo.is_leader and self.directory.is_dir():  # before this job writes anything
            removed = retention.sweep_unpublished(self.directory, topo.facility_name)
            if removed:
                LOG.info(f"removed {len(removed)} unpublished temporary file(s) an interrupted job left in "
                         f"{self.directory}: {', '.join(removed)}")

    def _deadline(self, what: str) -> ContextManager[None]:
        return deadline(self.topo.world, self.cfg.federation.timeout_s, what)

    # ------------------------------------------------------------------------------------------ saving
    def save(self, round_: int, parts: Parts, keep_global: bool = False) -> "Callable[[], None] | None":
        """Write round `round_`'s checkpoint. On the global root it returns the call that publishes it
        (rename, `latest`, pruning), so the round's metrics line can be written first; nothing is
        published unless the whole checkpoint verified. `keep_global`: this facility leaves after the
        round, and its part keeps the global model too (its next job trains ahead from it while it waits
        to come back, see mpifed/run/elastic.py; the main file is at the hub's site)."""
        topo, cfg, fed = self.topo, self.cfg, parts.federation
        f32 = cfg.checkpoint.fletcher32
        part = self._write_part(round_, parts, keep_global)
        if topo.n_roots > 1 and topo.facility_index == 0 and topo.root_index is not None:
            start = fed.segments[topo.root_index][0]
            checkpoint.write_segment(self.directory, round_, topo.root_index, start, fed.theta, fed.outer_state(), f32)
        with self._deadline(f"checkpoint of round {round_}: collecting every site's part"):
            said = topo.across.allgather_str(checkpoint.part_digest(part) if topo.is_leader else "")
        digests = {name: said[first] for name, first in zip(topo.facility_names, topo.facility_offsets)}
        if topo.is_leader and not topo.is_global_root and cfg.checkpoint.keep:
            # one more than the hub keeps: the newest part's main file may not be published yet
            retention.prune_parts(self.directory, topo.facility_name, cfg.checkpoint.keep + 1, round_)
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
            retention.prune(self.directory, cfg.checkpoint.keep, round_)

        return publish

    def _write_part(self, round_: int, parts: Parts, keep_global: bool = False) -> Path | None:
        """This facility's part of round `round_` (collective over the facility; the leader writes it and
        returns its path). Small arrays are gathered whole; every flat array (the inner optimizer state,
        the local model, the exchange's state) streams to the leader one bucket at a time, assembled
        from the ranks' own pieces, and on into the file: nobody holds more than a bucket of it."""
        fac, leader, cfg = self.topo.facility, self.topo.is_leader, self.cfg
        small, flat = self._part_contents(parts, keep_global)
        writer = checkpoint.part_writer(self.directory, round_, self.topo.facility_name,
                                       {"ranks": fac.size, "engine": cfg.facility[self.topo.facility_index].engine},
                                       small, dict.fromkeys(flat, self.layout.numel),
                                       cfg.checkpoint.fletcher32) if leader else None
        for key, views in flat.items():
            mine = pieces.ranges_of(views)
            sink = (lambda lo, hi, values, key=key: writer.write(key, lo, values)) if leader else None
            pieces.gather(fac, 0, mine, pieces.everyones(fac, mine), pieces.from_views(views), 0, self.layout.numel,
                          self.cfg.federation.bucket_values, sink=sink)
        return writer.close().commit() if leader else None

    def _part_contents(self, parts: Parts, keep_global: bool = False
                       ) -> tuple[dict[str, np.ndarray], dict[str, list[tuple[int, np.ndarray]]]]:
        """(small arrays, on the leader; flat arrays as this rank's pieces, the same names on every rank).
        `keep_global`: with the global model, from the facility's roots' segments of it."""
        fac, leader, fed = self.topo.facility, self.topo.is_leader, parts.federation
        positions = np.array([parts.sampler.epoch, parts.sampler.position], np.int64)
        rng = torch.get_rng_state().numpy()
        small = {"ranks/data": np.empty((fac.size, 2), np.int64), "ranks/torch_rng": np.empty((fac.size, len(rng)), np.uint8)}
        fac.Gather(positions, small["ranks/data"] if leader else None, root=0)
        fac.Gather(rng, small["ranks/torch_rng"] if leader else None, root=0)
        flat: dict[str, list[tuple[int, np.ndarray]]] = {}
        state = parts.engine.optimizer_state()
        if control.bcast_int(fac, int(bool(state)) if leader else None):
            if "step" in state:  # AdamW's (SGD keeps no count)
                small["optimizer/step"] = state["step"]
            for key in (k for k in state if k != "step"):
                flat[f"optimizer/{key}"] = parts.engine.owned_pieces(state[key])
        if fed.local_differs:  # the local model itself (not its distance to the global one: that rounds)
            flat["federation/local"] = list(parts.engine.owned())
            small["federation/tokens"] = np.array([*fed.tokens, fed.flushed], np.int64)
        segment = fed.segments[self.topo.root_index][0] if self.topo.root_index is not None else 0
        for name in fed.exchange_state_names:  # each root's segment of it
            flat[f"exchange/{name}"] = [(segment, fed.exchange_state()[name])] if self.topo.root_index is not None else []
        if keep_global:
            flat[KEPT_GLOBAL] = [(segment, fed.theta)] if self.topo.root_index is not None else []
        return (small if leader else {}), flat

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
                point = json.loads(topo.across.bcast_str(offer))
            if "error" in point:
                raise CheckpointRefused(point["error"])
            if not point:
                return None
            problem = self._check_own_part(point) if topo.is_leader else ""
            with self._deadline(f"resume: every site checking its part of round {point['round']}"):
                problems = [p for p in topo.across.allgather_str(problem) if p]
            if not problems:
                return ResumePoint(point["round"], point["tokens"], point["path"])
            if world.rank == 0 and single:
                refusal = f"--resume {target}: {'; '.join(problems)}"
            elif world.rank == 0:
                LOG.info(f"skipping checkpoint {Path(point['path']).name}: {'; '.join(problems)}")

    def _offer(self, found: list[Path], single: bool, parts: Parts) -> str:
        """On the global root: the next candidate of `found` as JSON ({} when none is left, {"error"} to
        stop every rank)."""
        while found:
            path = found.pop(0)
            try:
                verified = isolated.verify(path, facilities="none")  # a crafted file cannot crash this rank
            except CheckpointError as exc:
                if single:
                    return json.dumps({"error": f"--resume {path}: {exc}"})
                LOG.info(f"skipping checkpoint {path.name}: {exc}; {self._set_aside(path)}")
                continue
            problems = self._incompatibilities(verified, parts)
            if problems:
                return json.dumps({"error": f"cannot resume from {verified.path}: {'; '.join(problems)}"})
            return json.dumps({"round": verified.round, "tokens": verified.tokens, "path": str(verified.path),
                               "digests": verified.part_digests})
        return "{}"

    @staticmethod
    def _set_aside(path: Path) -> str:
        """Move a main file that does not verify out of the way of pruning and later resumes; what was
        done, for the line that skips it."""
        try:
            return f"moved aside to {retention.set_aside(path).name}"
        except OSError as exc:
            return f"left in place ({exc.strerror or exc})"

    def _check_own_part(self, point: dict) -> str:
        """On a facility leader: why its part of the offered round cannot be used here ("" if it can)."""
        name = self.topo.facility_name
        path = self.resume_dir / checkpoint.facility_name(point["round"], name)
        try:
            isolated.check_part(path, point["digests"].get(name, ""), numel=self.layout.numel)
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
        included). Every flat array streams bucket by bucket from the rank that reads it to the ranks that
        hold each piece: no rank receives more than what it holds, plus one bucket. Between facilities
        only the leaders' links carry the model, and the roots' links their segments of the outer state."""
        topo, fed, engine = self.topo, parts.federation, parts.engine
        path = Path(point.path)  # the hub's file: read only by ranks of the first facility, at the hub's site
        held = engine.held()
        source = (lambda lo, hi: checkpoint.read_flat(path, self.layout, "model", lo, hi)) if topo.world.rank == 0 else None
        engine.before_exchange()
        with self._deadline("resume: sending the checkpointed model"):  # over the leaders' links
            spread(topo.facility, topo.across.mesh, pieces.ranges_of(held), source, pieces.into_views(held), 0,
                   self.layout.numel, self.cfg.federation.bucket_values)
        engine.after_exchange()
        outer: dict[str, np.ndarray] = {}
        if topo.root_index is not None:
            start, stop = fed.segments[topo.root_index]
            for name in fed.outer_state_names:
                values = checkpoint.read_flat(path, self.layout, f"outer/{name}", start, stop) \
                    if topo.facility_index == 0 else np.empty(stop - start, np.float32)
                with self._deadline("resume: sending the checkpointed outer state"):
                    fed.exchange.mesh.bcast(values, root=0)  # root r's links
                outer[name] = values
        part = self.resume_dir / checkpoint.facility_name(point.round, topo.facility_name)
        small, stored = self._read_small(part)
        exchange = self._restore_facility(part, small, stored, parts)
        if not fed.local_differs:
            fed.restore(outer, exchange, engine.owned(), point.round)
            parts.tokens_total = point.tokens
            return
        # A checkpoint of a run without fragments or overlap has no local model (it equals the global one,
        # as after a flush) and, not posting after it, no weights.
        kept = small.get("federation/tokens", np.array([0] * len(fed.fragments) + [1], np.int64))
        fed.restore(outer, exchange, engine.owned(), point.round, kept[:-1].tolist(), bool(kept[-1]))
        if "federation/local" in stored:
            engine.before_exchange()
            self._scatter_part(part, "federation/local", held)
            engine.after_exchange()
        parts.tokens_total = point.tokens

    def restore_own_part(self, parts: Parts) -> OwnPart:
        """A facility coming back to a running federation: every rank's data position, RNG and inner
        optimizer state from the newest part of this facility in this site's `checkpoint.dir` that
        verifies (its arrays against their hashes; the main file that recorded it is at the hub, of an
        earlier round), and, where the part kept the global model (it was written as the facility left),
        that model into the engine. Nothing is restored where there is no part. The exchange's state in
        it is read but not used (error feedback restarts from zero). Collective over the facility."""
        fac, name = self.topo.facility, self.topo.facility_name
        found = ""
        if self.topo.is_leader:
            for path in reversed(checkpoint.facility_parts(self.directory, name)):
                try:
                    isolated.check_part(path, numel=self.layout.numel)
                except CheckpointError as exc:
                    LOG.info(f"facility {name}: skipping {path.name}: {exc}")
                    continue
                found = str(path)
                break
        found = control.bcast_str(fac, found)
        if not found:
            return OwnPart(None, 0, False)
        small, stored = self._read_small(Path(found))
        self._restore_facility(Path(found), small, stored, parts)
        kept = KEPT_GLOBAL in stored
        if kept:
            parts.engine.before_exchange()
            self._scatter_part(Path(found), KEPT_GLOBAL, parts.engine.held())
            parts.engine.after_exchange()
        return OwnPart(Path(found), checkpoint.part_round(Path(found)), kept)

    def _read_small(self, part: Path) -> tuple[dict[str, np.ndarray], set[str]]:
        """On every rank of the facility: the part's small arrays (read by the leader, sent to all) and the
        names of its flat arrays."""
        fac, leader = self.topo.facility, self.topo.is_leader
        arrays, flat = checkpoint.read_part(part) if leader else ({}, [])
        shapes = json.loads(control.allgather_str(fac, json.dumps({key: [str(v.dtype), list(v.shape)]
                                                                   for key, v in arrays.items()}) if leader else "")[0])
        stored = set(control.allgather_str(fac, ",".join(flat) if leader else "")[0].split(",")) - {""}
        small = {}
        for key, (dtype, shape) in shapes.items():
            values = np.ascontiguousarray(arrays[key]) if leader else np.empty(shape, dtype)
            fac.Bcast(values, root=0)
            small[key] = values
        return small, stored

    def _scatter_part(self, part: Path, key: str, views: list[tuple[int, np.ndarray]]) -> None:
        """Flat array `key` of the facility's part into `views` on every rank (the leader reads it)."""
        fac = self.topo.facility
        mine = pieces.ranges_of(views)
        source = (lambda lo, hi: checkpoint.read_range(part, key, lo, hi)) if self.topo.is_leader else None
        pieces.scatter(fac, 0, mine, pieces.everyones(fac, mine), source, pieces.into_views(views), 0,
                       self.layout.numel, self.cfg.federation.bucket_values)

    def _restore_facility(self, part: Path, small: dict[str, np.ndarray], stored: set[str],
                          parts: Parts) -> dict[str, np.ndarray]:
        """Give every rank of the facility its inner optimizer state (over what it holds), data position
        and RNG; returns this root's segment of the exchange's state (empty off the roots)."""
        fac, engine = self.topo.facility, parts.engine
        keys = [key for key in stored if key.startswith("optimizer/")]
        if keys:
            state: dict[str, Any] = {"step": small["optimizer/step"]} if "optimizer/step" in small else {}
            for key in sorted(keys):
                views = [(offset, np.empty(len(values), np.float32)) for offset, values in engine.held()]
                self._scatter_part(part, key, views)
                state[key.split("/", 1)[1]] = HeldArray(views)
            engine.load_optimizer_state(state)
        parts.sampler.restore(*map(int, small["ranks/data"][fac.rank]))
        torch.set_rng_state(torch.from_numpy(small["ranks/torch_rng"][fac.rank].copy()))
        fed, root = parts.federation, self.topo.root_index
        exchange = {}
        for name in fed.exchange_state_names:
            values = np.zeros(fed.segments[root][1] - fed.segments[root][0] if root is not None else 0, np.float32)
            # A checkpoint without this state (a run without compression, or before the second residual
            # existed) starts it from zero.
            if f"exchange/{name}" in stored:
                views = [(fed.segments[root][0], values)] if root is not None else []
                self._scatter_part(part, f"exchange/{name}", views)
            exchange[name] = values
        return exchange


class HeldArray:
    """A full-layout array of which this rank has only the pieces it holds: `a[lo:hi]` within one of
    them is that piece (what an engine asks of its optimizer state when it loads it)."""

    def __init__(self, views: list[tuple[int, np.ndarray]]) -> None:
        self.views = views

    def __getitem__(self, where: slice) -> np.ndarray:
        try:
            return pieces.locate(self.views, where.start, where.stop)
        except ValueError:
            raise IndexError(f"[{where.start}:{where.stop}] is not within what this rank holds") from None
