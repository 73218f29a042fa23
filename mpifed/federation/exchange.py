"""The cross-facility hop: root r of every participating facility combines its token-weighted
pseudo-gradient of (a piece of) segment r so that each of them ends with the same sum, bit for bit;
the guard that decides who takes part; the outer step; and the thread that runs an exchange in the
background while training goes on (federation.overlap = delayed).

A reduce-scatter, then an all-gather, whatever the codec (`none` sends the fp32 values themselves):
1. every root encodes its segment (error feedback: last round's residual is added first, what the code
   could not carry is kept) and sends chunk c of the payload to the c-th root of the group;
2. the c-th root decodes the group's pieces of chunk c and sums them in facility order, then encodes
   the sum, with an error feedback of its own for the chunks it sums;
3. every root sends its encoded sum to every other: every root decodes every chunk from the same bytes.
Every message is point to point over a link between two roots (mpifed/comm/link.py: sealed where the
federation holds a token); no MPI collective spans two facilities.
So a root sends and receives about 2·(F − 1)/F times its payload at any number F of facilities (an
all-gather of whole payloads would make it receive F − 1 of them). Chunks are whole codec blocks.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from mpifed.comm.link import Mesh
from mpifed.config import FederationConfig
from mpifed.federation import kernels
from mpifed.federation.compress import RESIDUALS, Codec, decode, encode
from mpifed.federation.outer import OuterOptimizer


class FederationError(RuntimeError):
    """A round that cannot produce a trustworthy global model."""


@dataclass(frozen=True)
class Traffic:
    """Bytes one root moved in one exchange (both phases)."""

    sent: int = 0
    received: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.sent + other.sent, self.received + other.received)


class Combiner:
    """One root's side of the exchange of its segment (n values): the codec (None: fp32), the two
    error-feedback residuals, each over the whole segment (which chunks a root sums depends on who
    takes part in a round; what it kept for a chunk waits until it sums that chunk again), and the
    buffers of an exchange (each at most the segment's payload; fp32 needs one), kept for the next one
    with `keep` (an exchange in the background, during training) and otherwise let go: between blocking
    exchanges a root holds nothing of them while it trains."""

    def __init__(self, codec: Codec | None, n: int, threads: int = 1, keep: bool = False) -> None:
        self.codec, self.n, self.threads, self.keep = codec, n, threads, keep
        if codec is not None and codec.fused:
            kernels.library()  # built now where this machine type has no build yet, not inside a round
        self.state: dict[str, np.ndarray] = {} if codec is None else {
            name: np.zeros(n, np.float32) for name in RESIDUALS}
        """Error-feedback state, by name (what a checkpoint keeps of the exchange)."""
        self._buffers: dict[str, np.ndarray] = {}
        self.poll_s = 0.0
        """0: wait for the links the usual way (spinning); > 0: test every this many seconds and sleep
        between, leaving the core to training (an exchange in the background, over a slow link)."""

    def _buffer(self, name: str, size: int) -> np.ndarray:
        """A byte buffer for this exchange (and with `keep` the next: large fresh arrays in the background
        would cost their page faults each time)."""
        if name not in self._buffers or len(self._buffers[name]) < size:
            self._buffers[name] = np.empty(size, np.uint8)
        return self._buffers[name][:size]

    def _block(self) -> int:
        return self.codec.block if self.codec is not None else 1

    def _size(self, values: int) -> int:
        return 4 * values if self.codec is None else self.codec.payload_bytes(values)

    def chunks(self, n: int, parts: int) -> list[tuple[int, int]]:
        """[lo, hi) of `parts` chunks of whole blocks covering n values."""
        block = self._block()
        blocks = -(-n // block)
        return [(min(n, block * (blocks * c // parts)), min(n, block * (blocks * (c + 1) // parts)))
                for c in range(parts)]

    def combine(self, group: Mesh, delta: np.ndarray, at: slice = slice(None), weights: Sequence[float] = ()
                ) -> Traffic:
        """Replace `delta` (segment values `at`) by its sum over the members of `group`, each member's
        taken times its `weights` entry (none: as they are); returns this root's traffic (payload bytes;
        a sealed link adds seal.OVERHEAD per frame of up to link.FRAME_BYTES). fp32 weighs what it
        receives (a pass over 1/F of the segment instead of all of it); a codec weighs before encoding,
        since its error feedback is of what it sends."""
        if weights and (self.codec is not None or group.size == 1):
            delta *= np.float32(weights[group.rank])
        size, me = group.size, group.rank
        if size == 1 and self.codec is None:  # alone: the weighted values are the sum; nothing to send
            return Traffic()
        spans = self.chunks(len(delta), size)
        sizes = [self._size(hi - lo) for lo, hi in spans]
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        lo, hi = spans[me]
        mine = delta[lo:hi]
        others = [f for f in range(size) if f != me]
        pieces = self._buffer("pieces", size * sizes[me]).reshape(size, sizes[me])
        if self.codec is None:  # the fp32 values are the payload: no copy before, none after (unsealed)
            chunks = {f: delta[a:b] for f, (a, b) in enumerate(spans) if f != me}
            np.copyto(pieces[me].view(np.float32), mine)
            group.exchange(chunks, {f: pieces[f] for f in others}, self.poll_s)
            values = pieces.view(np.float32)
            for f in range(size):  # facility order: the same sum, bit for bit, wherever it is taken
                if weights:
                    np.multiply(values[f], np.float32(weights[f]), out=mine if f == 0 else values[f])
                elif f == 0:
                    np.copyto(mine, values[0])
                if f > 0:
                    np.add(mine, values[f], out=mine)
            group.exchange({f: mine for f in others}, chunks, self.poll_s)
        else:
            residual, sums = self.state["residual"][at], self.state["sum_residual"][at]
            payload = encode(self.codec, delta, residual, self._buffer("payload", sum(sizes)), self.threads)
            pieces[me] = payload[starts[me]:starts[me] + sizes[me]]
            group.exchange({f: payload[starts[f]:starts[f] + sizes[f]] for f in others},
                           {f: pieces[f] for f in others}, self.poll_s)
            for f in range(size):  # facility order, as above
                decode(self.codec, pieces[f], hi - lo, mine, f > 0, self.threads)
            gathered = self._buffer("gathered", sum(sizes))
            encode(self.codec, mine, sums[lo:hi], gathered[starts[me]:starts[me] + sizes[me]], self.threads)
            group.exchange({f: gathered[starts[me]:starts[me] + sizes[me]] for f in others},
                           {f: gathered[starts[f]:starts[f] + sizes[f]] for f in others}, self.poll_s)
            for (a, b), start, length in zip(spans, starts, sizes):
                decode(self.codec, gathered[start:start + length], b - a, delta[a:b], False, self.threads)
        if not self.keep:
            self._buffers.clear()
        others_bytes = sum(sizes) - sizes[me]
        return Traffic(sent=others_bytes + sizes[me] * (size - 1), received=sizes[me] * (size - 1) + others_bytes)


@dataclass(frozen=True)
class Outcome:
    """What one root saw of one exchange."""

    traffic: Traffic
    left_out: tuple[str, ...] = ()
    """'NAME: reason' for each facility whose update was not used."""


class RootExchange:
    """Root r's side of one exchange across facilities, over `mesh` (its links to root r of every
    facility, in facility order): share every facility's update norm and tokens, leave out what the guard refuses (NaN/Inf,
    an outsized norm, a facility that sat the round out), combine the others' token-weighted updates,
    hand the result to the left-out roots, and step the outer optimizer."""

    def __init__(self, mesh: Mesh, cfg: FederationConfig, names: Sequence[str], combiner: Combiner,
                 outer: OuterOptimizer) -> None:
        self.mesh, self.cfg, self.names = mesh, cfg, list(names)
        self.combiner, self.outer = combiner, outer

    def run(self, delta: np.ndarray, theta: np.ndarray, at: slice, number: int, tokens: int, norm: float,
            bad: bool, participate: bool) -> Outcome:
        """Exchange `delta` (this facility's unweighted update of segment values `at`, overwritten) and
        apply outer step `number` to `theta[at]`. Every member of the mesh runs it."""
        mesh, me, poll_s = self.mesh, self.mesh.rank, self.combiner.poll_s
        stats = np.empty((mesh.size, 4), np.float64)
        mine = np.array([norm, bad, tokens if participate else 0, participate], np.float64)
        mesh.allgather(mine, stats, poll_s)
        mask, reasons = self._decide(stats)
        traffic = Traffic()
        group = mesh if all(mask) or not mask[me] else mesh.subset(mask)
        if mask[me]:
            total = sum(s[2] for s, m in zip(stats, mask) if m)
            # no tokens anywhere (nothing trained since the last exchange): every update is zero alike
            weights = [s[2] / total if total > 0 else 1 / sum(mask) for s, m in zip(stats, mask) if m]
            traffic = self.combiner.combine(group, delta, at, weights)
        if not all(mask):
            first = mask.index(True)
            if me == first:  # to the left-out roots: the fp32 result, once
                mesh.exchange({f: delta for f, m in enumerate(mask) if not m}, {}, poll_s)
            elif not mask[me]:
                mesh.exchange({}, {first: delta}, poll_s)
            traffic += Traffic(sent=delta.nbytes * mask.count(False) if me == first else 0,
                               received=0 if mask[me] else delta.nbytes)
        if not self.combiner.keep:  # blocking: the links hold nothing of the exchange while training
            mesh.release()
        self.outer.step(theta[at], delta, at, number)
        return Outcome(traffic, tuple(reasons))

    def _decide(self, stats: np.ndarray) -> tuple[list[bool], list[str]]:
        """Who takes part, from every facility's [norm, bad, tokens, participate]: the same on every root."""
        names = self.names
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


class Background:
    """One exchange at a time on a thread of its own (its links on a communicator of their own), so that
    training goes on meanwhile; `wait` hands back its result, or raises what it raised. The thread keeps
    torch's kernels to itself alone (see compress._one_torch_thread)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, "mpifed-exchange", initializer=torch.set_num_threads, initargs=(1,))
        self._future: Future | None = None

    def start(self, work: Callable[[], Outcome]) -> None:
        assert self._future is None, "one exchange in flight at a time"
        self._future = self._pool.submit(work)

    def wait(self) -> Outcome:
        future, self._future = self._future, None
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
