"""Model presets and the flat layout over them."""
import numpy as np
import pytest

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
