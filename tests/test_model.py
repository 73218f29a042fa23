"""Model presets and the flat layout over them."""
import numpy as np
import pytest

from mpifed.data.corpus import VOCAB_SIZE
from mpifed.layout import FlatLayout
from mpifed.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("llama-tiny", 64, seed=0, vocab_size=VOCAB_SIZE)


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
    same = FlatLayout.of(build_model("llama-tiny", 64, seed=1, vocab_size=VOCAB_SIZE))
    other = FlatLayout.of(build_model("llama-small", 64, seed=0, vocab_size=VOCAB_SIZE))
    assert FlatLayout.of(model).fingerprint == same.fingerprint != other.fingerprint


def test_same_seed_same_weights():
    a, b = build_model("llama-tiny", 64, 3, vocab_size=VOCAB_SIZE), build_model("llama-tiny", 64, 3, vocab_size=VOCAB_SIZE)
    assert all(np.array_equal(x.detach(), y.detach()) for x, y in zip(a.parameters(), b.parameters()))


def test_a_local_model_folder_loads_offline_and_reinit_starts_afresh(tmp_path):
    from mpifed.config import ModelConfig

    saved = build_model("mixtral-tiny", 64, seed=5, vocab_size=VOCAB_SIZE)
    saved.save_pretrained(tmp_path / "m")
    loaded = build_model(ModelConfig(path=str(tmp_path / "m")), 64, seed=0, vocab_size=VOCAB_SIZE)
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert all(np.array_equal(a.detach(), b.detach()) for a, b in zip(saved.parameters(), loaded.parameters()))
    fresh = build_model(ModelConfig(path=str(tmp_path / "m"), reinit=True), 64, seed=0, vocab_size=VOCAB_SIZE)
    assert FlatLayout.of(fresh).fingerprint == FlatLayout.of(saved).fingerprint
    assert not np.array_equal(fresh.lm_head.weight.detach(), saved.lm_head.weight.detach())


def test_inner_learning_rate_schedule():
    from mpifed.config import TrainConfig
    from mpifed.run.schedule import inner_lr

    cosine = TrainConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=4)
    assert [inner_lr(cosine, s, 100) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert inner_lr(cosine, 4, 100) == pytest.approx(1e-3)
    assert inner_lr(cosine, 99, 100) == pytest.approx(1e-4)
    assert inner_lr(cosine, 4 + 95 // 2, 100) == pytest.approx(5.5e-4, rel=0.02)  # half way: the mean
    constant = TrainConfig(lr=1e-3, scale_lr=True)
    assert inner_lr(constant, 0, 10, ranks=4) == pytest.approx(4e-3) == inner_lr(constant, 9, 10, ranks=4)
