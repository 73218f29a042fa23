"""Reading checkpoint files that may be damaged or crafted: what a file may contain before anything in
it is read (`check_structure`), and every failure to read one said as one CheckpointError line
(`hostile`). A crafted file could otherwise make a reader allocate terabytes, read zeros for a model
from a file that is not there, or end in a traceback. What a checkpoint holds, and verifying its hashes,
is mpifed/checkpoint/format.py's; a crash of HDF5 itself is mpifed/checkpoint/isolated.py's.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import h5py

from mpifed.checkpoint.files import CheckpointError

ATTRIBUTE_LIMIT = 16 << 20
"""The most bytes one attribute may hold (the run's configuration and the layout are the largest: a few
hundred kB for the largest models); a larger one is not a file mpifed wrote, and is never read."""


def check_structure(path: Path, h5: h5py.File, main: bool = False) -> None:
    """Accept only what the writer makes, before anything is allocated: plain links, attributes of
    bounded size, numeric datasets stored inside the file (contiguous or chunked) that store at least the
    bytes they declare, and, in a `main` file, virtual datasets only over the segment files its root
    attributes list (each verified in turn). A crafted file could otherwise make a reader allocate
    terabytes, or read zeros for a model from a file that is not there."""
    size = path.stat().st_size
    sources: frozenset[tuple[str, str]] = frozenset()

    def refuse(name: str, why: str) -> NoReturn:
        raise CheckpointError(f"{path}: /{name}: {why}: not a file mpifed wrote")

    def bounded(obj: h5py.HLObject, name: str) -> None:
        """Every attribute of `obj` (a group or a dataset, called `name`) within ATTRIBUTE_LIMIT."""
        for attr in obj.attrs:
            stored = h5py.h5a.open(obj.id, attr.encode()).get_storage_size()
            if stored > ATTRIBUTE_LIMIT:
                refuse(f"{name}@{attr}", f"an attribute of {stored:,} bytes (at most {ATTRIBUTE_LIMIT:,})")

    def walk(group: h5py.Group) -> None:
        nonlocal sources
        bounded(group, group.name.strip("/"))
        if main and group.name == "/":  # its attributes are bounded now: read which segments it lists
            sources = _segment_sources(h5)
        for key in group:
            link = group.get(key, getlink=True)
            name = f"{group.name.rstrip('/')}/{key}".lstrip("/")
            if not isinstance(link, h5py.HardLink):
                refuse(name, f"a {type(link).__name__}")
            obj = group[key]
            if isinstance(obj, h5py.Group):
                walk(obj)
                continue
            if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "biuf":
                refuse(name, f"of type {getattr(obj, 'dtype', type(obj).__name__)}")
            if obj.external:
                refuse(name, "stored in external files")
            bounded(obj, name)
            if obj.is_virtual:
                used = {(m.file_name, m.dset_name.lstrip("/")) for m in obj.virtual_sources()}
                if not used <= sources:
                    refuse(name, f"a virtual dataset over {sorted(used - sources)[0]}, not a segment this checkpoint lists")
                continue
            stored = obj.id.get_storage_size()
            if obj.nbytes and (stored < obj.nbytes or stored > size):
                refuse(name, f"declares {obj.nbytes:,} bytes, stores {stored:,} in a file of {size:,}")

    walk(h5)


def _segment_sources(h5: h5py.File) -> frozenset[tuple[str, str]]:
    """The (segment file, dataset) pairs the main file's virtual datasets may read: the segments its
    `parts` attribute lists (each verified in turn), their model and outer-state arrays."""
    try:
        parts = json.loads(h5.attrs["parts"]) if h5.attrs.get("parts") is not None else {}
        segments = [n for n in parts.get("segments", []) if isinstance(n, str)]
        outer = [n for n in json.loads(h5.attrs.get("outer_state", "[]")) if isinstance(n, str)]
    except (ValueError, AttributeError, TypeError):  # malformed: the root attributes' check names it
        return frozenset()
    return frozenset((seg, data) for seg in segments for data in ["model", *[f"outer/{n}" for n in outer]])


@contextmanager
def hostile(path: str | Path) -> Iterator[None]:
    """Reading a file that may be damaged or crafted: whatever HDF5 or the parsing raises means "do not
    use it", said in one line as a CheckpointError (never a traceback, never a fall-through)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile input: any failure to read it is the file's
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {first[:300]})") from None
