"""Writing HDF5 files that are whole or absent, with a hash on every array: datasets laid out so their
bytes go to their place in the file with pwrite (hashed meanwhile on another thread), a hidden temporary
file fsynced and renamed (`Atomic`), and `PartWriter` for flat arrays that arrive in pieces. What the
files hold and how they are read and verified is mpifed/checkpoint/format.py's.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import xxhash

HASH = "xxh3_128"
"""The attribute every stored array carries: the xxh3-128 digest of its bytes."""


DIGEST = "content_xxh3_128"
"""The root attribute every file carries: `content_digest` of the file when it was written."""


def _plain(value: Any) -> Any:
    """An attribute's value as JSON can say it, its kind kept (an int is not the string of its digits)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return [value.dtype.str, value.tolist() if value.dtype.kind in "biuf" else bytes(value).hex()]
    return value if isinstance(value, (str, int, float)) else [type(value).__name__, repr(value)]


def _mapping(ds: h5py.Dataset) -> list:
    """What a virtual dataset reads: each source file, dataset and the two selections' bounds."""
    if not ds.is_virtual:
        return []
    return [[m.file_name, m.dset_name, m.vspace.get_select_bounds(), m.src_space.get_select_bounds(),
             m.vspace.get_select_npoints()] for m in ds.virtual_sources()]


def content_digest(h5: h5py.File) -> str:
    """The xxh3-128 of everything in a file that decides what a reader loads, except the array bytes,
    which each array's own HASH ties: every root attribute but DIGEST, and each dataset's name, shape,
    type, HASH and (if virtual) what it maps. With DIGEST written last, a round, a token count, a
    configuration or a mapping changed after writing is seen, not loaded."""
    datasets: list[list] = []
    h5.visititems(lambda name, obj: datasets.append(
        [name, list(obj.shape), obj.dtype.str, _plain(obj.attrs.get(HASH, "")), _mapping(obj)])
        if isinstance(obj, h5py.Dataset) else None)
    attrs = [[key, _plain(h5.attrs[key])] for key in sorted(h5.attrs) if key != DIGEST]
    return xxhash.xxh3_128_hexdigest(json.dumps([attrs, sorted(datasets)], default=str).encode())


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file and dataset."""


class WriteFailed(CheckpointError):
    """A checkpoint file could not be written (disk full, quota, a read-only or immutable folder): one
    line naming the folder, the bytes needed and the bytes free. Its temporary file is gone; the files
    published before are untouched."""


def array_hash(values: np.ndarray) -> str:
    """The hex xxh3-128 of an array's bytes (what its HASH attribute holds)."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(values).view(np.uint8))


def _contiguous(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.h5d.DatasetID:
    """A contiguous dataset, allocated when created and never filled: its bytes can be pwritten in place."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(dtype), h5py.h5s.create_simple(shape),
                           dcpl=dcpl)


def store(group: h5py.Group, name: str, values: np.ndarray, fletcher32: bool, stored: list) -> None:
    """Create one dataset for `values`; `write_file` writes the bytes and adds the hash.

    Plain datasets are contiguous, allocated when created and never filled, so their bytes can go
    straight to their place in the file with one pwrite (HDF5's own write path is slower here). With
    fletcher32 HDF5 must checksum every chunk, so it writes those itself."""
    values = np.ascontiguousarray(values)
    if fletcher32 and values.size:
        ds = group.create_dataset(name, data=values, chunks=True, fletcher32=True)
        stored.append((ds.name, values, None))
        return
    dsid = _contiguous(group, name, values.shape, values.dtype)
    stored.append((h5py.Dataset(dsid).name, values, dsid.get_offset() if values.size else None))


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(path: Path, stored: list) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for _, values, offset in stored:
            if offset is None:
                continue
            data = memoryview(values.reshape(-1)).cast("B")
            while data:  # one pwrite moves at most ~2 GiB
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def write_file(final: Path, fill: Callable[[h5py.File, list], None]) -> "Atomic":
    """Create `final`'s temporary file: `fill(h5, stored)` lays out the datasets, their bytes are
    written while another thread hashes them (both without the GIL), then the hashes are added, and last
    the file's `content_digest`."""
    out = Atomic(final)
    stored: list[tuple[str, np.ndarray, int | None]] = []
    with out.guard(lambda: sum(v.nbytes for _, v, _ in stored)):
        with h5py.File(out.tmp, "w") as h5:
            fill(h5, stored)
        digests: list[str] = []
        failed: list[BaseException] = []

        def hash_all() -> None:
            try:
                digests.extend(array_hash(v) for _, v, _ in stored)
            except BaseException as exc:  # noqa: BLE001 - raised below, in the writing thread
                failed.append(exc)

        hashing = threading.Thread(target=hash_all)
        hashing.start()
        try:
            pwrite_all(out.tmp, stored)
        finally:
            hashing.join()
        if failed:  # a file without its hashes must not be committed
            raise failed[0]
        with h5py.File(out.tmp, "r+") as h5:
            for (name, _, _), digest in zip(stored, digests):
                h5[name].attrs[HASH] = digest
            h5.attrs[DIGEST] = content_digest(h5)
    return out


class Atomic:
    """Write `final` through a hidden temporary file: fsynced and renamed by `commit` (an fsync of data
    already flushed costs nothing). A failure on the way removes the temporary file (`guard`)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")

    def discard(self) -> None:
        """Remove the temporary file (nothing of it is published)."""
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # a folder that refuses the removal too: the one line already says why
            pass

    @contextmanager
    def guard(self, needed: Callable[[], int] = lambda: 0) -> Iterator[None]:
        """Writing the temporary file: on any failure it is removed, and an OSError (h5py raises those
        too) becomes a `WriteFailed` line; `needed()` is the file's size, as far as it is known."""
        try:
            yield
        except OSError as exc:
            self.discard()
            raise WriteFailed(self._why(exc, needed())) from None
        except BaseException:
            self.discard()
            raise

    def _why(self, exc: OSError, needed: int) -> str:
        folder = self.final.parent
        # h5py's messages span lines and repeat HDF5's internals: the errno's text says it all
        cause = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes are free"
        except OSError:
            free = "its free space cannot be read"
        size = f"the file needs about {needed:,} bytes, " if needed else ""
        return (f"checkpoint.dir {folder}: cannot write {self.final.name} ({cause}); {size}{free}; the "
                "checkpoints already published are kept: make room (checkpoint.keep bounds the rounds kept) "
                "and continue with --resume auto")

    def commit(self) -> Path:
        with self.guard():
            fsync(self.tmp)
            os.replace(self.tmp, self.final)
        fsync(self.final.parent)
        return self.final


class PartWriter:
    """A facility part whose flat arrays (length-n fp32) arrive in pieces, each from its first value to
    its last, so that no writer holds more than a piece at a time; small arrays come whole. The datasets
    are laid out first (contiguous, allocated, never filled, as `store` does), every piece goes to its
    place with pwrite while its array's hash advances, and `close` adds the hashes. With fletcher32 the
    flat arrays are chunked and HDF5 writes (and checksums) each piece itself."""

    def __init__(self, final: Path, attrs: dict[str, Any], small: dict[str, np.ndarray], flat: dict[str, int],
                 fletcher32: bool = False) -> None:
        self.out = Atomic(final)
        self.fletcher32, self.sizes = fletcher32, dict(flat)
        self.hashes = {key: xxhash.xxh3_128() for key in flat}
        self.next = dict.fromkeys(flat, 0)
        self.offsets: dict[str, int] = {}
        self.needed = sum(v.nbytes for v in small.values()) + 4 * sum(flat.values())
        self._fd, self._h5 = -1, None
        stored: list = []
        with self._guard():
            with h5py.File(self.out.tmp, "w") as h5:
                h5.attrs.update(attrs)
                for key, values in small.items():
                    store(self._group(h5, key), os.path.basename(key), values, fletcher32, stored)
                for key, n in flat.items():
                    group = self._group(h5, key)
                    if fletcher32 and n:
                        group.create_dataset(os.path.basename(key), shape=(n,), dtype=np.float32, chunks=True,
                                             fletcher32=True)
                    else:
                        self.offsets[key] = _contiguous(group, os.path.basename(key), (n,), np.dtype(np.float32)).get_offset() if n else -1
            pwrite_all(self.out.tmp, [entry for entry in stored if entry[2] is not None])
            self.small = [(name_, array_hash(values)) for name_, values, _ in stored]
            self._fd = os.open(self.out.tmp, os.O_WRONLY)
            self._h5 = h5py.File(self.out.tmp, "r+") if fletcher32 else None

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """The file's guard (`Atomic.guard`), closing what this writer holds open first on a failure."""
        with self.out.guard(lambda: self.needed):
            try:
                yield
            except BaseException:
                self._release()
                raise

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._h5 is not None:
            try:
                self._h5.close()
            except OSError:  # the failure being reported is the one that matters
                pass
            self._h5 = None

    @staticmethod
    def _group(h5: h5py.File, key: str) -> h5py.Group:
        return h5.require_group(os.path.dirname(key) or "/")

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        """The piece [start, start + len(values)) of flat array `key`: the next one, in order."""
        if start != self.next[key]:
            raise ValueError(f"{key}: piece at {start}, expected {self.next[key]} (pieces come in order)")
        values = np.ascontiguousarray(values, np.float32)
        self.hashes[key].update(memoryview(values).cast("B"))
        with self._guard():
            if self._h5 is not None:
                self._h5[key][start:start + len(values)] = values
            else:
                data, at = memoryview(values).cast("B"), self.offsets[key] + 4 * start
                while data:
                    written = os.pwrite(self._fd, data, at)
                    data, at = data[written:], at + written
        self.next[key] = start + len(values)

    def close(self) -> "Atomic":
        """Every flat array complete: add the hashes and the content digest; the file is left under its temporary name."""
        short = [key for key in self.sizes if self.next[key] != self.sizes[key]]
        if short:
            raise ValueError(f"{self.out.final}: {', '.join(short)} not written to the end")
        with self._guard():
            os.close(self._fd)
            self._fd = -1
            h5, self._h5 = self._h5 or h5py.File(self.out.tmp, "r+"), None
            with h5:
                for name, digest in self.small:
                    h5[name].attrs[HASH] = digest
                for key, hasher in self.hashes.items():
                    h5[key].attrs[HASH] = hasher.hexdigest()
                h5.attrs[DIGEST] = content_digest(h5)
        return self.out
