"""Training data: the embedded default corpus, prepared dataset folders (`mpifed data prepare`, read
memory-mapped with `load_from_disk`), packing into sequences, per-facility partitions, and the per-rank
sampler.

The default corpus is real English text present in every Python installation: the help topics of
`pydoc_data.topics` and the docstrings of the standard library's modules, classes and functions, read
from source with `ast` (nothing is imported or downloaded). It is tokenized at byte level (vocabulary
256), packed into fixed-length sequences, shuffled with the run's seed, and cut into a validation set
shared by all facilities plus one disjoint partition per facility.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def stdlib_text() -> str:
    """The embedded corpus: pydoc help topics, then stdlib docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                parts += _docstrings((Path(root) / name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a few stdlib files are templates or other-version syntax
    return "\n\n".join(dict.fromkeys(parts))  # repeated docstrings once: less train/validation overlap


def cache_dir() -> Path:
    base = os.environ.get("MPIFED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mpifed")
    return Path(base)


def stdlib_tokens() -> np.ndarray:
    """The embedded corpus as uint8 byte tokens, cached per Python build (building takes seconds)."""
    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|v2".encode()).hexdigest()[:16]
    path = cache_dir() / f"stdlib-text-{key}.u8"
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        pass
    tokens = np.frombuffer(stdlib_text().encode("utf-8"), dtype=np.uint8).copy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokens.tofile(tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache only saves time; a read-only home still trains
    return tokens


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into [n, seq_len] int64 sequences, dropping the ragged tail."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens cannot fill one sequence of {seq_len}")
    return tokens[: n * seq_len].astype(np.int64).reshape(n, seq_len)


@dataclass(frozen=True)
class Split:
    """Disjoint partitions (one per facility) and a validation set, all [n, seq_len]."""

    partitions: tuple[np.ndarray, ...]
    validation: np.ndarray


def split(sequences: np.ndarray, n_partitions: int, val_fraction: float, seed: int) -> Split:
    """Shuffle sequences with `seed`, hold out `val_fraction`, cut the rest into equal IID partitions."""
    order = np.random.default_rng(seed).permutation(len(sequences))
    n_val = max(1, int(round(len(sequences) * val_fraction)))
    train = order[n_val:]
    per = len(train) // n_partitions
    if per == 0:
        raise ValueError(f"{len(sequences)} sequences are too few for {n_partitions} partitions and validation")
    parts = tuple(sequences[np.sort(train[i * per:(i + 1) * per])] for i in range(n_partitions))
    return Split(partitions=parts, validation=sequences[np.sort(order[:n_val])])


Batch = "np.ndarray | tuple[np.ndarray, np.ndarray]"
"""Token ids [n, L] (the labels are the ids), or (ids, labels) with -100 where a token carries no loss."""


def take(partition: "np.ndarray | datasets.Dataset", rows: np.ndarray) -> Batch:
    """Rows of an in-memory [n, L] array, or of a prepared split (read from its memory-mapped file)."""
    if isinstance(partition, np.ndarray):
        return partition[rows]
    got = partition[rows]
    ids = np.asarray(got["input_ids"], dtype=np.int64)
    return (ids, np.asarray(got["labels"], dtype=np.int64)) if "labels" in got else ids


class Sampler:
    """Micro-batches for one rank: its stride of the facility's partition, reshuffled every epoch.

    Deterministic in `seed` (the caller mixes in facility and rank); `position` and `epoch` are all it
    needs to resume. The partition is an in-memory array or a prepared split (rows read on demand).
    """

    def __init__(self, partition: "np.ndarray | datasets.Dataset", rank: int, ranks: int,
                 micro_batch: int, seed: tuple[int, ...]) -> None:
        self.partition = partition
        self.index = np.arange(len(partition))[rank::ranks]
        if len(self.index) < micro_batch:
            raise ValueError(f"rank {rank} has {len(self.index)} sequences, fewer than one micro-batch "
                             f"of {micro_batch}; lower train.micro_batch or use fewer ranks")
        self.micro_batch = micro_batch
        self.seed = tuple(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.index))

    def restore(self, epoch: int, position: int) -> None:
        """Continue exactly where a sampler with this epoch and position stopped."""
        self.epoch, self.position = epoch, position
        self._order = self._permutation()

    def next_batch(self) -> Batch:
        if self.position + self.micro_batch > len(self.index):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        rows = self.index[self._order[self.position:self.position + self.micro_batch]]
        self.position += self.micro_batch
        return take(self.partition, rows)


class DataError(ValueError):
    """A prepared dataset folder that cannot be used; the message names it."""


class Prepared:
    """A folder written by `mpifed data prepare`: its manifest, and its splits memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.kind: str = self.manifest["kind"]
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.partitions: int = len(self.manifest["partitions"])

    def split(self, name: str) -> datasets.Dataset:
        import datasets

        return datasets.load_from_disk(str(self.path / name)).with_format("numpy")

    def partition(self, index: int) -> datasets.Dataset:
        return self.split(f"partition_{index}")

    def validation(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` validation rows as (ids, labels), in memory."""
        val = self.split("validation")
        batch = take(val, np.arange(min(limit, len(val))))
        return batch if isinstance(batch, tuple) else (batch, batch)


def read_manifest(path: Path) -> dict:
    """DIR/manifest.json of a prepared folder, checked; errors name the folder and what to do."""
    if not path.is_dir():
        raise DataError(f"data.path {path}: no such folder; make one with `mpifed data prepare INPUT... --out {path}`")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except OSError:
        raise DataError(f"data.path {path}: not a prepared dataset (no manifest.json); make one with "
                        "`mpifed data prepare`") from None
    except ValueError as exc:
        raise DataError(f"data.path {path}: manifest.json is not valid JSON ({exc})") from None
    missing = [key for key in ("kind", "seq_len", "vocab_size", "partitions", "validation") if key not in manifest]
    if missing:
        raise DataError(f"data.path {path}: manifest.json lacks {', '.join(missing)}; prepare the data again")
    return manifest
