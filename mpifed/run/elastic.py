"""Facilities that leave and come back between rounds, as the round loop sees it: `Elastic` is the part
of `mpifed.run.trainer.Trainer` that decides, after a round some facility asked to stop at, whether it
leaves or everyone stops; lets go of the communicators before the world changes; carries a rank's state
over to the new world (`regroup`); and, for a facility coming back, sends it the global model and the
outer state and restores the rest from its own checkpoint part. The worlds themselves are made in
mpifed/run/rank.py (split and disconnect, merge) and mpifed/comm/rejoin.py (the doorman).
"""
from __future__ import annotations

from mpi4py import MPI

from mpifed.checkpoint.manager import CheckpointManager
from mpifed.comm import pieces
from mpifed.comm.arrival import Arrival
from mpifed.comm.topology import Topology, local_ranks_on_node
from mpifed.config import RunConfig
from mpifed.data.corpus import open_corpus
from mpifed.federation.reduce import segments


class Elastic:
    """The membership changes of one rank's trainer (a mixin of `Trainer`, whose state it works on)."""

    def _stop_or_leave(self, round_: int, asked: dict[str, str]) -> None:
        """After a checkpointed round that `asked` (facility -> signal) asked to stop at: they leave and
        the others go on (`leaving`), where the launches are separate, the hub is not among them and
        `federation.min_facilities` stay; else every facility stops (`stopped_after`)."""
        fed, names = self.cfg.federation, self.topo.facility_names
        who = ", ".join(f"{name} ({signal_name})" for name, signal_name in asked.items())
        stay = [name for name in names if name not in asked]
        why_not = ("" if not self.elastic else
                   "the hub cannot leave; " if names[0] in asked else
                   "federation.min_facilities = 0 lets no facility leave; " if not fed.min_facilities else
                   f"fewer than federation.min_facilities = {fed.min_facilities} would stay; "
                   if len(stay) < fed.min_facilities else None)
        if why_not is None:
            self.leaving = tuple(asked)
            if self.topo.is_global_root:
                one = len(asked) == 1
                print(f"mpifed: {who} {'leaves' if one else 'leave'} after round {round_} of {fed.rounds}; "
                      f"{', '.join(stay)} {'go' if len(stay) > 1 else 'goes'} on without {'it' if one else 'them'} "
                      f"from round {round_ + 1} (federation.min_facilities = {fed.min_facilities})", flush=True)
            elif self.topo.is_leader and self.topo.facility_name in asked:
                print(f"mpifed: facility {self.topo.facility_name} leaves after round {round_} of {fed.rounds}; "
                      f"its part of round {round_} is in {self.cfg.checkpoint.dir}", flush=True)
            return
        self.stopped_after = round_
        if self.topo.is_global_root:
            print(f"mpifed: stopping after round {round_} of {fed.rounds}, as asked by {who}; {why_not}round "
                  f"{round_} is checkpointed in {self.cfg.checkpoint.dir}: continue with --resume auto", flush=True)

    def release(self) -> None:
        """Let go of every communicator this rank's trainer made from its topology (before a regroup
        frees the topology's own): the background exchange's and the arrival's."""
        self.federation.close()
        self.arrival.close()

    def regroup(self, cfg: RunConfig, topo: Topology, entering: bool = False) -> None:
        """Go on after `leaving` left, or a facility came back (`entering`), over `topo` (the facilities in
        now; `cfg` lists them, each with its data partition). This rank keeps everything it trained and
        every round's state (engine, data position, the roots' global segments, outer state and error
        feedback): only the communicators are new. A facility coming back gets the global model and
        the outer state, as it builds itself (the same collective steps as `__init__` with `entering`).
        The exchange that the boundary held back is posted here (overlap), without the facilities that
        left; one that came back posts with the others, having learned nothing yet."""
        self.cfg, self.topo, self.leaving, self.admitting = cfg, topo, (), False
        if entering:  # what the newcomer's _build does with the world, in its order
            with self.world_deadline(f"round {self.round}: the facility that came back starts"):
                local_ranks_on_node(topo.world)
                comm = self._with_newcomers(False)
                if comm != MPI.COMM_NULL:
                    open_corpus(cfg.data, comm, cfg.data.partitions or topo.n_facilities, cfg.train.seed)
                    comm.Free()
            self._check_same_layout()
            if cfg.lora.rank:
                self._check_same_base(self.checkpoints.base_digest)  # the one it checked at its start
            self._share_global([])
        self.federation.regroup(topo)
        self.arrival = Arrival(topo)
        self.checkpoints = CheckpointManager(cfg, topo, self.layout, self.checkpoints.model_config,
                                             self.checkpoints.base_digest)
        if entering:
            self._share_outer_state()
        self.start_round = self.round + 1
        self._post_held_back(f"round {self.round}: exchange")

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
        the others hold already, and a facility coming back needs. Collective over the world."""
        if self.topo.root_index is None:
            return
        with self.world_deadline(f"round {self.round}: sending the outer state to the facility that came back"):
            for values in self.federation.outer_state().values():
                self.topo.roots.Bcast(values, root=0)

    def _enter(self, entering: dict) -> None:
        """This facility comes back after round `entering["round"]`: it holds the global model (`_build`);
        its roots take the outer state (and count the outer steps from the round); its ranks take their
        data position, RNG and inner optimizer state from the newest part of its own that verifies, in
        its own checkpoint.dir (none: it starts its partition afresh). The exchange's error feedback
        starts from zero."""
        self.round, self.parts.tokens_total = int(entering["round"]), int(entering["tokens"])
        self._share_outer_state()
        fed = self.federation
        fed.restore(fed.outer_state() if self.topo.root_index is not None else {}, {}, self.engine.owned(),
                    self.round)
        part = self.checkpoints.restore_own_part(self.parts)
        if self.topo.is_leader:
            print(f"mpifed: facility {self.topo.facility_name} trains from round {self.round + 1} on"
                  + (f", from its data position in {part}" if part else ", from the start of its data partition"),
                  flush=True)
        self._post_held_back(f"round {self.round}: exchange")  # as the others do in `regroup`

