"""The hierarchical reduction of one round: inside each facility first, across facilities by the roots,
then back into every facility.

The flat vector is cut into R segments. Each rank contributes the pseudo-gradient of the ranges it owns;
the facility sums them onto root r for segment r; root r of every facility all-reduces the segment
weighted by the tokens each facility trained; root r applies the outer optimizer and broadcasts the new
segment back into its facility.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from mpi4py import MPI

from mpifed import wire
from mpifed.federation.outer import OuterOptimizer
from mpifed.topology import Topology
from mpifed.watchdog import deadline


def segments(numel: int, n: int) -> list[tuple[int, int]]:
    """[start, stop) of n nearly equal segments covering 0..numel."""
    return [(numel * i // n, numel * (i + 1) // n) for i in range(n)]


@dataclass(frozen=True)
class RoundExchange:
    """What one rank did in a round's exchange."""

    bytes_inter: int
    """Payload bytes this rank handed to the inter-facility all-reduce (0 off the roots)."""
    facility_tokens: int
    """Tokens this rank's facility trained in the round."""


def federated_round(topo: Topology, owned: Sequence[tuple[int, np.ndarray]],
                    held: Sequence[tuple[int, np.ndarray]], global_flat: np.ndarray, tokens: int,
                    outer: OuterOptimizer, timeout_s: float) -> RoundExchange:
    """Replace `global_flat` by the outer step on the facilities' weighted mean pseudo-gradient, and load
    it into `held`. `owned` are this rank's (offset, values) contributions, disjoint across the facility
    and covering the model; `tokens` is what this rank trained. Collective over `topo.world`.
    """
    delta = np.zeros_like(global_flat)
    for offset, values in owned:
        np.subtract(global_flat[offset:offset + len(values)], values, out=delta[offset:offset + len(values)])
    facility_tokens = int(wire.allreduce(topo.facility, [tokens])[0])
    root = topo.root_index
    sent = 0
    if root is not None:
        with deadline(topo.world, timeout_s, "counting tokens across facilities"):
            weight = np.float32(facility_tokens / wire.allreduce(topo.roots, [facility_tokens])[0])
    for r, (start, stop) in enumerate(segments(len(global_flat), topo.n_roots)):
        mine = delta[start:stop]
        summed = np.empty_like(mine) if root == r else None
        topo.facility.Reduce(mine, summed, op=MPI.SUM, root=r)
        if root == r:
            summed *= weight
            with deadline(topo.world, timeout_s, f"the exchange of segment {r} across facilities"):
                topo.roots.Allreduce(MPI.IN_PLACE, summed, op=MPI.SUM)
            sent += summed.nbytes
            outer.step(global_flat[start:stop], summed)
        topo.facility.Bcast(global_flat[start:stop], root=r)
    for offset, values in held:
        values[:] = global_flat[offset:offset + len(values)]
    return RoundExchange(bytes_inter=sent, facility_tokens=facility_tokens)
