"""Facilities that leave and come back between rounds, as the round loop sees it: `Elastic` is the part
of `mpifed.run.trainer.Trainer` that decides, after a round some facility asked to stop at, whether it
leaves or everyone stops; lets go of the communicators before the world changes; carries a rank's state
over to the new world (`regroup`); and, for a facility coming back, sends it the global model and the
outer state. The worlds themselves are made in mpifed/run/rank.py (split and disconnect, merge) and
mpifed/comm/door.py and rejoin.py.

Training ahead. A facility that leaves keeps the round's global model in its own checkpoint part. Its
next job restores that part over its own ranks before it asks to be admitted, and while it waits for
the round boundary (on another thread: `rejoin.Waiting`) it trains from that model, step by step, as
long as it is the model the round the federation trains started from (the door says which round
that is), and at most `train.local_steps` steps. At the boundary it stops, receives the global model,
and puts back on top of it what it learned ahead: x <- theta_new + (x_ahead - theta_kept), the rule a
delayed exchange lands with. Its first exchange then counts the tokens it trained ahead with the rest.
So a facility that comes back mid-round loses only the steps before its job was ready, not the round.
One that reaches the door after the round's closing reduction (where the hub learns that someone
waits) enters a boundary later: what it learned then goes on top of a model a round newer than the
one it started from, as with a delayed exchange that lands late.
"""
from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from mpifed.checkpoint.manager import CheckpointManager
from mpifed.comm import control, pieces
from mpifed.comm.arrival import Arrival
from mpifed.comm.topology import Topology, local_ranks_on_node
from mpifed.config import RunConfig
from mpifed.data.corpus import open_corpus
from mpifed.federation.reduce import segments
from mpifed.logs import LOG
from mpifed.run import stop

if TYPE_CHECKING:
    from mpifed.comm.rejoin import Waiting


class Elastic:
    """The membership changes of one rank's trainer (a mixin of `Trainer`, whose state it works on)."""

    def _stop_or_leave(self, round_: int, asked: dict[str, str]) -> None:
        """After a checkpointed round that `asked` (facility -> signal) asked to stop at: they leave and
        the others go on (`leaving`), where the launches are separate, the hub is not among them and
        `federation.min_facilities` stay; else every facility stops (`stopped_after`)."""
        fed, names = self.cfg.federation, self.topo.facility_names
        who = ", ".join(f"{name} ({signal_name})" for name, signal_name in asked.items())
        stay = [name for name in names if name not in asked]
        why_not = self._why_not_leave(asked)
        if why_not is None:
            self.leaving = tuple(asked)
            if self.topo.is_global_root:
                one = len(asked) == 1
                LOG.info(f"{who} {'leaves' if one else 'leave'} after round {round_} of {fed.rounds}; "
                         f"{', '.join(stay)} {'go' if len(stay) > 1 else 'goes'} on without {'it' if one else 'them'} "
                         f"from round {round_ + 1} (federation.min_facilities = {fed.min_facilities})")
            elif self.topo.is_leader and self.topo.facility_name in asked:
                LOG.info(f"facility {self.topo.facility_name} leaves after round {round_} of {fed.rounds}; "
                         f"its part of round {round_} is in {self.cfg.checkpoint.dir}")
            return
        self.stopped_after = round_
        if self.topo.is_global_root:
            LOG.info(f"stopping after round {round_} of {fed.rounds}, as asked by {who}; {why_not}round "
                     f"{round_} is checkpointed in {self.cfg.checkpoint.dir}: continue with --resume auto")

    def _why_not_leave(self, asked: dict[str, str]) -> str | None:
        """None where the facilities that `asked` to stop may leave while the others go on; else why not
        (a clause for the stop line; "" where the launch is not elastic)."""
        fed, names = self.cfg.federation, self.topo.facility_names
        stay = [name for name in names if name not in asked]
        return ("" if not self.elastic else
                "the hub cannot leave; " if names[0] in asked else
                "federation.min_facilities = 0 lets no facility leave; " if not fed.min_facilities else
                f"fewer than federation.min_facilities = {fed.min_facilities} would stay; "
                if len(stay) < fed.min_facilities else None)

    def leaves_after(self, asked: dict[str, str]) -> bool:
        """Whether this rank's facility leaves after the round that `asked` asked to stop at."""
        return self.topo.facility_name in asked and self._why_not_leave(asked) is None

    def release(self) -> None:
        """Let go of every communicator this rank's trainer made from its topology (before a regroup
        frees the topology's own): the background exchange's and the arrival's."""
        self.federation.close()
        self.arrival.close()

    def regroup(self, cfg: RunConfig, topo: Topology, entering: bool = False, newcomer: dict | None = None) -> None:
        """Go on after `leaving` left, or a facility came back (`entering`), over `topo` (the facilities in
        now; `cfg` lists them, each with its data partition). This rank keeps everything it trained and
        every round's state (engine, data position, the roots' global segments, outer state and error
        feedback): only the communicators are new. A facility coming back (`newcomer`: what the hub
        told it, see mpifed/comm/rejoin.py) gets the global model and the outer state, and puts what
        it trained ahead on top. The exchange that the boundary held back is posted here (overlap),
        without the facilities that left; one that came back posts with the others, its progress
        since the global model not yet in it."""
        ahead = self._ahead_progress() if newcomer else None  # before the global model replaces it
        self.cfg, self.topo, self.leaving, self.admitting = cfg, topo, (), False
        if entering:
            with self.world_deadline(f"round {self.round}: the facility that came back starts"):
                sharing = local_ranks_on_node(topo.world)
                self._share_corpus(newcomer is not None)
            if newcomer:  # its own job alone saw its node to itself
                self.threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // sharing)
                torch.set_num_threads(self.threads)
            self._check_same_layout()
            if cfg.lora.rank:
                self._check_same_base(self.checkpoints.base_digest)  # the one it checked at its start
            self._share_global(self.engine.held() if newcomer else [])
        self.federation.regroup(topo, cfg.federation)
        self.arrival = Arrival(topo)
        self.checkpoints = CheckpointManager(cfg, topo, self.layout, self.checkpoints.model_config,
                                             self.checkpoints.base_digest)
        if entering:
            self._share_outer_state()
        if newcomer:
            self.memory.rank = topo.world.rank
            self._enter(newcomer)
        self.start_round = self.round + 1
        self._post_held_back(f"round {self.round}: exchange")
        if ahead is not None:
            self._put_back(ahead)

    def _share_corpus(self, newcomer: bool) -> None:
        """A facility coming back opened the corpus itself: where its text differs from world rank 0's
        (another Python's standard library), it takes world rank 0's, as at a first join, its data
        position kept. Collective over the world."""
        digests = self.topo.across.allgather_str(self.corpus.digest)
        if all(digest == digests[0] for digest in digests):  # the others all hold world rank 0's
            return
        comm = self._with_newcomers(newcomer)
        if comm == MPI.COMM_NULL:
            return
        if newcomer:
            epoch, position = self.sampler.epoch, self.sampler.position
            self._load_data(comm)
            self.sampler.restore(epoch, position)
            self.parts.sampler = self.sampler  # what its checkpoints save
        else:
            open_corpus(self.cfg.data, self.cfg.data.partitions or self.topo.n_facilities, self.cfg.train.seed,
                        comm.rank == 0, partial(control.bcast_array, comm, dtype=np.uint8))
        comm.Free()

    def _with_newcomers(self, newcomer: bool) -> MPI.Intracomm:
        """World rank 0 with the ranks of a facility that comes back (`newcomer`), COMM_NULL on the
        others: what the newcomer needs from world rank 0 alone (the embedded text) crosses no other
        link. Collective over the world."""
        world = self.topo.world
        return world.Split(0 if newcomer or world.rank == 0 else MPI.UNDEFINED, key=world.rank)

    def _share_global(self, held: list) -> None:
        """A facility coming back gets the global model: each of its ranks the ranges its engine holds
        (`held`), segment by segment from the first facility's roots, which hold the global segments;
        the others take part holding nothing to receive. Collective over the world."""
        mine = pieces.ranges_of(held)
        everyone = pieces.everyones(self.topo.world, mine)
        self.engine.before_exchange()
        with self.world_deadline(f"round {self.round}: sending the global model to the facility that came back"):
            for r, (lo, hi) in enumerate(segments(self.layout.numel, self.topo.n_roots)):
                mine_r = self.topo.world.rank == r  # root r of the first facility holds segment r
                source = (lambda a, b, lo=lo: self.federation.theta[a - lo:b - lo]) if mine_r else None
                pieces.scatter(self.topo.world, r, mine, everyone, source, pieces.into_views(held), lo, hi,
                               self.cfg.federation.bucket_values)
        self.engine.after_exchange()

    def _share_outer_state(self) -> None:
        """The first facility's roots give every root their segment of the outer state: the same values
        the others hold already, and a facility coming back needs. Collective over the roots."""
        if self.topo.root_index is None:
            return
        with self.world_deadline(f"round {self.round}: sending the outer state to the facility that came back"):
            for values in self.federation.outer_state().values():
                self.federation.exchange.mesh.bcast(values, root=0)  # over root r's links

    def _enter(self, entering: dict) -> None:
        """This facility came back after round `entering["round"]` with `entering["tokens"]` trained, and
        holds the global model (`regroup`): its roots hold the outer state too (and count the outer
        steps from the round). Its data position, RNG and inner optimizer state came from its own part
        (`Trainer.own`); the exchange's error feedback starts from zero. Collective over the facility."""
        self.round, self.parts.tokens_total = int(entering["round"]), int(entering["tokens"])
        fed = self.federation
        fed.restore(fed.outer_state() if self.topo.root_index is not None else {}, {}, self.engine.owned(),
                    self.round)
        if self.topo.is_leader:
            part = self.own.path
            LOG.info(f"facility {self.topo.facility_name} trains from round {self.round + 1} on"
                     + (f", from its data position in {part}" if part else ", from the start of its data partition"))

    def train_ahead(self, waiting: "Waiting") -> tuple[MPI.Intracomm, dict]:
        """A facility coming back, once the door admitted it: wait for the federation's round
        boundary (on another thread), training ahead meanwhile where this facility's part kept the
        global model the federation's current round started from (see the module's docstring). Returns
        what `Waiting.merge` does. No MPI here until the federation connected: the accept holds the
        library; the ranks agree on each step over the facility's torch process group."""
        own, train = self.own, self.cfg.train
        ready = own.kept_global and waiting.round == own.round + 1
        ranks, leader, name = self.topo.facility.size, self.topo.is_leader, self.topo.facility_name  # MPI: now
        steps = tokens = 0
        waiting.start()
        try:
            if ready:
                if leader:
                    LOG.info(f"facility {name} trains ahead from round {own.round}'s global model while it "
                             "waits for the round boundary")
                self.engine.before_exchange()
                kept = [values.copy() for _, values in self.engine.held()]
                self.engine.after_exchange()
                if train.inner_state == "reset":  # as every round starts
                    self.engine.reset_optimizer()
                while steps < train.local_steps and not self._agreed(waiting.arrived() or bool(stop.requested()),
                                                                     ranks):
                    tokens += self._train_step(own.round * train.local_steps + steps, ranks)[1]  # that round's
                    steps += 1
                self.ahead = kept if steps else None
        except BaseException:
            waiting.cancel()  # no MPI, not even to abort the job, while the accept holds the library
            raise
        world, told = waiting.merge()
        if leader:
            LOG.info(f"facility {name} trained {steps} of {train.local_steps} steps ahead, from round "
                     f"{own.round}'s global model, while it waited to come back" if ready else
                     f"facility {name} did not train ahead: " +
                     ("it has no checkpoint part of its own" if own.path is None else
                      f"its newest part, {own.path.name}, keeps no global model" if not own.kept_global else
                      f"its part keeps round {own.round}'s global model; the federation trained round {waiting.round}"))
        self.pending_tokens = tokens
        return world, told

    def _agreed(self, flag: bool, ranks: int) -> bool:
        """Whether any of the facility's `ranks` says `flag` (over its torch process group: no MPI)."""
        if ranks == 1:
            return flag
        said = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(said, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(said.item())

    def _ahead_progress(self) -> list[np.ndarray] | None:
        """What this rank's held views learned ahead: x_ahead - theta_kept (in the kept copy's place)."""
        kept, self.ahead = self.ahead, None
        if kept is None:
            return None
        self.engine.before_exchange()
        for (_, values), copy in zip(self.engine.held(), kept):
            np.subtract(values, copy, out=copy)
        self.engine.after_exchange()
        return kept

    def _put_back(self, progress: list[np.ndarray]) -> None:
        """The global model plus what was learned ahead, in every held view."""
        self.engine.before_exchange()
        for (_, values), delta in zip(self.engine.held(), progress):
            values += delta
        self.engine.after_exchange()
