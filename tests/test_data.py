"""The embedded corpus and its partitions: real English text, deterministic, disjoint, resumable."""
import numpy as np
import pytest

from mpifed.data import corpus as data
from mpifed.data.sequences import pack


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    import os

    os.environ["MPIFED_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    built = data.stdlib_tokens()
    cached = data.stdlib_tokens()  # second call reads the cache
    assert np.array_equal(built, cached)
    return built


def test_corpus_is_real_english_text(tokens):
    text = tokens.tobytes().decode("utf-8")
    assert len(tokens) > 500_000  # help topics alone are ~450 kB
    assert tokens.max() < data.VOCAB_SIZE
    assert "Return the" in text and " the " in text and "operator" in text
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5


def test_pack_and_split_are_disjoint_and_complete(tokens):
    seqs = pack(tokens, 64)
    assert seqs.shape == (len(tokens) // 64, 64) and seqs.dtype == np.int64
    np.testing.assert_array_equal(seqs[1], tokens[64:128])
    s = data.split(seqs, 3, 0.05, seed=1)
    assert max(map(len, s.partitions)) - min(map(len, s.partitions)) <= 1  # equal, up to the remainder
    assert abs(len(s.validation) - 0.05 * len(seqs)) <= 1
    # identity of sequences: split row numbers, each row tagged with its index
    tagged = data.split(np.arange(len(seqs))[:, None], 3, 0.05, seed=1)
    parts = [set(p[:, 0].tolist()) for p in tagged.partitions]
    val = set(tagged.validation[:, 0].tolist())
    for i, p in enumerate(parts):
        assert not p & val and all(not p & q for q in parts[i + 1:])
    assert len(val) + sum(map(len, parts)) == len(set.union(val, *parts)) == len(seqs)  # every sequence, once
    np.testing.assert_array_equal(s.partitions[2], seqs[tagged.partitions[2][:, 0]])
    # the same seed gives the same split, another seed another
    assert np.array_equal(data.split(seqs, 3, 0.05, seed=1).validation, s.validation)
    assert not np.array_equal(data.split(seqs, 3, 0.05, seed=2).validation, s.validation)


def test_pack_rejects_too_little_text():
    with pytest.raises(ValueError, match="cannot fill one sequence"):
        pack(np.zeros(10, dtype=np.uint8), 64)


def test_sampler_strides_cycles_and_resumes():
    partition = np.arange(40).reshape(20, 2)
    a = data.Sampler(partition, rank=1, ranks=2, micro_batch=3, seed=(5, 0, 1))
    assert {int(r[0]) // 2 % 2 for r in partition[a.index]} == {1}  # rank 1 of 2 takes every other sequence
    epoch0 = [a.next_batch() for _ in range(3)]  # 9 of its 10 sequences
    seen = np.concatenate(epoch0)[:, 0]
    assert len(set(seen.tolist())) == 9
    nxt = a.next_batch()  # a tenth would overflow: a new epoch starts, reshuffled
    assert a.epoch == 1 and a.position == 3
    b = data.Sampler(partition, rank=1, ranks=2, micro_batch=3, seed=(5, 0, 1))
    for batch in epoch0:
        np.testing.assert_array_equal(b.next_batch(), batch)  # deterministic
    np.testing.assert_array_equal(b.next_batch(), nxt)
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        data.Sampler(partition, rank=0, ranks=8, micro_batch=4, seed=(0,))
