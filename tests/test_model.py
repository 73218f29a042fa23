"""Model presets, the flat layout over them, and the HDF5 checkpoint written from that layout."""
import json

import h5py
import numpy as np
import pytest

from mpifed import checkpoint
from mpifed.engines.base import FlatLayout
from mpifed.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("llama-tiny", 64, seed=0)


def test_layout_covers_every_parameter(model):
    layout = FlatLayout.of(model)
    params = dict(model.named_parameters())
    assert [s.name for s in layout.slots] == list(params)
    assert layout.numel == sum(p.numel() for p in params.values())
    assert 0.05e6 < layout.numel < 0.2e6  # "tiny" stays tiny
    flat = np.arange(layout.numel, dtype=np.float32)
    views = layout.unflatten(flat)
    for slot in layout.slots:
        assert views[slot.name].shape == tuple(params[slot.name].shape)
        assert views[slot.name].reshape(-1)[0] == slot.offset
    assert np.shares_memory(views["lm_head.weight"], flat)


def test_fingerprint_tells_architectures_apart(model):
    same = FlatLayout.of(build_model("llama-tiny", 64, seed=1))
    other = FlatLayout.of(build_model("llama-small", 64, seed=0))
    assert FlatLayout.of(model).fingerprint == same.fingerprint != other.fingerprint


def test_same_seed_same_weights():
    a, b = build_model("llama-tiny", 64, 3), build_model("llama-tiny", 64, 3)
    assert all(np.array_equal(x.detach(), y.detach()) for x, y in zip(a.parameters(), b.parameters()))


def test_checkpoint_round_trip(tmp_path, model):
    layout = FlatLayout.of(model)
    flat = np.random.default_rng(0).standard_normal(layout.numel).astype(np.float32)
    facilities = [{"name": "a", "ranks": 2}]
    for round_ in (1, 2, 3):
        path = checkpoint.write(tmp_path, round_, 1000 * round_, layout, flat + round_, "{}", facilities)
    assert path.name == "round_00003.h5" and (tmp_path / "latest").read_text().strip() == path.name
    assert not list(tmp_path.glob(".*tmp"))  # temporaries are renamed away
    attrs, params = checkpoint.read(path)
    assert attrs["round"] == 3 and attrs["tokens"] == 3000 and attrs["layout_fingerprint"] == layout.fingerprint
    assert json.loads(attrs["facilities"]) == facilities
    for slot in layout.slots:
        np.testing.assert_array_equal(params[slot.name].reshape(-1), flat[slot.offset:slot.offset + slot.numel] + 3)
    with h5py.File(path) as h5:  # plain h5py sees one dataset per parameter
        assert set(h5["model"]) == {s.name for s in layout.slots}
        assert h5["model/lm_head.weight"].dtype == np.float32
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.files(tmp_path)] == ["round_00002.h5", "round_00003.h5"]
