"""When, inside a round of H inner steps, each fragment of the model is exchanged and when an exchange
running in the background lands: the schedule the trainer follows and the configuration checks. Plain
arithmetic, no imports from the package (config.py, below everything else, needs it).

Fragment j of K syncs after inner step j·H/K, fragment 0 at the round's end. With overlap = delayed
each sync point posts its fragment's exchange, which lands at the next sync point, or τ =
federation.overlap_steps inner steps after its post where τ is set (at most the steps between two
sync points, so that one exchange is in flight at a time).
"""
from __future__ import annotations


def sync_offsets(local_steps: int, fragments: int) -> list[int]:
    """The inner step of a round after which each fragment syncs: fragment 0 at the round's end,
    fragment j at j·H/K."""
    return [local_steps] + [j * local_steps // fragments for j in range(1, fragments)]


def longest_lag(local_steps: int, fragments: int) -> int:
    """The most inner steps an exchange may stay in flight (federation.overlap_steps): the fewest steps
    between two sync points, a round's boundary included."""
    offsets = sorted(sync_offsets(local_steps, fragments))
    return min(b - a for a, b in zip([0, *offsets], offsets))


def fold_steps(local_steps: int, fragments: int, lag: int) -> set[int]:
    """The inner steps of a round after which the exchange in flight lands, apart from the sync points
    (which land whatever is still in flight): `lag` steps after each post; none for lag 0."""
    offsets = sync_offsets(local_steps, fragments)
    return set() if lag == 0 else {(o + lag - 1) % local_steps + 1 for o in offsets} - set(offsets)
