"""Codecs of the cross-facility hop: sizes and error bounds as documented in compress.py, the same bytes
and values whatever the number of threads or where a chunk ends, and from the fused C kernels as from
the torch path, and error feedback making the mean of 20 rounds of transmitted updates match the
uncompressed mean."""
import numpy as np
import pytest

from mpifed.federation import compress, kernels
from mpifed.federation.compress import CODECS, decode, encode, make_codec

LOSSY = [name for name, codec in CODECS.items() if codec is not None]


@pytest.fixture
def x():
    """Magnitudes over eight orders, a length that ends mid-block and spans several chunks."""
    rng = np.random.default_rng(0)
    n = 3 * compress.CHUNK_VALUES + 1001
    return (rng.standard_normal(n) * np.exp(rng.uniform(-6, 2, n))).astype(np.float32)


def _block_max(x: np.ndarray, block: int) -> np.ndarray:
    """max |x| of each value's block, per value (an independent blocking, with numpy's padding)."""
    blocks = -(-len(x) // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:len(x)] = np.abs(x)
    return np.repeat(padded.reshape(blocks, block).max(axis=1), block)[:len(x)]


@pytest.mark.parametrize("name, bytes_per_value", [("bf16", 2), ("int8", 1 + 4 / 256), ("int4", 0.5 + 4 / 128),
                                                   ("int2", 0.25 + 4 / 128), ("topk", 8 / 64)])
def test_payload_size(x, name, bytes_per_value):
    codec = make_codec(name)
    payload = encode(codec, x)
    assert payload.nbytes == codec.payload_bytes(len(x)) == pytest.approx(bytes_per_value * len(x), abs=codec.block_bytes)


@pytest.mark.parametrize("name, bound", [("int8", 1 / 254), ("int4", 1 / 14), ("int2", 1 / 3)])
def test_uniform_codecs_error_bound(x, name, bound):
    codec = make_codec(name)
    back = decode(codec, encode(codec, x), len(x))
    assert np.all(np.abs(back - x) <= _block_max(x, codec.block) * bound * (1 + 1e-5))
    # the bound is reached (it is the bound, not a loose one) and zero blocks stay zero
    assert np.max(np.abs(back - x) / _block_max(x, codec.block)) > 0.9 * bound
    assert np.array_equal(decode(codec, encode(codec, np.zeros(5, np.float32)), 5), np.zeros(5))


def test_bf16_error_and_rounding(x):
    codec = make_codec("bf16")
    back = decode(codec, encode(codec, x), len(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)
    exact = np.array([1.0, -2.5, 0.0, 3.0e-5], np.float32)
    exact = decode(codec, encode(codec, exact), 4)
    assert np.array_equal(decode(codec, encode(codec, exact), 4), exact)
    tie = np.array([1 + 2 ** -8], np.float32)  # halfway between 1 and 1 + 2^-7: even mantissa is 1.0
    assert decode(codec, encode(codec, tie), 1)[0] == 1.0


@pytest.mark.parametrize("fraction, k", [(1 / 32, 2), (0.03, 2), (0.25, 16), (1.0, 64)])
def test_topk_keeps_the_largest_of_each_block(x, fraction, k):
    codec = make_codec("topk", fraction)
    assert codec.k == k
    back = decode(codec, encode(codec, x), len(x))
    blocks = -(-len(x) // 64)
    padded, got = np.zeros(blocks * 64, np.float32), np.zeros(blocks * 64, np.float32)
    padded[:len(x)], got[:len(x)] = x, back
    padded, got = padded.reshape(blocks, 64), got.reshape(blocks, 64)
    kept = got != 0
    assert (kept.sum(axis=1) <= k).all() and (kept.sum(axis=1)[:-1] == k).all()  # x has no zeros
    # kept values within bf16 rounding; every dropped one no larger than the smallest kept of its block
    assert np.all(np.abs(got[kept] - padded[kept]) <= np.abs(padded[kept]) * 2.0 ** -8)
    smallest_kept = np.where(kept, np.abs(padded), np.inf).min(axis=1)
    assert np.all(np.where(kept, 0, np.abs(padded)).max(axis=1) <= smallest_kept)


@pytest.mark.parametrize("name", LOSSY)
def test_threads_and_residual_give_the_same_bytes(x, name):
    codec = make_codec(name)
    one = encode(codec, x)
    residual = np.zeros_like(x)
    assert np.array_equal(encode(codec, x, residual, threads=3), one)
    back = decode(codec, one, len(x))
    assert np.array_equal(decode(codec, one, len(x), threads=3), back)
    np.testing.assert_allclose(residual, x - back, rtol=0, atol=1e-6 * np.abs(x).max())
    total = np.ones_like(x)  # decoding may add into a buffer
    assert np.array_equal(decode(codec, one, len(x), total, add=True), np.float32(1) + back)


@pytest.mark.parametrize("name", LOSSY)
def test_error_feedback_mean_of_twenty_rounds(x, name):
    x = x[:20_000]
    rng = np.random.default_rng(1)
    updates = [x * 1e-3 + rng.standard_normal(len(x)).astype(np.float32) * 1e-4 for _ in range(20)]
    truth = np.mean(np.array(updates, np.float64), axis=0)
    codec = make_codec(name)
    residual = np.zeros(len(x), np.float32)  # encode adds it to what it sends and keeps what was lost in it
    sent = np.mean([decode(codec, encode(codec, u, residual), len(x)).astype(np.float64) for u in updates], axis=0)
    plain = np.mean([decode(codec, encode(codec, u), len(x)).astype(np.float64) for u in updates], axis=0)
    error = np.linalg.norm(sent - truth) / np.linalg.norm(truth)
    # what is still owed after 20 rounds is one round's residual: the mean is off by 1/20 of it (up to
    # fp32 rounding in the 20 additions of the residual)
    np.testing.assert_allclose(sent, truth - residual / 20, rtol=0, atol=1e-6 * np.abs(truth).max())
    assert error < np.linalg.norm(plain - truth) / np.linalg.norm(truth)  # feedback is what does it


@pytest.mark.parametrize("name, fraction", [(name, 1 / 32) for name in LOSSY] + [("topk", 0.25), ("topk", 1.0)])
def test_the_c_kernels_give_the_torch_paths_bytes(x, name, fraction, monkeypatch):
    """Two implementations of each codec: payload, residual, decoded values and sums all equal."""
    assert kernels.library() is not None, "the C kernels did not build here (is there a C compiler?)"
    x = x.copy()
    x[5:70], x[300:340] = 0, x[300]  # a zero block, and ties for topk
    x[1024:1024 + 256] = np.float32(3e-39)  # a block of subnormal values (a scale too small to invert)
    codec = make_codec(name, fraction)
    rng = np.random.default_rng(2)
    start = (rng.standard_normal(len(x)) * 1e-3).astype(np.float32)

    def run(threads):
        residual = start.copy()
        payload = encode(codec, x, residual, threads=threads)
        return payload, residual, decode(codec, payload, len(x)), decode(codec, payload, len(x), start.copy(), add=True)

    fused = run(threads=2)
    monkeypatch.setattr(kernels, "library", lambda: None)
    torch_path = run(threads=1)
    for what, a, b in zip(["payload", "residual", "decoded", "sum"], fused, torch_path):
        assert np.array_equal(a, b), what
    assert not np.array_equal(fused[1], start)  # the residual did move


@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
@pytest.mark.parametrize("fused", [True, False])
def test_blocks_of_subnormal_values_stay_finite_and_are_kept_for_later(name, fused, monkeypatch):
    """A parity run of FedAvg with int8 and int4 between sites died at round 34 and 46 with every
    facility's update NaN: a block whose largest magnitude times 1/127 (1/7, 1/3) is subnormal had an
    infinite inverse scale, infinity times its zeros made NaN residuals, and the next round sent NaN.
    Such a block now carries nothing and the residual keeps it exactly; blocks of the smallest normal
    scale still carry theirs."""
    if fused:
        assert kernels.library() is not None, "the C kernels did not build here (is there a C compiler?)"
    else:
        monkeypatch.setattr(kernels, "library", lambda: None)
    codec = make_codec(name)
    tiny = np.finfo(np.float32).tiny
    block = codec.block
    x = np.zeros(4 * block, np.float32)
    x[:block // 2] = np.float32(3e-39)                                       # subnormal values
    x[block:block + 3] = [np.float32(tiny * 2), -np.float32(tiny), 0.0]      # normal max, subnormal scale
    x[2 * block:3 * block] = np.float32(tiny * 1e3) * np.linspace(-1, 1, block, dtype=np.float32)  # normal scale
    x[3 * block] = 1.0
    residual = np.zeros_like(x)
    payload = encode(codec, x, residual)
    decoded = decode(codec, payload, len(x))
    assert np.isfinite(decoded).all() and np.isfinite(residual).all()
    np.testing.assert_array_equal(decoded[:2 * block], 0)                    # nothing carried ...
    np.testing.assert_array_equal(residual[:2 * block], x[:2 * block])       # ... all of it kept
    assert np.abs(decoded[2 * block:3 * block]).max() > 0                    # a normal scale still sends
    for b in range(2, 4):  # what is sent plus what is kept, to fp32 rounding at the block's scale
        part = slice(b * block, (b + 1) * block)
        np.testing.assert_allclose(decoded[part] + residual[part], x[part], rtol=0, atol=1e-6 * np.abs(x[part]).max())
    again = encode(codec, np.zeros_like(x), residual)                        # the next round stays finite
    assert np.isfinite(decode(codec, again, len(x))).all() and np.isfinite(residual).all()


def test_without_a_compiler_the_codecs_run_on_the_torch_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPIFED_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        kernels.library()  # said once
        said = capsys.readouterr().err.splitlines()
        assert len(said) == 1 and "no-such-cc" in said[0] and "torch path" in said[0], said
        codec = make_codec("int4")
        values = np.linspace(-1, 1, 1000, dtype=np.float32)
        assert np.max(np.abs(decode(codec, encode(codec, values), 1000) - values)) <= 1 / 14 + 1e-6
    finally:
        kernels.library.cache_clear()
