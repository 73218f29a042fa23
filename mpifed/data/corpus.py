"""The corpus a run trains on, behind one interface (`Corpus`): the embedded default text, or a prepared
dataset folder (`mpifed data prepare`, read memory-mapped with `load_from_disk`); and the per-rank
`Sampler` over a facility's partition.

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
from typing import TYPE_CHECKING, Callable

import numpy as np

from mpifed import cache_dir
from mpifed.config import DataConfig
from mpifed.data.sequences import pack, split_rows

if TYPE_CHECKING:
    import datasets
    from mpi4py import MPI

VOCAB_SIZE = 256
MANIFEST = "manifest.json"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def docstrings(source: str) -> list[str]:
    """The docstrings of a Python source's module, classes and functions, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def tree_docstrings(folder: Path) -> list[str]:
    """Every docstring of the .py files under `folder`, walked in sorted order, leaving out tests and
    vendored packages (`_SKIP_DIRS`) and any file that does not parse."""
    parts: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                parts += docstrings((Path(root) / name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a few stdlib files are templates or other-version syntax
    return parts


def stdlib_text() -> str:
    """The embedded corpus: pydoc help topics, then stdlib docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)] + tree_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    return "\n\n".join(dict.fromkeys(parts))  # repeated docstrings once: less train/validation overlap


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


@dataclass(frozen=True)
class Split:
    """Disjoint partitions (one per facility) and a validation set, all [n, seq_len]."""

    partitions: tuple[np.ndarray, ...]
    validation: np.ndarray


def split(sequences: np.ndarray, n_partitions: int, val_fraction: float, seed: int) -> Split:
    """Shuffle sequences with `seed`, hold out `val_fraction`, cut the rest into equal IID partitions
    (`sequences.split_rows`: every sequence used once)."""
    parts, val = split_rows(len(sequences), val_fraction, [1.0] * n_partitions, np.random.default_rng(seed))
    if min(map(len, parts)) == 0:
        raise ValueError(f"{len(sequences)} sequences are too few for {n_partitions} partitions and validation")
    return Split(partitions=tuple(sequences[rows] for rows in parts), validation=sequences[val])


Batch = "np.ndarray | tuple[np.ndarray, np.ndarray]"
"""Token ids [n, L] (the labels are the ids), or (ids, labels) with -100 where a token carries no loss."""


def take(partition: "np.ndarray | _CheckedSplit", rows: np.ndarray) -> Batch:
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

    def __init__(self, partition: "np.ndarray | _CheckedSplit", rank: int, ranks: int,
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
    """A prepared dataset folder that cannot be used; the message names it. Bad input: exit code 2."""

    exit_code = 2


class Corpus:
    """What a run trains and validates on, whatever its source: one partition per facility, a validation
    set shared by all, and the shape a model needs (sequence length, vocabulary)."""

    seq_len: int
    vocab_size: int
    description: str
    """For the start-up line, e.g. `the embedded text` or `pretrain data DIR (1,234 tokens)`."""
    digest: str = ""
    """For a corpus a rank builds itself, what tells it apart from another rank's (the embedded text
    comes from the Python it runs on); "" for a prepared folder, which every site reads as it is."""

    def partition(self, index: int) -> "np.ndarray | _CheckedSplit":
        """Partition `index` (a facility's), rows read on demand where the corpus is on disk."""
        raise NotImplementedError

    def validation(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` validation rows as (ids, labels), in memory."""
        raise NotImplementedError


class Embedded(Corpus):
    """The standard library's text at byte level (vocabulary 256), packed into `seq_len` sequences and
    split with the seed into a validation set and `partitions` equal partitions."""

    def __init__(self, tokens: np.ndarray, seq_len: int, partitions: int, val_fraction: float, seed: int) -> None:
        self.seq_len, self.vocab_size, self.description = seq_len, VOCAB_SIZE, "the embedded text"
        self.digest = hashlib.sha256(tokens.tobytes()).hexdigest()
        try:
            self._split = split(pack(tokens, seq_len), partitions, val_fraction, seed)
        except ValueError as exc:
            raise DataError(f"the embedded text: {exc}; lower data.seq_len or data.val_fraction") from None

    def partition(self, index: int) -> np.ndarray:
        return self._split.partitions[index]

    def validation(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._split.validation[:limit]
        return rows, rows


class Prepared(Corpus):
    """A folder written by `mpifed data prepare`: its manifest, and its splits memory-mapped. What the
    manifest says is checked against the data it describes: each split is there and as long as it says
    when opened, and every batch read has rows of seq_len ids below vocab_size (a pass over all of a
    large corpus at start-up would take minutes; a batch's check costs nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.kind: str = self.manifest["kind"]
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.partitions: int = len(self.manifest["partitions"])
        self.description = f"{self.kind} data {self.path} ({self.manifest.get('total_tokens', 0):,} tokens)"

    def split(self, name: str, sequences: int) -> "_CheckedSplit":
        """Split `name`, which the manifest says holds `sequences` rows."""
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.path / name)).with_format("numpy")
        except (OSError, ValueError) as exc:  # missing folder, damaged arrow files
            raise DataError(f"data.path {self.path}: {name} is missing or unreadable ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); prepare the data again") from None
        if not isinstance(ds, datasets.Dataset) or "input_ids" not in ds.column_names:
            raise DataError(f"data.path {self.path}: {name} has no input_ids column; prepare the data again")
        if len(ds) != sequences:
            raise DataError(f"data.path {self.path}: {name} holds {len(ds):,} sequences, manifest.json says "
                            f"{sequences:,}; prepare the data again")
        split = _CheckedSplit(ds, f"data.path {self.path}: {name}", self.seq_len, self.vocab_size)
        if len(ds):
            take(split, np.arange(1))  # the shape the manifest gives, before anything trains
        return split

    def partition(self, index: int) -> "_CheckedSplit":
        return self.split(f"partition_{index}", self.manifest["partitions"][index]["sequences"])

    def validation(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` validation rows as (ids, labels), in memory."""
        val = self.split("validation", self.manifest["validation"]["sequences"])
        batch = take(val, np.arange(min(limit, len(val))))
        return batch if isinstance(batch, tuple) else (batch, batch)


class _CheckedSplit:
    """A prepared split whose rows are checked as they are read: seq_len ids each, every id below
    vocab_size (one that is not would index past the model's embedding)."""

    def __init__(self, ds: "datasets.Dataset", where: str, seq_len: int, vocab_size: int) -> None:
        self.ds, self.where, self.seq_len, self.vocab_size = ds, where, seq_len, vocab_size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, rows: np.ndarray) -> dict:
        got = self.ds[rows]
        for column in ("input_ids", "labels") if "labels" in got else ("input_ids",):
            values = np.asarray(got[column])
            if values.ndim != 2 or values.shape[1] != self.seq_len:
                raise DataError(f"{self.where}: its rows hold {values.shape[-1] if values.ndim == 2 else 'ragged'} "
                                f"{column}, manifest.json says seq_len {self.seq_len}; prepare the data again")
            bad = (values >= self.vocab_size) | (values < 0)
            if column == "labels":
                bad &= values != -100  # what is not learned
            if bad.any():
                row = int(np.asarray(rows).reshape(-1)[np.argwhere(bad)[0][0]])
                raise DataError(f"{self.where}: row {row} holds {column} {int(values[bad][0])}, outside the vocabulary "
                                f"of {self.vocab_size} that manifest.json gives; prepare the data again with the "
                                "model's tokenizer")
        return got


def read_manifest(path: Path) -> dict:
    """DIR/manifest.json of a prepared folder, checked; errors name the folder and what to do."""
    if not path.is_dir():
        raise DataError(f"data.path {path}: no such folder; make one with `mpifed data prepare INPUT... --out {path}`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except OSError:
        raise DataError(f"data.path {path}: not a prepared dataset (no manifest.json); make one with "
                        "`mpifed data prepare`") from None
    except ValueError as exc:
        raise DataError(f"data.path {path}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"data.path {path}: manifest.json is not a JSON object; prepare the data again")
    missing = [key for key in ("kind", "seq_len", "vocab_size", "partitions", "validation") if key not in manifest]
    if missing:
        raise DataError(f"data.path {path}: manifest.json lacks {', '.join(missing)}; prepare the data again")
    wrong = [f"{key} must be a positive integer" for key in ("seq_len", "vocab_size") if not _count(manifest[key], 1)]
    parts = manifest["partitions"]
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) and _count(p.get("sequences"))
                                                           for p in parts):
        wrong.append("partitions must list each partition with its number of sequences")
    if not isinstance(manifest["validation"], dict) or not _count(manifest["validation"].get("sequences")):
        wrong.append("validation must give its number of sequences")
    if wrong:
        raise DataError(f"data.path {path}: manifest.json: {'; '.join(wrong)}; prepare the data again")
    return manifest


def _count(value: object, least: int = 0) -> bool:
    """Whether a manifest value is a whole number of at least `least` (JSON true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def shape(cfg: DataConfig) -> tuple[int, int]:
    """(sequence length, vocabulary size) of the corpus `cfg` names, without loading it."""
    if not cfg.path:
        return cfg.seq_len, VOCAB_SIZE
    manifest = read_manifest(Path(cfg.path))
    return manifest["seq_len"], manifest["vocab_size"]


EMBEDDED_LIMIT = 256 << 20
"""The most bytes of embedded text a rank accepts from the one that built it (it is about 2 MB)."""


def open_corpus(cfg: DataConfig, partitions: int, seed: int, builds: bool,
                share: Callable[[np.ndarray | None], np.ndarray]) -> Corpus:
    """The corpus of a run. The embedded text is built (or read from cache) by the one rank that
    `builds` and handed to every rank by `share` (called on every rank with the tokens there, None
    elsewhere; the caller knows the links), so that all facilities split exactly the same text."""
    if cfg.path:
        return Prepared(cfg.path)
    tokens = share(stdlib_tokens() if builds else None)
    return Embedded(tokens, cfg.seq_len, partitions, cfg.val_fraction, seed)
