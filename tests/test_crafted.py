"""Damaged and crafted checkpoints (issue 32 item 2), property-based: valid checkpoints mutated at random
(bytes flipped, the file cut, root attributes replaced, datasets swapped for virtual, external, linked,
mistyped, reshaped or huge ones). `verify` never raises anything but CheckpointError, and whenever it
says a file is good, the model read from it is the model that was written, byte for byte; the resume
reads only what verify accepted. Derandomized: the same cases in every run."""
import json
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import mpifed

from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint import isolated
from mpifed.checkpoint.files import content_digest
from mpifed.checkpoint.format import CheckpointError
from mpifed.layout import FlatLayout, ParamSlot

SLOTS = (ParamSlot("embed.weight", (64, 32), "float32", 0), ParamSlot("layer.weight", (32, 32), "float32", 2048),
         ParamSlot("layer.bias", (32,), "float32", 3072), ParamSlot("head.weight", (16, 32), "float32", 3104))
LAYOUT = FlatLayout(SLOTS)
ATTRS = dict(tokens=99, facilities=json.dumps([{"name": "a", "ranks": 1, "engine": "replica"}]), config="",
             model_config="{}")
CASES = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEWER = settings(CASES, max_examples=200)  # each in a child process: 0.2 s apiece
CRASHING_FLIPS = [(1289, 238)]  # (offset, xor mask) in segment 0 below: HDF5 2.0.0 (h5py 3.16) segfaults reading it


def _model():
    return np.random.default_rng(7).standard_normal(LAYOUT.numel).astype(np.float32)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two valid checkpoints of round 3: one root (plain datasets), two roots (virtual over segments)."""
    out = {}
    model = _model()
    for roots in (1, 2):
        folder = tmp_path_factory.mktemp(f"roots{roots}")
        outer = {"m": model * 0.5}
        if roots == 1:
            pending = checkpoint.write_main(folder, 3, ATTRS, LAYOUT, [(0, LAYOUT.numel)], ["m"], [], model=model,
                                            outer=outer)
        else:
            segs = [(0, 2000), (2000, LAYOUT.numel)]
            for r, (a, b) in enumerate(segs):
                checkpoint.write_segment(folder, 3, r, a, model[a:b], {"m": outer["m"][a:b]})
            pending = checkpoint.write_main(folder, 3, ATTRS, LAYOUT, segs, ["m"], [])
        checkpoint.publish(pending)
        out[roots] = folder
    return out


def _fresh(pristine, roots, tmp_path):
    """A private copy of a pristine checkpoint folder (each case mutates its own)."""
    target = tmp_path / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine[roots], target)
    return target / "round_00003.h5", target


def _holds_the_model_or_is_refused(path, verify=checkpoint.verify):
    """The property: verify refuses it (CheckpointError, nothing else), or what it accepted reads back
    as exactly the model written."""
    try:
        verified = verify(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return False
    got = checkpoint.read_flat(verified.path, verified.layout, "model")
    assert verified.layout == LAYOUT and got.tobytes() == _model().tobytes()
    return True


@FEWER
@given(roots=st.sampled_from([1, 2]), which=st.sampled_from(["main", "seg-0", "seg-1"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_flipped_or_cut_bytes_never_pass_as_a_changed_model(pristine, tmp_path, roots, which, flips, cut):
    main, folder = _fresh(pristine, roots, tmp_path)
    target = main if roots == 1 or which == "main" else folder / f"round_00003.{which}.h5"
    data = bytearray(target.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if cut is not None:
        data = data[:int(cut * len(data))]
    target.write_bytes(bytes(data))
    # in a child process, as every resume and `mpifed ckpt` verifies: flipped bytes can crash HDF5 itself
    _holds_the_model_or_is_refused(main, isolated.verify)


def _with_huge_attribute(main):
    """Rebuild the main file (a root group that can hold attributes over 64 kB needs the newer object
    header) with a 20 MiB `facilities` attribute, over the bound."""
    rebuilt = main.with_name("rebuilt.h5")
    with h5py.File(main) as src, h5py.File(rebuilt, "w", libver="latest") as dst:
        for key in src:
            src.copy(src[key], dst, name=key)
        dst.attrs.update(dict(src.attrs))
        dst.attrs["facilities"] = np.zeros(20 << 20, np.uint8)
    rebuilt.replace(main)


def _mutate(h5, kind, name, folder):
    """One structural mutation of /model/NAME (or of the root attributes) in an open main file."""
    slot = next(s for s in SLOTS if s.name == name)
    path = f"model/{name}"
    if kind == "attribute":
        h5.attrs["parts"] = json.dumps({"segments": ["../elsewhere.h5"], "facilities": {}})
    elif kind == "huge-attribute":
        h5.attrs["facilities"] = "[]"  # replaced in a rebuilt file by `_with_huge_attribute`
    elif kind == "virtual-missing":
        del h5[path]
        layout = h5py.VirtualLayout(shape=slot.shape, dtype=np.float32)
        layout[...] = h5py.VirtualSource("missing.h5", "model", shape=slot.shape)
        h5["model"].create_virtual_dataset(name, layout, fillvalue=0)
    elif kind == "external-link":
        del h5[path]
        h5["model"][name] = h5py.ExternalLink("other.h5", "/x")
    elif kind == "soft-link":
        del h5[path]
        h5["model"][name] = h5py.SoftLink("/outer/m/" + name)
    elif kind == "external-storage":
        raw = folder / "raw.bin"
        raw.write_bytes(np.zeros(slot.numel, np.float32).tobytes())
        attrs = dict(h5[path].attrs)
        del h5[path]
        ds = h5["model"].create_dataset(name, shape=slot.shape, dtype=np.float32, external=[(str(raw), 0, 4 * slot.numel)])
        ds.attrs.update(attrs)
    elif kind == "reshaped":
        attrs = dict(h5[path].attrs)
        values = h5[path][()].reshape(-1, 1)  # the same values in another shape
        del h5[path]
        h5["model"].create_dataset(name, data=values).attrs.update(attrs)
    elif kind == "retyped":
        attrs = dict(h5[path].attrs)
        values = h5[path][()].astype(np.float64)
        del h5[path]
        h5["model"].create_dataset(name, data=values).attrs.update(attrs)
    elif kind == "huge-unallocated":
        del h5[path]
        h5["model"].create_dataset(name, shape=(10**6, 10**6), dtype=np.float32, chunks=(1, 1024))
    elif kind == "strings":
        del h5[path]
        h5["model"].create_dataset(name, data=np.array([b"x"] * 4))
    elif kind == "deleted":
        del h5[path]


KINDS = ["attribute", "huge-attribute", "virtual-missing", "external-link", "soft-link", "external-storage",
         "reshaped", "retyped", "huge-unallocated", "strings", "deleted"]


@CASES
@given(roots=st.sampled_from([1, 2]), kind=st.sampled_from(KINDS), name=st.sampled_from([s.name for s in SLOTS]))
def test_structural_mutations_are_refused_in_one_line(pristine, tmp_path, roots, kind, name):
    main, folder = _fresh(pristine, roots, tmp_path)
    with h5py.File(main, "r+") as h5:
        _mutate(h5, kind, name, folder)
    if kind == "huge-attribute":
        _with_huge_attribute(main)
    assert not _holds_the_model_or_is_refused(main), f"{kind} of {name} passed verify"


def test_a_file_that_crashes_hdf5_is_refused_and_the_caller_goes_on(pristine, tmp_path):
    """Bytes flipped in a segment file that make HDF5 itself crash (found by random flips: about one in
    300): the child verifying it dies, the caller gets one line and stays up; `ckpt verify` exits 1."""
    main, folder = _fresh(pristine, 2, tmp_path)
    segment = folder / "round_00003.seg-0.h5"
    data = bytearray(segment.read_bytes())
    for where, mask in CRASHING_FLIPS:
        data[where] ^= mask
    segment.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"round_00003.h5: reading it crashed HDF5 \(signal 11\)"):
        isolated.verify(main)
    result = mpifed("ckpt", "verify", str(main))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "crashed HDF5" in result.stderr


ROOT_ATTRIBUTES = ["format_version", "round", "tokens", "layout", "layout_fingerprint", "parts", "outer_state",
                   "roots", "facilities", "config", "model_config", "part_digests"]
VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=200),
                   st.binary(min_size=1, max_size=200), st.lists(st.integers(-5, 5), max_size=20).map(json.dumps),
                   st.dictionaries(st.text(max_size=10), st.lists(st.text(max_size=30), max_size=3),
                                   max_size=3).map(json.dumps))


@CASES
@given(roots=st.sampled_from([1, 2]), key=st.sampled_from(ROOT_ATTRIBUTES), value=VALUES, drop=st.booleans())
def test_replaced_root_attributes_never_pass_as_a_changed_model(pristine, tmp_path, roots, key, value, drop):
    main, _ = _fresh(pristine, roots, tmp_path)
    with h5py.File(main, "r+") as h5:
        before = content_digest(h5)
        if drop:
            del h5.attrs[key]
        else:
            h5.attrs[key] = np.void(value) if isinstance(value, bytes) else value
        changed = content_digest(h5) != before
    # any change of the metadata that decides what is loaded is refused, even one that reads as valid
    assert _holds_the_model_or_is_refused(main) != changed


@pytest.mark.parametrize("key,value", [("tokens", 100), ("round", 4), ("config", "[train]\nlr = 1.0\n"),
                                       ("facilities", json.dumps([{"name": "b", "ranks": 1, "engine": "replica"}])),
                                       ("mpifed_version", "9.9.9")])
def test_a_plausible_edit_of_the_metadata_is_refused(pristine, tmp_path, key, value):
    """Values a reader would take as valid (a later round, more tokens, another configuration): before
    the content digest, verify said ok and a resume would have started from them."""
    main, _ = _fresh(pristine, 1, tmp_path)
    with h5py.File(main, "r+") as h5:
        h5.attrs[key] = value
    with pytest.raises(CheckpointError, match=r"round_00003.h5: its attributes or array hashes changed after it "
                                              r"was written \(content digest differs\)$"):
        isolated.verify(main)


def test_a_segment_of_another_run_is_refused(pristine, tmp_path):
    """A whole, valid segment file of the same round of another run (its own hashes and digest right):
    the main file records each segment's content digest, so it is not read as this model's."""
    main, folder = _fresh(pristine, 2, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    model = -_model()
    checkpoint.write_segment(other, 3, 1, 2000, model[2000:], {"m": model[2000:] * 0.5})
    shutil.copy(other / "round_00003.seg-1.h5", folder / "round_00003.seg-1.h5")
    assert checkpoint.check_part(folder / "round_00003.seg-1.h5") > 0  # whole and valid on its own
    with pytest.raises(CheckpointError, match=r"seg-1.h5: not the segment this checkpoint recorded"):
        isolated.verify(main)


def test_the_issues_crafted_files_are_named_not_crashed_on(pristine, tmp_path):
    """The three files the issue made: a virtual dataset over a missing file (once said ok, and the
    resume trained from zeros), a 10^6 x 10^6 parameter (a MemoryError traceback), a 20 MiB attribute
    (verify used gigabytes and its refusal was one huge line)."""
    for kind, said in [("virtual-missing", "a virtual dataset over ('missing.h5', 'model')"),
                       ("huge-unallocated", "declares 4,000,000,000,000 bytes, stores 0"),
                       ("huge-attribute", "an attribute of 20,971,520 bytes")]:
        main, folder = _fresh(pristine, 1, tmp_path)
        with h5py.File(main, "r+") as h5:
            _mutate(h5, kind, "layer.weight", folder)
        if kind == "huge-attribute":
            _with_huge_attribute(main)
        with pytest.raises(CheckpointError) as refused:
            isolated.verify(main)
        assert said in str(refused.value) and len(str(refused.value)) < 400, str(refused.value)[:500]
        assert checkpoint.resolve(folder, report=lambda _: None) is None  # nothing else to fall back to here
