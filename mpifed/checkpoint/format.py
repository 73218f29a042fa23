"""The HDF5 checkpoint format: what each file of a round holds, verifying, choosing one to resume from,
and reading back (the atomic, hashed writing is mpifed/checkpoint/files.py's; which files a folder keeps,
mpifed/checkpoint/retention.py's). No MPI and no torch here (mpifed/checkpoint/manager.py decides who
writes what); no pickle anywhere.

Files of round N in the checkpoint folder:
  round_0000N.h5             main file, written last by the global root. Root attributes: format_version,
                             mpifed_version, round, tokens, model_config (JSON), layout (JSON),
                             layout_fingerprint, facilities (JSON), config (TOML), roots, parts (JSON:
                             the segment files and their content digests, the facility parts).
                             /model/<param> and /outer/<state>/<param>, one dataset each, in the
                             parameter's shape: plain datasets with one root, HDF5 virtual datasets over
                             the segment files with several.
  round_0000N.seg-R.h5       with R > 1 roots: segment r of the model (/model) and of the outer state
                             (/outer/<state>), flat fp32, written by root r of the first facility.
  round_0000N.fac-NAME.h5    facility NAME's state for an exact resume: inner optimizer, data position
                             and RNG of each rank, error-feedback residual; written by its leader into
                             its own site's folder. The main file records each part's content digest
                             (`part_digests`), learned over MPI: sites need not share a filesystem.
  latest                     the name of the newest main file that verified.
Every stored array carries an `xxh3_128` attribute: `verify` rereads and compares each one. Every file
carries `content_xxh3_128`, over its root attributes and its arrays' names, shapes, types, hashes and
virtual mappings: no metadata that decides what is loaded changes unseen (format_version 3). Every file is
written to a hidden temporary name, fsynced and renamed; the main file only after all its parts, and
`latest` only after the main file verified. `checkpoint.fletcher32 = true` adds HDF5's own checksum
filter (about 4x slower to write; measured in the README).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import h5py
import numpy as np
import xxhash

from mpifed import __version__
from mpifed.checkpoint.files import DIGEST, HASH, Atomic, CheckpointError, PartWriter, content_digest, store, write_file
from mpifed.checkpoint.structure import check_structure, hostile
from mpifed.layout import FlatLayout, ParamSlot

FORMAT_VERSION = 3
LATEST = "latest"
_MAIN = re.compile(r"^round_(\d{5,})\.h5$")
_READ = 1 << 24  # values of a flat array read at a time when verifying it

PartsCheck = Literal["all", "here", "none"]
"""Which facility parts `verify` checks: all (each must be in the folder), here (those in the folder;
the others are kept at their own sites), none (each facility checks its own, as a resume does)."""


class CheckpointRefused(CheckpointError):
    """The checkpoint a user named cannot be resumed from (bad input: the job exits 2)."""

    exit_code = 2


def main_name(round_: int) -> str:
    return f"round_{round_:05d}.h5"


def segment_name(round_: int, r: int) -> str:
    return f"round_{round_:05d}.seg-{r}.h5"


def facility_name(round_: int, name: str) -> str:
    return f"round_{round_:05d}.fac-{name}.h5"


def round_of(name: str) -> int | None:
    """The round a checkpoint file's name gives (None: not a round's file, e.g. round_x.h5 a user made)."""
    digits = name[6:].split(".")[0]
    return int(digits) if name.startswith("round_") and digits.isdigit() else None


def part_round(path: Path) -> int:
    """The round of a file `main_files`, `round_files` or `facility_parts` listed (its name is a round's)."""
    found = round_of(path.name)
    assert found is not None, path
    return found


def part_digest(path: Path) -> str:
    """The content digest of a part file (`files.content_digest`: its identity, round and facility,
    and every other attribute and array hash). It reads attributes only; `verify` ties each hash to the
    bytes."""
    with _open(path) as h5:
        return content_digest(h5)


def _check_digest(path: Path, h5: h5py.File) -> str:
    """The file's attributes and array hashes are the ones it was written with; returns its content
    digest (what a main file records of its segments and parts)."""
    found = content_digest(h5)
    if str(h5.attrs.get(DIGEST, "")) != found:
        raise CheckpointError(f"{path}: its attributes or array hashes changed after it was written (content "
                              "digest differs)")
    return found


def write_segment(directory: Path, round_: int, r: int, start: int, model: np.ndarray,
                  outer: dict[str, np.ndarray], fletcher32: bool = False) -> Path:
    """Segment r ([start, start + len(model)) of the flat model) and its outer state."""
    def fill(h5: h5py.File, stored: list) -> None:
        h5.attrs.update(format_version=FORMAT_VERSION, round=round_, segment=r, start=start, stop=start + len(model))
        store(h5, "model", model, fletcher32, stored)
        group = h5.create_group("outer")
        for name, values in outer.items():
            store(group, name, values, fletcher32, stored)

    return write_file(Path(directory) / segment_name(round_, r), fill).commit()


def part_writer(directory: Path, round_: int, name: str, attrs: dict[str, Any], small: dict[str, np.ndarray],
                flat: dict[str, int], fletcher32: bool = False) -> PartWriter:
    """The writer of facility `name`'s part of round `round_` (see `PartWriter`)."""
    return PartWriter(Path(directory) / facility_name(round_, name),
                      {"format_version": FORMAT_VERSION, "round": round_, "facility": name, **attrs}, small, flat,
                      fletcher32)


def read_range(path: Path, key: str, lo: int, hi: int) -> np.ndarray:
    """Values [lo, hi) of the flat array `key` of a part file."""
    with _open(path) as h5:
        return h5[key][lo:hi]


def _boxes(shape: tuple[int, ...], a: int, b: int) -> Iterator[tuple[tuple, int, int]]:
    """The C-order flat range [a, b) of an array of `shape` as rectangular boxes:
    (index into the array, flat start, element count)."""
    if a >= b:
        return
    if len(shape) <= 1:
        yield (slice(a, b),), a, b - a
        return
    inner = int(np.prod(shape[1:]))
    first = a // inner
    if first == (b - 1) // inner:  # inside one row: recurse into it
        for index, start, count in _boxes(shape[1:], a - first * inner, b - first * inner):
            yield (first, *index), first * inner + start, count
        return
    if a % inner:  # the tail of a partial first row
        yield from _boxes(shape, a, (first + 1) * inner)
        first += 1
    full_end = b // inner  # rows [first, full_end) are whole
    if full_end > first:
        yield (slice(first, full_end), *[slice(None)] * (len(shape) - 1)), first * inner, (full_end - first) * inner
    if b % inner:  # the head of a partial last row
        yield from _boxes(shape, full_end * inner, b)


def _virtual(group: h5py.Group, slot: ParamSlot, round_: int, segments: list[tuple[int, int]], dataset: str) -> None:
    """/group/<param> as a virtual dataset over the flat `dataset` of the segment files it spans."""
    layout = h5py.VirtualLayout(shape=slot.shape, dtype=np.float32)
    for r, (start, stop) in enumerate(segments):
        a, b = max(start, slot.offset), min(stop, slot.offset + slot.numel)
        if a < b:
            vsource = h5py.VirtualSource(segment_name(round_, r), dataset, shape=(stop - start,))
            for index, flat, count in _boxes(slot.shape, a - slot.offset, b - slot.offset):
                at = flat + slot.offset - start
                layout[index] = vsource[at:at + count]
    group.create_virtual_dataset(slot.name, layout, fillvalue=np.nan)


def write_main(directory: Path, round_: int, attrs: dict[str, Any], layout: FlatLayout,
               segments: list[tuple[int, int]], outer_names: list[str], facilities: list[str],
               model: np.ndarray | None = None, outer: dict[str, np.ndarray] | None = None,
               fletcher32: bool = False, part_digests: dict[str, str] | None = None) -> "Atomic":
    """The main file of a round, after all its parts were written: with one root `model`/`outer` are the
    whole flat arrays, with several the datasets are virtual over the segment files. The whole
    checkpoint is fsynced and reopened (every dataset and part present, in shape) and left under its
    temporary name: `publish` puts it in place. (Rereading every byte would cost a second pass over the
    model at each checkpoint; the hashes are checked in full by `verify`, on --resume and by
    `mpifed ckpt verify`.) `part_digests` (facility -> `part_digest`) ties each facility's part, which
    may live at another site, to this checkpoint."""
    directory = Path(directory)
    names = [segment_name(round_, r) for r in range(len(segments))] if len(segments) > 1 else []
    parts = {"segments": names, "segment_digests": [part_digest(directory / name) for name in names],
             "facilities": {name: facility_name(round_, name) for name in facilities}}

    def fill(h5: h5py.File, stored: list) -> None:
        h5.attrs.update(format_version=FORMAT_VERSION, mpifed_version=__version__, round=round_,
                        layout=layout_json(layout),
                        layout_fingerprint=layout.fingerprint, roots=len(segments), parts=json.dumps(parts),
                        outer_state=json.dumps(outer_names), part_digests=json.dumps(part_digests or {}),
                        **attrs)
        groups = {"model": h5.create_group("model")}
        groups.update({name: h5.create_group(f"outer/{name}") for name in outer_names})
        for slot in layout.slots:
            if len(segments) == 1:
                piece = slice(slot.offset, slot.offset + slot.numel)
                store(groups["model"], slot.name, model[piece].reshape(slot.shape), fletcher32, stored)
                for name in outer_names:
                    store(groups[name], slot.name, outer[name][piece].reshape(slot.shape), fletcher32, stored)
            else:
                _virtual(groups["model"], slot, round_, segments, "model")
                for name in outer_names:
                    _virtual(groups[name], slot, round_, segments, f"outer/{name}")

    out = write_file(directory / main_name(round_), fill)
    with out.guard():
        verify(out.tmp, parts_dir=directory, check_data=False, facilities="here")
    return out


def publish(pending: "Atomic") -> Path:
    """Rename a verified main file into place, then point `latest` at it."""
    final = pending.commit()
    pointer = Atomic(final.parent / LATEST)
    with pointer.guard(lambda: len(final.name) + 1):
        pointer.tmp.write_text(final.name + "\n")
    pointer.commit()
    return final


def _check_arrays(path: Path, h5: h5py.File) -> int:
    """Reread every stored (non-virtual) array and compare its hash; returns the bytes checked. Any
    array is read a slab at a time along its first axis (`structure.check_structure` bounds what it declares)."""
    checked = 0
    names: list[str] = []
    h5.visit(names.append)
    for name in names:
        obj = h5[name]
        if not isinstance(obj, h5py.Dataset) or obj.is_virtual:
            continue
        if HASH not in obj.attrs:
            raise CheckpointError(f"{path}: /{name}: no {HASH} attribute")
        hasher = xxhash.xxh3_128()
        row = max(1, obj.nbytes // max(1, obj.shape[0] if obj.ndim else 1))
        step = max(1, (4 * _READ) // row)
        try:  # a flat array in pieces: verifying holds no more of it than one
            for at in range(0, obj.shape[0], step) if obj.ndim else [None]:
                values = np.ascontiguousarray(obj[()] if at is None else obj[at:at + step])
                hasher.update(values.view(np.uint8))
                checked += values.nbytes
        except OSError as exc:  # fletcher32 or a truncated file
            raise CheckpointError(f"{path}: /{name}: cannot be read: {exc}") from None
        if hasher.hexdigest() != obj.attrs[HASH]:
            raise CheckpointError(f"{path}: /{name}: checksum mismatch (the data changed after it was written)")
    return checked


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or damaged?): {exc}") from None


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose structure (and, unless asked otherwise, every byte) was verified: what it holds,
    read from the main file's root attributes. Only `verify` makes one."""

    path: Path
    """The main file (round_NNNNN.h5)."""
    round: int
    """The round it was written after (1-based)."""
    tokens: int
    """Tokens trained by all facilities up to and including that round."""
    layout: FlatLayout
    """The flat layout of the exchanged parameters (adapters only, under LoRA)."""
    facilities: list[dict[str, Any]]
    """The [[facility]] tables of the run that wrote it, in order (name, ranks, engine, ...)."""
    outer_state: list[str]
    """Names of the outer optimizer's state arrays stored under /outer."""
    roots: int
    """federation.roots of the run that wrote it (the number of segment files when > 1)."""
    model_config: str
    """The transformers model configuration, as JSON (what an export writes as config.json)."""
    config: str
    """The resolved run configuration, as TOML."""
    bytes: int
    """Bytes whose hashes `verify` reread and checked (0 when it checked the structure only)."""
    base_digest: str = ""
    """Under LoRA: sha256 of the frozen base model the adapters were trained on ("" otherwise)."""
    part_digests: dict[str, str] = field(default_factory=dict)
    """facility -> content digest of its part (empty in checkpoints written before sites could keep
    their parts apart)."""
    elsewhere: tuple[str, ...] = ()
    """Facilities whose parts were not checked: not in this folder (kept at their own sites), or not
    asked for."""


def layout_json(layout: FlatLayout) -> str:
    """A layout as the main file's `layout` attribute holds it: [name, shape, dtype, offset] per slot."""
    return json.dumps([[s.name, list(s.shape), s.dtype, s.offset] for s in layout.slots])


def layout_from_json(text: str) -> FlatLayout:
    """The layout `layout_json` wrote."""
    return FlatLayout(tuple(ParamSlot(n, tuple(shape), dtype, offset) for n, shape, dtype, offset in json.loads(text)))


def verify(path: str | Path, parts_dir: Path | None = None, check_data: bool = True,
           facilities: PartsCheck = "all") -> VerifiedCheckpoint:
    """Check a checkpoint (main file, segment files, and the facility parts `facilities` asks for):
    raises CheckpointError naming the first bad file or dataset, else returns its summary.
    check_data=False reads the structure only. Whatever a damaged or crafted file makes HDF5 or the
    parsing raise is a CheckpointError too: a file that cannot be read as written is a bad file."""
    with hostile(path):
        return _verify(Path(path), parts_dir, check_data, facilities)


def _verify(path: Path, parts_dir: Path | None, check_data: bool, facilities: PartsCheck) -> VerifiedCheckpoint:
    where = Path(parts_dir or path.parent)
    with _open(path) as h5:
        check_structure(path, h5, main=True)
        if h5.attrs.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {h5.attrs.get('format_version')!r} (mpifed "
                                  f"{h5.attrs.get('mpifed_version', '?')}), this mpifed reads {FORMAT_VERSION}: "
                                  "resume it with the mpifed that wrote it")
        _check_digest(path, h5)
        try:
            layout = layout_from_json(h5.attrs["layout"])
            parts = json.loads(h5.attrs["parts"])
            outer_state = json.loads(h5.attrs["outer_state"])
            summary = VerifiedCheckpoint(path, int(h5.attrs["round"]), int(h5.attrs["tokens"]), layout,
                              json.loads(h5.attrs["facilities"]), outer_state, int(h5.attrs["roots"]),
                              str(h5.attrs["model_config"]), str(h5.attrs["config"]), 0,
                              str(h5.attrs.get("base_digest", "")), json.loads(h5.attrs.get("part_digests", "{}")))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: root attributes incomplete or malformed: {exc}") from None
        if layout.fingerprint != h5.attrs.get("layout_fingerprint"):
            raise CheckpointError(f"{path}: layout does not match its fingerprint")
        for group in ["model", *[f"outer/{n}" for n in outer_state]]:
            missing = [s.name for s in layout.slots if s.name not in h5.get(group, {})]
            if missing:
                raise CheckpointError(f"{path}: /{group}/{missing[0]}: missing")
            wrong = [s.name for s in layout.slots if h5[group][s.name].shape != s.shape
                     or h5[group][s.name].dtype != np.float32]
            if wrong:
                raise CheckpointError(f"{path}: /{group}/{wrong[0]}: wrong shape or type")
        checked = _check_arrays(path, h5) if check_data else 0
    if summary.roots > 1 and len(parts["segments"]) != summary.roots:
        raise CheckpointError(f"{path}: lists {len(parts['segments'])} segment files for {summary.roots} roots")
    if len(parts.get("segment_digests", [])) != len(parts["segments"]):
        raise CheckpointError(f"{path}: lists {len(parts['segments'])} segment files and "
                              f"{len(parts.get('segment_digests', []))} segment digests")
    for name, digest in zip(parts["segments"], parts["segment_digests"]):
        if not isinstance(name, str) or name not in {segment_name(summary.round, r) for r in range(summary.roots)}:
            raise CheckpointError(f"{path}: lists a segment file {name!r} that is not one of its round's")
        with _open(where / name) as part:
            check_structure(where / name, part)
            if _check_digest(where / name, part) != digest:
                raise CheckpointError(f"{where / name}: not the segment this checkpoint recorded (content digest "
                                      "differs: a segment of another run or round)")
            checked += _check_arrays(where / name, part) if check_data else 0
    elsewhere = []
    for facility, name in parts["facilities"].items():
        if facilities == "none" or (facilities == "here" and not (where / name).exists()):
            elsewhere.append(facility)
            continue
        checked += check_part(where / name, summary.part_digests.get(facility, ""), check_data, layout.numel)
    return VerifiedCheckpoint(**{**summary.__dict__, "bytes": checked, "elsewhere": tuple(elsewhere)})


def check_part(path: Path, digest: str = "", check_data: bool = True, numel: int = 0) -> int:
    """Check one facility part: every array against its hash (unless check_data is False), the whole
    against the `digest` its main file recorded ("": not recorded) and, given the model's `numel`, that
    every flat array covers all of it. Returns the bytes reread."""
    with hostile(path):
        return _check_part(path, digest, check_data, numel)


def _check_part(path: Path, digest: str, check_data: bool, numel: int) -> int:
    with _open(path) as part:
        check_structure(path, part)
        found = _check_digest(path, part)
        if numel:
            for key in read_part_names(part):
                if part[key].shape[0] != numel:
                    raise CheckpointError(f"{path}: /{key}: {part[key].shape[0]:,} values of the model's {numel:,} "
                                          "(the part is missing ranges: written by another run or damaged)")
        checked = _check_arrays(path, part) if check_data else 0
    if digest and found != digest:
        raise CheckpointError(f"{path}: not the part this checkpoint recorded (content digest differs: a part of "
                              "another run or round)")
    return checked


def main_files(directory: str | Path) -> list[Path]:
    """Main checkpoint files of `directory`, oldest round first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("round_*.h5") if (m := _MAIN.match(p.name))]
    return [p for _, p in sorted(found)]


def round_files(directory: str | Path) -> list[Path]:
    """Every checkpoint file of `directory`: main files, segments and facility parts."""
    return sorted(p for p in Path(directory).glob("round_*.h5") if round_of(p.name) is not None)


def candidates(target: str | Path) -> list[Path]:
    """The main files a resume from `target` may pick, newest first: the file itself, or a folder's."""
    target = Path(target)
    return [target] if target.is_file() or target.suffix == ".h5" else list(reversed(main_files(target)))


def parts_folder(target: str | Path) -> Path:
    """Where a site looks for its own part of a checkpoint `target` names (a file or a folder)."""
    target = Path(target)
    return target.parent if target.is_file() or target.suffix == ".h5" else target


def resolve(target: str | Path, report=print, facilities: PartsCheck = "all") -> VerifiedCheckpoint | None:
    """The checkpoint to resume from: a main file (must verify), or in a folder the newest that
    verifies, reporting each one skipped and why. None when the folder holds none."""
    found = candidates(target)
    if len(found) == 1 and found[0] == Path(target):
        return verify(found[0], facilities=facilities)
    for path in found:
        try:
            return verify(path, facilities=facilities)
        except CheckpointError as exc:
            report(f"mpifed: skipping checkpoint {path.name}: {exc}")
    return None


def read_flat(path: Path, layout: FlatLayout, group: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """[start, stop) of the flat vector stored per parameter under /group."""
    stop = layout.numel if stop is None else stop
    out = np.empty(stop - start, np.float32)
    with _open(path) as h5:
        for slot in layout.slots:
            a, b = max(start, slot.offset), min(stop, slot.offset + slot.numel)
            if a == slot.offset and b == slot.offset + slot.numel and slot.numel:  # whole: no extra copy
                h5[group][slot.name].read_direct(out[a - start:b - start].reshape(slot.shape))
            elif a < b:  # part of a parameter: read only its boxes, not the whole of it
                dataset = h5[group][slot.name]
                for index, flat, count in _boxes(slot.shape, a - slot.offset, b - slot.offset):
                    at = slot.offset + flat - start
                    out[at:at + count] = dataset[index].reshape(-1)
    return out


def _is_flat(key: str, obj: Any) -> bool:
    """A part's flat arrays (full-layout fp32 vectors) are its 1-D fp32 datasets but the step count."""
    return isinstance(obj, h5py.Dataset) and obj.ndim == 1 and obj.dtype == np.float32 and key != "optimizer/step"


def read_part_names(h5: h5py.File) -> list[str]:
    """The names of an open part's flat arrays."""
    flat: list[str] = []
    h5.visititems(lambda key, obj: flat.append(key) if _is_flat(key, obj) else None)
    return flat


def read_part(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A verified facility part: its small arrays, read whole, and the names of its flat arrays (read by
    range with `read_range`)."""
    small: dict[str, np.ndarray] = {}

    def sort(key: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not _is_flat(key, obj):
            small[key] = obj[()]

    with _open(path) as h5:
        h5.visititems(sort)
        return small, read_part_names(h5)


def facility_parts(directory: str | Path, name: str) -> list[Path]:
    """Facility `name`'s part files in `directory`, oldest round first."""
    found = [p for p in Path(directory).glob(f"round_*.fac-{name}.h5") if round_of(p.name) is not None]
    return sorted(found, key=part_round)
