"""The hierarchical reduction: inside each facility first, across facilities by the roots, then back
into every facility; fragment by fragment, blocking or in the background.

The flat model is cut into R segments, segment r belonging to root r of every facility, and into K
fragments (federation.fragments), each exchanged on its own schedule. At a fragment's sync point:
1. Gather: every rank sends its owned ranges of the fragment to the root of each segment they fall
   in, streamed in buckets; the root receives each piece in place (an MPI indexed datatype), so no rank
   holds more than one bucket beyond its state, and takes what the facility learned, Δ = θ − local,
   against its own segment of the global model θ: nobody keeps a second copy of the global values.
   (With overlap θ moves in the background while training goes on, so there every rank keeps the
   anchor of its owned ranges, the global model as of the fragment's last exchange, and sends
   Δ = anchor − local itself.)
2. Exchange (mpifed/federation/exchange.py): roots share update norms and token counts, the guard
   leaves out NaN/Inf, outsized or unsampled facilities, root r of every facility combines its
   token-weighted piece (reduce-scatter and all-gather, compressed or fp32, the same bytes on every
   root), and applies the outer step to its segment's piece of the fragment.
3. Distribute: the new values flow back into every rank's held ranges.

With federation.overlap = delayed, step 2 runs in the background while training goes on, and lands at
the next sync point, or federation.overlap_steps = τ inner steps after its post where τ is set: the
fragment in flight is folded in (the local model becomes the new global model plus what was learned
since it was posted), then the next fragment is posted. The rule, for one fragment (K = 1), with
Δ_f^k what facility f learned in round k and θ^k the global model:

    θ^(k+1) = Outer(θ^k, Σ_f w_f Δ_f^k)             (the same outer step as blocking rounds)
    round k+1 of facility f trains from θ^k − Δ_f^k  (blocking: from θ^(k+1))
    with τ: after τ inner steps of round k+1, facility f's model x becomes θ^(k+1) − (θ^k − Δ_f^k − x)

so an outer step lands one round late (τ steps late with τ), and the last round's is taken at the end
(`flush`). Fragment j syncs at step offset j·H/K of every round (fragment 0 at the round's end); with
overlap, the fragment posted at one sync point is folded in at the next (or τ steps on, τ no more
than the steps between two sync points), so one fragment is in flight at a time.
"""
from __future__ import annotations

import bisect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from mpi4py import MPI

from mpifed.cadence import sync_offsets
from mpifed.comm import control, pieces
from mpifed.comm.link import Mesh
from mpifed.comm.topology import Topology
from mpifed.comm.watchdog import deadline
from mpifed.config import FederationConfig
from mpifed.federation.compress import RESIDUALS, make_codec
from mpifed.federation.exchange import Background, Combiner, FederationError, Outcome, RootExchange, Traffic
from mpifed.federation.outer import OUTER, make_outer
from mpifed.layout import View

Range = tuple[int, int]
POLL_S = 0.0002
"""An exchange in the background tests its MPI requests this often and sleeps in between."""
__all__ = ["Federation", "FederationError", "RoundExchange", "sampled", "segments", "sync_offsets"]


def segments(numel: int, n: int) -> list[Range]:
    """[start, stop) of n nearly equal segments covering 0..numel."""
    return [(numel * i // n, numel * (i + 1) // n) for i in range(n)]


def sampled(n_facilities: int, fraction: float, seed: int, round_: int) -> list[bool]:
    """Which facilities train in `round_`: round(fraction x n), at least one, drawn with the seed: the
    same draw on every rank, no communication."""
    if fraction >= 1:
        return [True] * n_facilities
    chosen = np.random.default_rng([seed, round_, 7]).choice(
        n_facilities, max(1, int(fraction * n_facilities + 0.5)), replace=False)
    return [i in chosen for i in range(n_facilities)]


def _values(owned: Sequence[View]) -> Callable[[int, int, int, np.ndarray], None]:
    """A `produce` for `Federation._gather` that copies the owned views' own values."""
    return lambda i, a, b, out: np.copyto(out, owned[i][1][a:b])


@dataclass(frozen=True)
class RoundExchange:
    """What one rank saw of the exchanges that landed at one sync point (0 or 1; more at a flush)."""

    bytes_inter: int
    """Bytes this rank sent to other facilities, both phases (0 off the roots)."""
    bytes_received: int
    """Bytes this rank received from other facilities (0 off the roots)."""
    facility_tokens: int
    """Tokens this rank's facility trained since the previous sync point."""
    left_out: tuple[str, ...] = ()
    """On roots: 'NAME: reason' for each facility whose update was not used."""


class Federation:
    """The reduction state of one rank: with overlap the anchors (global values) of its owned ranges and
    what it has in flight, and on root r the global segment r with its outer optimizer and the exchange's
    error-feedback state. Built collectively per facility; `threads` encode and decode the segment."""

    def __init__(self, topo: Topology, cfg: FederationConfig, numel: int, owned: Sequence[View],
                 held: Sequence[View], threads: int = 1) -> None:
        self.topo, self.cfg, self.numel = topo, cfg, numel
        self.segments = segments(numel, topo.n_roots)
        self.fragments = segments(numel, cfg.fragments)
        self.delayed = cfg.overlap == "delayed"
        self.bucket = cfg.bucket_values
        self.owned_all = pieces.everyones(topo.facility, sorted(pieces.ranges_of(owned)))
        self._check_ownership(pieces.ranges_of(held))
        self.held_all = pieces.everyones(topo.facility, sorted(pieces.ranges_of(held)))
        self.full_replicas = all(h == [(0, numel)] for h in self.held_all)
        self.anchor = [values.copy() for _, values in owned] if self.delayed else None
        """Overlap: the global model on each owned view, as of each fragment's last exchange (blocking
        rounds take Δ against the roots' θ, which then holds the same values)."""
        self.posted = [np.zeros_like(values) for _, values in owned] if self.delayed else None
        """What each owned view has in flight (overlap): its Δ as posted, zero elsewhere."""
        self.tokens = [0] * cfg.fragments
        """Tokens this facility trained since each fragment was last posted."""
        self.steps = [0] * cfg.fragments
        """Outer steps each fragment has taken."""
        self.in_flight: tuple[int, int] | None = None
        """(fragment, this facility's tokens) of the exchange in flight."""
        self.flushed = False
        """Whether `flush` ran: nothing is left to exchange (a run that resumes from here posts nothing)."""
        self._kept: dict[str, np.ndarray] = {}
        root = topo.root_index
        self.outer = self.combiner = self.exchange = self.background = None
        if root is not None:
            start, stop = self.segments[root]
            self.outer = make_outer(cfg.outer, cfg.outer_lr, cfg.outer_momentum, cfg.outer_beta2, cfg.outer_tau,
                                    cfg.outer_warmup)
            # In the background the exchange stays on its own thread (its links on a communicator of
            # their own), and its waits do not spin: the cores belong to training.
            self.combiner = Combiner(make_codec(cfg.compress, cfg.topk_fraction), stop - start,
                                     1 if self.delayed else threads, keep=self.delayed)
            self.combiner.poll_s = POLL_S if self.delayed else 0.0
            self.exchange = RootExchange(self._mesh(topo), cfg, topo.facility_names, self.combiner, self.outer)
            self.background = Background() if self.delayed else None
        # Root r starts from the current model's segment r.
        self.theta = self._gather(owned, _values(owned), 0, numel)
        if root is not None:
            self.outer.full_state(self.theta)

    # ---------------------------------------------------------------------------- layout and ownership
    def _check_ownership(self, held: list[Range]) -> None:
        pieces = sorted(r for ranges in self.owned_all for r in ranges)
        covered = pieces[0][0] == 0 and pieces[-1][1] == self.numel and all(
            a[1] == b[0] for a, b in zip(pieces, pieces[1:])) if pieces else False
        if not covered:
            raise ValueError(f"facility {self.topo.facility_name}: the engine's owned ranges must be disjoint and "
                             f"cover the model's {self.numel} values (got {pieces[:4]}...)")
        mine = self.owned_all[self.topo.facility.rank]
        if any(not any(h0 <= a and b <= h1 for h0, h1 in held) for a, b in mine):
            raise ValueError("every range a rank owns must lie within what it holds")

    def _piece(self, lo: int, hi: int) -> tuple[int, int] | None:
        """On a root: [lo, hi) ∩ its segment, relative to the segment (None off the roots)."""
        if self.topo.root_index is None:
            return None
        start, stop = self.segments[self.topo.root_index]
        return max(lo, start) - start, max(min(hi, stop), max(lo, start)) - start

    # ------------------------------------------------------------------------------ inside a facility
    def _gather(self, owned: Sequence[View], produce: Callable[[int, int, int, np.ndarray], None], lo: int,
                hi: int, into: str = "") -> np.ndarray | None:
        """Root r receives [lo, hi) ∩ segment r assembled from every rank's owned pieces (comm/pieces.py);
        `produce(i, a, b, out)` writes owned view i's values [a, b) (relative to the view) into `out`.
        `into` names a segment-sized buffer kept between rounds (with overlap, whose exchanges run while
        training goes on: a fresh one each time would cost its page faults there)."""
        fac, root = self.topo.facility, self.topo.root_index
        piece = self._piece(lo, hi)
        result = None
        if piece is not None:
            if into and into not in self._kept:
                self._kept[into] = np.empty(self.segments[root][1] - self.segments[root][0], np.float32)
            result = self._kept[into][:piece[1] - piece[0]] if into else np.empty(piece[1] - piece[0], np.float32)
        order = sorted(range(len(owned)), key=lambda i: owned[i][0])
        offsets = [owned[i][0] for i in order]
        mine = pieces.ranges_of(owned)

        def absolute(x: int, y: int, out: np.ndarray) -> None:  # [x, y) lies in one owned view
            i = order[bisect.bisect_right(offsets, x) - 1]
            produce(i, x - owned[i][0], y - owned[i][0], out)

        for r, (start, stop) in enumerate(self.segments):
            first, last = max(start, lo), min(stop, hi)
            if first < last:
                pieces.gather(fac, r, mine, self.owned_all, absolute, first, last, self.bucket,
                              into=result if fac.rank == r else None)
        return result

    def _distribute(self, views: Sequence[View], values: np.ndarray | None, lo: int, hi: int,
                    owned: bool = False) -> None:
        """Every rank's `views` of [lo, hi) get the roots' `values` (on root r: [lo, hi) ∩ segment r):
        the engine's held views, or with `owned` views over the owned ranges. Full replicas gather the
        whole model in place; otherwise root r sends each rank only the pieces of each bucket it holds
        (an MPI indexed datatype over the bucket), so nobody receives what it does not keep."""
        fac, root = self.topo.facility, self.topo.root_index
        spans = [(max(a, lo), max(min(b, hi), max(a, lo))) for a, b in self.segments]
        if self.full_replicas and not owned:
            flat = views[0][1]
            if root is not None:
                a, b = spans[root]
                flat[a:b] = values
            idle = [0] * (fac.size - len(spans))
            fac.Allgatherv(MPI.IN_PLACE, [flat, [b - a for a, b in spans] + idle, [a for a, _ in spans] + idle,
                                          MPI.FLOAT])
            return
        everyone = self.owned_all if owned else self.held_all
        take, mine = pieces.into_views(views), pieces.ranges_of(views)
        for r, (first, last) in enumerate(spans):
            if first < last:
                source = (lambda b_lo, b_hi, first=first: values[b_lo - first:b_hi - first]) if fac.rank == r else None
                pieces.scatter(fac, r, mine, everyone, source, take, first, last, self.bucket)

    def _each_owned(self, owned: Sequence[View], lo: int, hi: int) -> Iterator[tuple[int, slice]]:
        """(owned view index, its slice) of every owned piece within [lo, hi)."""
        for i, (offset, values) in enumerate(owned):
            for x, y in pieces.clip([(offset, offset + len(values))], lo, hi):
                yield i, slice(x - offset, y - offset)

    def _norm(self, delta: np.ndarray | None) -> float:
        """The facility's update norm (NaN/Inf anywhere make it NaN/Inf: no separate scan)."""
        return math.sqrt(abs(control.allreduce(self.topo.facility,
                                               [float(np.dot(delta, delta)) if delta is not None else 0.0])[0]))

    # ------------------------------------------------------------------------------------ sync points
    def synchronise(self, fragment: int, owned: Sequence[View], held: Sequence[View], tokens: int,
                    participate: bool = True, phase: str = "exchange") -> RoundExchange:
        """Fragment `fragment`'s sync point (`tokens`: what this rank trained since the previous one).
        Blocking: exchange the fragment now. Delayed: fold in the exchange in flight; `post` then starts
        the next. Collective over the world; raises FederationError when too few facilities are left."""
        facility_tokens = int(control.allreduce(self.topo.facility, [tokens])[0])
        self.tokens = [t + facility_tokens for t in self.tokens]
        if self.delayed:
            outcome = self._fold(owned, held, phase)
        else:
            outcome = self._exchange_now(fragment, owned, held, participate, phase)
        return RoundExchange(outcome.traffic.sent, outcome.traffic.received, facility_tokens, outcome.left_out)

    def fold(self, owned: Sequence[View], held: Sequence[View], phase: str = "exchange") -> RoundExchange:
        """Overlap with federation.overlap_steps: fold in the exchange in flight now, between sync points
        (nothing to do where none is). Collective over the world."""
        outcome = self._fold(owned, held, phase)
        return RoundExchange(outcome.traffic.sent, outcome.traffic.received, 0, outcome.left_out)

    def post(self, fragment: int, owned: Sequence[View], phase: str = "exchange") -> None:
        """Overlap: start the exchange of what the fragment learned since it was last posted; it is
        folded in at the next sync point, or by `fold` (federation.overlap_steps). Collective over the world."""
        lo, hi = self.fragments[fragment]
        # Δ = anchor − local: after the fold, exactly what was learned since the last post
        delta = self._gather(owned, lambda i, a, b, out: np.subtract(self.anchor[i][a:b], owned[i][1][a:b], out=out),
                             lo, hi, "delta")
        for i, part in self._each_owned(owned, lo, hi):
            np.subtract(self.anchor[i][part], owned[i][1][part], out=self.posted[i][part])
        norm = self._norm(delta)
        tokens, self.tokens[fragment] = self.tokens[fragment], 0
        self.steps[fragment] += 1
        self.in_flight = (fragment, tokens)
        if self.topo.root_index is None:
            return
        piece = self._piece(lo, hi)
        number, at = self.steps[fragment], slice(*piece)
        self.background.start(lambda: self.exchange.run(delta, self.theta, at, number, tokens, norm,
                                                        not math.isfinite(norm), True))

    def flush(self, owned: Sequence[View], held: Sequence[View], phase: str = "exchange") -> RoundExchange:
        """At the end of training: whatever any fragment learned since its last exchange is exchanged now,
        so the global model holds every step and every rank's model is the global model."""
        traffic, left_out = Traffic(), ()
        if self.delayed:
            outcome = self._fold(owned, held, phase)
            traffic, left_out = traffic + outcome.traffic, left_out + outcome.left_out
        pending = range(len(self.fragments)) if self.delayed else range(1, len(self.fragments))
        for fragment in pending:
            outcome = self._exchange_now(fragment, owned, held, True, phase)
            traffic, left_out = traffic + outcome.traffic, left_out + outcome.left_out
        self.flushed = True
        return RoundExchange(traffic.sent, traffic.received, 0, left_out)

    def _exchange_now(self, fragment: int, owned: Sequence[View], held: Sequence[View], participate: bool,
                      phase: str) -> Outcome:
        """Gather, exchange and distribute one fragment, waiting for all of it."""
        lo, hi = self.fragments[fragment]
        # a fresh buffer: blocking rounds hold nothing of the exchange while training (overlap's is kept)
        delta = self._gather(owned, _values(owned), lo, hi)
        piece = self._piece(lo, hi)
        if delta is not None:  # Δ = θ − local; θ holds what every anchor would (see the module's docstring)
            np.subtract(self.theta[slice(*piece)], delta, out=delta)
        norm = self._norm(delta)
        tokens, self.tokens[fragment] = self.tokens[fragment], 0
        self.steps[fragment] += 1
        outcome = Outcome(Traffic())
        if delta is not None:
            with deadline(self.topo.world, self.cfg.timeout_s, f"{phase}: combining the updates"):
                outcome = self.exchange.run(delta, self.theta, slice(*piece), self.steps[fragment],
                                            tokens if participate else 0, norm, not math.isfinite(norm), participate)
        self._distribute(held, self.theta[slice(*piece)] if piece is not None else None, lo, hi)
        if self.anchor is not None:  # overlap's flush: the anchors follow the global model
            for i, part in self._each_owned(owned, lo, hi):
                self.anchor[i][part] = owned[i][1][part]
        return outcome

    def _fold(self, owned: Sequence[View], held: Sequence[View], phase: str) -> Outcome:
        """Overlap: wait for the exchange in flight, then make the local model the new global model minus
        what was learned since the fragment was posted; its anchor becomes the global model. Nothing
        where nothing is in flight."""
        if self.in_flight is None:
            return Outcome(Traffic())
        fragment, _ = self.in_flight
        lo, hi = self.fragments[fragment]
        learned = [None] * len(owned)  # what each owned piece learned since the post: (anchor − posted) − local
        for i, part in self._each_owned(owned, lo, hi):
            learned[i] = self.anchor[i][part] - self.posted[i][part] - owned[i][1][part]
        spans = {i: part for i, part in self._each_owned(owned, lo, hi)}
        since = self._gather(owned, lambda i, a, b, out: np.copyto(out, learned[i][a - spans[i].start:b - spans[i].start]),
                             lo, hi, "since")
        outcome, new, local = Outcome(Traffic()), None, None
        if self.topo.root_index is not None:
            with deadline(self.topo.world, self.cfg.timeout_s, f"{phase}: combining the updates"):
                outcome = self.background.wait()
            new = self.theta[slice(*self._piece(lo, hi))]
            local = np.subtract(new, since)
        # the anchors become the global values exactly (not local + learned, which rounds differently)
        self._distribute([(offset, anchor) for (offset, _), anchor in zip(owned, self.anchor)], new, lo, hi,
                         owned=True)
        self._distribute(held, local, lo, hi)
        for i, part in spans.items():
            self.posted[i][part] = 0
        self.in_flight = None
        return outcome

    # ----------------------------------------------------------------------------------- checkpoints
    @contextmanager
    def global_model(self, held: Sequence[View]) -> Iterator[None]:
        """The global model in the held views for the body (to score it), and the local model back after:
        with fragments or overlap the two differ (`local_differs`). Collective over the facility."""
        kept = [values.copy() for _, values in held]
        self._distribute(held, self.theta, 0, self.numel)
        try:
            yield
        finally:
            for (_, values), copy in zip(held, kept):
                values[:] = copy

    @property
    def outer_state_names(self) -> list[str]:
        """Names of the outer optimizer's state arrays (known on every rank, held on roots)."""
        return list(OUTER[self.cfg.outer].state)

    def outer_state(self) -> dict[str, np.ndarray]:
        """On a root: its segment of every outer state array."""
        return self.outer.full_state(self.theta)

    @property
    def exchange_state_names(self) -> list[str]:
        """Names of the exchange's own state arrays (error feedback), known on every rank."""
        return [] if make_codec(self.cfg.compress, self.cfg.topk_fraction) is None else list(RESIDUALS)

    def exchange_state(self) -> dict[str, np.ndarray]:
        """On a root: its segment of every exchange state array."""
        return self.combiner.state

    @property
    def local_differs(self) -> bool:
        """Whether, between exchanges, the local model may differ from the global one (fragments or
        overlap): then a checkpoint keeps each facility's local model too. Nothing may be in flight."""
        assert self.in_flight is None, "a checkpoint comes between a sync point and its post"
        return len(self.fragments) > 1 or self.delayed

    def restore(self, outer: dict[str, np.ndarray], exchange: dict[str, np.ndarray], owned: Sequence[View],
                rounds_done: int, tokens: Sequence[int] = (), flushed: bool = False) -> None:
        """Resume after `rounds_done` rounds: the engine's views hold the global model (the local model,
        where it differs, is put back into them afterwards), which becomes every anchor (overlap) and, gathered
        as at the start, every root's segment; on roots also the `outer` state and the `exchange` state
        of their segment. `tokens`: trained since each fragment's last exchange; `flushed`: the
        checkpoint came after `flush`. Collective over the facility."""
        self.steps = [rounds_done - (1 if self.delayed and j == 0 and not flushed else 0)
                      for j in range(len(self.fragments))]
        self.tokens = list(tokens) or [0] * len(self.fragments)
        self.flushed = flushed
        theta = self._gather(owned, _values(owned), 0, self.numel)
        if self.topo.root_index is not None:
            self.theta[:] = theta
            for name, values in outer.items():
                self.outer.full_state(self.theta)[name][:] = values
            for name, values in exchange.items():
                self.combiner.state[name][:] = values
        for (_, values), anchor in zip(owned, self.anchor or ()):
            anchor[:] = values
        if self.posted is not None:
            for posted in self.posted:
                posted[:] = 0

    def regroup(self, topo: Topology, cfg: FederationConfig | None = None) -> None:
        """Go on over `topo`: the same facility and roots, other facilities (some left, or came back), and
        `cfg` where given (a facility coming back built itself with settings for itself alone).
        Everything the rounds built up stays: the global segment, the outer state and error feedback,
        the anchors, each fragment's tokens and steps; only the communicators change. Call `close`
        before the old ones are freed; nothing may be in flight."""
        assert self.in_flight is None and topo.n_roots == self.topo.n_roots, "regroup between rounds, same roots"
        self.topo, self.cfg = topo, cfg or self.cfg
        if self.exchange is not None:
            self.exchange = RootExchange(self._mesh(topo), self.cfg, topo.facility_names, self.combiner, self.outer)
            self.background = Background() if self.delayed else None

    def _mesh(self, topo: Topology) -> Mesh:
        """Root r's links to root r of every facility (sealed where the federation holds a token); in the
        background on a communicator of their own. Collective over the roots."""
        comm = topo.roots.Dup() if self.delayed else topo.roots
        # The roots get here as their engines finish building, some later than others: each waits for
        # the others as long as for any other facility (federation.timeout_s).
        return Mesh.connect(comm, topo.facility_names, f"gateway {topo.root_index}", topo.token, owned=self.delayed,
                            wait_s=self.cfg.timeout_s)

    def close(self) -> None:
        """Stop the background exchange's thread and free its links' communicator (collective over the
        roots)."""
        if self.background is not None:
            self.background.close()
            self.exchange.mesh.close()
            self.background = None
