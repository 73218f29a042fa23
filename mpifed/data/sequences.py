"""Token streams into training rows, and rows into splits: the one packer and the one splitter that the
embedded corpus and `mpifed data prepare` share, so both hold out validation and cut partitions by the
same rule.

  pack        a stream cut into rows of seq_len tokens, the ragged tail dropped
  val_count   how many of n rows a validation fraction holds out (at least one, never all)
  split_rows  a seeded shuffle of n row numbers into a validation set and weighted partitions that
              together use every row exactly once
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pack(stream: np.ndarray, seq_len: int, dtype: type = np.int64) -> np.ndarray:
    """`stream` cut into [n, seq_len] rows of `dtype`, dropping the ragged tail (len(stream) - n·seq_len
    tokens). Raises ValueError when the stream cannot fill one row."""
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} tokens cannot fill one sequence of {seq_len}")
    return stream[:n * seq_len].astype(dtype).reshape(n, seq_len)


def val_count(n: int, fraction: float) -> int:
    """Rows of n held out for validation: round(n·fraction), at least one and leaving at least one."""
    return min(n - 1, max(1, int(round(n * fraction)))) if n > 1 else 0


def cut(n: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """[start, stop) of consecutive pieces of 0..n sized by `weights` (rounded; together all of n)."""
    edges = np.round(np.cumsum([0.0, *weights]) / sum(weights) * n).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def split_rows(n: int, val_fraction: float, weights: Sequence[float], rng: np.random.Generator
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """(partitions, validation): row numbers 0..n-1 shuffled with `rng`, `val_count` of them held out,
    the rest cut by `weights`; each set sorted. Every row lands in exactly one set."""
    order = rng.permutation(n)
    n_val = val_count(n, val_fraction)
    train = order[n_val:]
    return [np.sort(train[a:b]) for a, b in cut(len(train), weights)], np.sort(order[:n_val])
