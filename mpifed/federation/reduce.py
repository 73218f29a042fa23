"""The hierarchical reduction of one round: inside each facility first, across facilities by the roots,
then back into every facility.

The flat model is cut into R segments, segment r belonging to root r of every facility.
1. Gather: every rank sends the pseudo-gradient Δ = θ_global − θ_local of the ranges it owns to the root
   of each segment they fall in, streamed in buckets; the root receives each piece in place (an MPI
   indexed datatype), so no rank holds more than one bucket beyond its state.
2. Guard: roots share each facility's update norm and token count; facilities with NaN/Inf or an
   outsized update, and facilities not sampled this round, are left out; weights are renormalised.
3. Exchange: root r of every participating facility combines its token-weighted segment: an fp32
   all-reduce, or (bf16/int8) an all-gather of compressed payloads summed in facility order, so every
   root gets the same bytes. Left-out roots receive the result too, to keep the outer state identical.
4. Outer step on each root's segment; then the new segments flow back into the facility.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpifed.comm import control
from mpifed.comm.topology import Topology
from mpifed.comm.watchdog import deadline
from mpifed.config import FederationConfig
from mpifed.federation.compress import CODECS, ErrorFeedback
from mpifed.federation.outer import OUTER, make_outer
from mpifed.layout import View

Range = tuple[int, int]


class FederationError(RuntimeError):
    """A round that cannot produce a trustworthy global model."""


def segments(numel: int, n: int) -> list[Range]:
    """[start, stop) of n nearly equal segments covering 0..numel."""
    return [(numel * i // n, numel * (i + 1) // n) for i in range(n)]


def _clip(ranges: Sequence[Range], lo: int, hi: int) -> list[Range]:
    return [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]


def _ranges(views: Sequence[View]) -> list[Range]:
    return [(offset, offset + len(values)) for offset, values in views]


def _allgather_ranges(comm: MPI.Intracomm, ranges: list[Range]) -> list[list[Range]]:
    flat = control.allgather_str(comm, ",".join(f"{a}:{b}" for a, b in ranges))
    return [[tuple(map(int, item.split(":"))) for item in text.split(",") if item] for text in flat]


def sampled(n_facilities: int, fraction: float, seed: int, round_: int) -> list[bool]:
    """Which facilities train in `round_`: round(fraction x n), at least one, drawn with the seed: the
    same draw on every rank, no communication."""
    if fraction >= 1:
        return [True] * n_facilities
    chosen = np.random.default_rng([seed, round_, 7]).choice(
        n_facilities, max(1, int(fraction * n_facilities + 0.5)), replace=False)
    return [i in chosen for i in range(n_facilities)]


@dataclass(frozen=True)
class RoundExchange:
    """What one rank saw of a round's exchange."""

    bytes_inter: int
    """Payload bytes this rank handed to the cross-facility exchange (0 off the roots)."""
    facility_tokens: int
    """Tokens this rank's facility trained in the round."""
    left_out: tuple[str, ...] = ()
    """On roots: 'NAME: reason' for each facility whose update was not used."""


class Federation:
    """The reduction state of one rank: θ_global over its owned ranges, and on root r the θ_global
    segment r with its outer optimizer and error-feedback residual. Built collectively per facility."""

    def __init__(self, topo: Topology, cfg: FederationConfig, numel: int, owned: Sequence[View],
                 held: Sequence[View]) -> None:
        self.topo, self.cfg, self.numel = topo, cfg, numel
        self.segments = segments(numel, topo.n_roots)
        self.bucket = max(1, int(cfg.bucket_mb * 2 ** 20) // 4)
        self.owned_all = _allgather_ranges(topo.facility, sorted(_ranges(owned)))
        self._check_ownership(_ranges(held))
        self.full_replicas = all(h == [(0, numel)] for h in _allgather_ranges(topo.facility, _ranges(held)))
        self.theta_owned = [values.copy() for _, values in owned]
        root = topo.root_index
        self.outer = self.feedback = None
        if root is not None:
            start, stop = self.segments[root]
            self.outer = make_outer(cfg.outer, cfg.outer_lr, cfg.outer_momentum, cfg.outer_beta2, cfg.outer_tau,
                                    cfg.outer_warmup)
            if CODECS[cfg.compress] is not None:
                self.feedback = ErrorFeedback(CODECS[cfg.compress], stop - start)
        # Root r starts from the current model's segment r.
        self.theta = self._gather(owned, lambda i, a, b, out: np.copyto(out, owned[i][1][a:b]))
        if root is not None and _ranges(owned) == [self.segments[root]]:
            self.theta_owned = [self.theta]  # shard-aligned: what I own is my segment; keep one copy

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

    def _gather(self, owned: Sequence[View], produce: Callable[[int, int, int, np.ndarray], None]) -> np.ndarray | None:
        """Root r receives segment r assembled from every rank's owned pieces; `produce(i, a, b, out)`
        writes owned view i's values [a, b) (relative to the view) into `out`."""
        fac, root = self.topo.facility, self.topo.root_index
        result = np.empty(self.segments[root][1] - self.segments[root][0], np.float32) if root is not None else None
        mine = _ranges(owned)
        for r, (start, stop) in enumerate(self.segments):
            for lo in range(start, stop, self.bucket):
                hi = min(stop, lo + self.bucket)
                if fac.rank == r:
                    self._receive_bucket(result, start, lo, hi)
                    for i, (a, b) in enumerate(mine):
                        for x, y in _clip([(a, b)], lo, hi):
                            produce(i, x - a, y - a, result[x - start:y - start])
                else:  # in offset order: the order of the root's indexed datatype for this rank
                    pieces = [(i, x - a, y - a) for i, (a, b) in sorted(enumerate(mine), key=lambda v: v[1])
                              for x, y in _clip([(a, b)], lo, hi)]
                    if pieces:
                        buf = np.empty(sum(y - x for _, x, y in pieces), np.float32)
                        at = 0
                        for i, x, y in pieces:
                            produce(i, x, y, buf[at:at + y - x])
                            at += y - x
                        fac.Send(buf, dest=r, tag=r)
        return result

    def _receive_bucket(self, result: np.ndarray, start: int, lo: int, hi: int) -> None:
        fac = self.topo.facility
        requests, types = [], []
        for k, ranges in enumerate(self.owned_all):
            pieces = _clip(ranges, lo, hi)
            if k == fac.rank or not pieces:
                continue
            dtype = MPI.FLOAT.Create_indexed([b - a for a, b in pieces], [a - start for a, b in pieces]).Commit()
            requests.append(fac.Irecv([result, 1, dtype], source=k, tag=fac.rank))
            types.append(dtype)
        MPI.Request.Waitall(requests)
        for dtype in types:
            dtype.Free()

    def synchronise(self, owned: Sequence[View], held: Sequence[View], tokens: int, participate: bool,
                    phase: str = "exchange") -> RoundExchange:
        """One synchronisation. `owned`/`held` are the engine's views; `tokens` what this rank trained;
        `phase` names its waits in errors. Collective over the world; raises FederationError when too few
        facilities are left."""
        facility_tokens = int(control.allreduce(self.topo.facility, [tokens])[0])
        delta = self._gather(owned, lambda i, a, b, out: np.subtract(self.theta_owned[i][a:b], owned[i][1][a:b], out=out))
        # A NaN or Inf anywhere makes the squared norm NaN or Inf: no separate scan needed.
        norm2 = control.allreduce(self.topo.facility, [float(np.dot(delta, delta)) if delta is not None else 0.0])[0]
        sent, left_out = 0, ()
        if delta is not None:
            bad = not math.isfinite(norm2)
            sent, left_out = self._exchange(delta, facility_tokens, 0.0 if bad else math.sqrt(norm2), bad, participate,
                                            phase)
        self._distribute(held)
        for (offset, values), theta in zip(owned, self.theta_owned):
            if theta is not self.theta:  # an aliased segment is already the new global model
                theta[:] = values
        # A federation of one facility moves nothing between sites, whatever its roots hand each other.
        return RoundExchange(sent if self.topo.n_facilities > 1 else 0, facility_tokens, left_out)

    def segment_counts(self) -> tuple[list[int], list[int]]:
        """Counts and displacements of the segments over the facility's ranks (root r holds segment r,
        the other ranks nothing), as Allgatherv/Gatherv/Scatterv take them."""
        idle = [0] * (self.topo.facility.size - len(self.segments))
        return [b - a for a, b in self.segments] + idle, [a for a, _ in self.segments] + idle

    @property
    def outer_state_names(self) -> list[str]:
        """Names of the outer optimizer's state arrays (known on every rank, held on roots)."""
        return list(OUTER[self.cfg.outer].state)

    def outer_state(self) -> dict[str, np.ndarray]:
        """On a root: its segment of every outer state array."""
        return self.outer.full_state(self.theta)

    def restore(self, theta: np.ndarray, outer: dict[str, np.ndarray], residual: np.ndarray | None,
                owned: Sequence[View], rounds_done: int) -> None:
        """Resume after `rounds_done` rounds: the global model is already in the engine's views; on roots
        also `theta` (segment), `outer` state and error-feedback `residual` of the segment."""
        if self.topo.root_index is not None:
            self.outer.steps = rounds_done  # one outer step per round, on every root
            self.theta[:] = theta
            for name, values in outer.items():
                self.outer.full_state(self.theta)[name][:] = values
            if self.feedback is not None and residual is not None:
                self.feedback.residual[:] = residual
        for (_, values), copy in zip(owned, self.theta_owned):
            if copy is not self.theta:
                copy[:] = values

    def _decide(self, stats: np.ndarray) -> tuple[list[bool], list[str]]:
        """Who takes part, from every facility's [norm, bad, tokens, participate]: the same on every root."""
        names = self.topo.facility_names
        mask = [bool(p) and not b for _, b, _, p in stats]
        reasons = [f"{names[f]}: its update has NaN/Inf values" for f, (_, b, _, p) in enumerate(stats) if p and b]
        ratio = self.cfg.max_norm_ratio
        if ratio > 0:
            norms = [(f, s[0]) for f, s in enumerate(stats) if mask[f]]
            for f, norm in norms:
                others = [n for g, n in norms if g != f]
                if others and norm > ratio * float(np.median(others)):
                    mask[f] = False
                    reasons.append(f"{names[f]}: update norm {norm:.3g} is more than {ratio:g}x the median "
                                   f"{float(np.median(others)):.3g} of the others (federation.max_norm_ratio)")
        if sum(mask) < self.cfg.min_participants:
            raise FederationError(f"only {sum(mask)} facilities are left this round, fewer than "
                                  f"federation.min_participants = {self.cfg.min_participants}"
                                  + (f" ({'; '.join(reasons)})" if reasons else "") + "; the last checkpoint is kept")
        return mask, reasons

    def _exchange(self, delta: np.ndarray, tokens: int, norm: float, bad: bool, participate: bool, phase: str
                  ) -> tuple[int, tuple[str, ...]]:
        roots, me = self.topo.roots, self.topo.facility_index
        stats = np.empty((roots.size, 4), np.float64)
        with deadline(self.topo.world, self.cfg.timeout_s, f"{phase}: sharing the update norms"):
            roots.Allgather(np.array([norm, bad, tokens if participate else 0, participate], np.float64), stats)
        mask, reasons = self._decide(stats)
        sent = 0
        with deadline(self.topo.world, self.cfg.timeout_s, f"{phase}: combining the updates"):
            group = roots if all(mask) else roots.Split(1 if mask[me] else MPI.UNDEFINED, key=me)
            if mask[me]:
                delta *= np.float32(tokens / sum(s[2] for s, m in zip(stats, mask) if m))
                sent = self._combine(group, delta)
            if not all(mask):
                roots.Bcast(delta, root=mask.index(True))
                if group != MPI.COMM_NULL:
                    group.Free()
        self.outer.step(self.theta, delta)
        return sent, tuple(reasons)

    def _combine(self, group: MPI.Intracomm, delta: np.ndarray) -> int:
        """Sum `delta` over `group` in place; returns the payload bytes this root sent."""
        if self.feedback is None:
            group.Allreduce(MPI.IN_PLACE, delta, op=MPI.SUM)
            return delta.nbytes
        payload = self.feedback.compress(delta)
        everyone = np.empty((group.size, len(payload)), np.uint8)
        group.Allgather(payload, everyone)
        delta[:] = 0
        for row in everyone:  # facility order: the same sum, bit for bit, on every root
            delta += self.feedback.codec.decode(row, len(delta))
        return payload.nbytes

    def _distribute(self, held: Sequence[View]) -> None:
        fac, root = self.topo.facility, self.topo.root_index
        if self.full_replicas:
            flat = held[0][1]
            if root is not None:
                start, stop = self.segments[root]
                flat[start:stop] = self.theta
            counts, displs = self.segment_counts()
            fac.Allgatherv(MPI.IN_PLACE, [flat, counts, displs, MPI.FLOAT])
            return
        for r, (start, stop) in enumerate(self.segments):
            for lo in range(start, stop, self.bucket):
                hi = min(stop, lo + self.bucket)
                buf = self.theta[lo - start:hi - start] if root == r else np.empty(hi - lo, np.float32)
                fac.Bcast(buf, root=r)
                for offset, values in held:
                    for x, y in _clip([(offset, offset + len(values))], lo, hi):
                        values[x - offset:y - offset] = buf[x - lo:y - lo]
