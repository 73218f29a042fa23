"""Codecs of the cross-facility hop: sizes and error bounds as documented in compress.py, and error
feedback making the mean of 20 rounds of transmitted updates match the uncompressed mean."""
import numpy as np
import pytest

from mpifed.federation.compress import BF16, INT8_BLOCK, ErrorFeedback, Int8


@pytest.fixture
def x():
    rng = np.random.default_rng(0)
    return (rng.standard_normal(10_001) * np.exp(rng.uniform(-6, 2, 10_001))).astype(np.float32)


def test_bf16_size_and_error(x):
    payload = BF16.encode(x)
    assert payload.nbytes == BF16.payload_bytes(len(x)) == 2 * len(x)
    back = BF16.decode(payload, len(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)
    # exactly representable values survive, and ties round to even
    exact = np.array([1.0, -2.5, 0.0, 3.0e-5], np.float32)
    exact = BF16.decode(BF16.encode(exact), 4)
    assert np.array_equal(BF16.decode(BF16.encode(exact), 4), exact)
    tie = np.array([1 + 2 ** -8], np.float32)  # halfway between 1 and 1 + 2^-7: even mantissa is 1.0
    assert BF16.decode(BF16.encode(tie), 1)[0] == 1.0


def test_int8_size_and_error(x):
    payload = Int8.encode(x)
    assert payload.nbytes == Int8.payload_bytes(len(x)) == len(x) + 4 * -(-len(x) // INT8_BLOCK)
    assert payload.nbytes <= 0.26 * x.nbytes
    back = Int8.decode(payload, len(x))
    blocks = -(-len(x) // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, np.float32)
    padded[:len(x)] = np.abs(x)
    bound = np.repeat(padded.reshape(blocks, -1).max(axis=1) / 254, INT8_BLOCK)[:len(x)]
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-6))
    assert np.array_equal(Int8.decode(Int8.encode(np.zeros(5, np.float32)), 5), np.zeros(5))


def test_error_feedback_mean_of_twenty_rounds(x):
    rng = np.random.default_rng(1)
    updates = [x * 1e-3 + rng.standard_normal(len(x)).astype(np.float32) * 1e-4 for _ in range(20)]
    truth = np.mean(updates, axis=0)
    feedback = ErrorFeedback(Int8, len(x))
    sent = np.mean([Int8.decode(feedback.compress(u), len(x)) for u in updates], axis=0)
    plain = np.mean([Int8.decode(Int8.encode(u), len(x)) for u in updates], axis=0)
    error = np.linalg.norm(sent - truth) / np.linalg.norm(truth)
    assert error <= 1e-3
    assert error < np.linalg.norm(plain - truth) / np.linalg.norm(truth)  # feedback is what does it
