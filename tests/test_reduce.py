"""The federated rounds against an independent numpy computation of each outer optimizer (momentum and
Adam moments included), for equal and unequal facilities, R = 1 and R > 1, replicated and sharded
ownership; the guard; sampling; compression on the wire."""
import json

import numpy as np
import pytest

from conftest import mpiexec
from mpifed.federation.reduce import sampled, segments

NUMEL = 1003  # divisible by no facility size, R or chunk length


def oracle(sizes, rounds, outer="fedavg", lr=None, mu=None, beta2=0.99, tau=1e-3, skip=(), sample=1.0, warmup=0):
    """What the worker's rounds must produce, written from the published update rules."""
    lr = {"fedavg": 1.0, "fedavgm": 1.0, "diloco": 0.7, "fedadam": 0.01, "fedyogi": 0.01}[outer] if lr is None else lr
    mu = (0.0 if outer == "fedavg" else 0.9) if mu is None else mu
    theta = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32).astype(np.float64)
    m, v = np.zeros(NUMEL), np.zeros(NUMEL)
    for t in range(rounds):
        chosen = sampled(len(sizes), sample, 0, t + 1)
        fs = [f for f in range(len(sizes)) if f not in skip and chosen[f]]
        tokens = {f: sum((10 * (f + 1) + r) * (t + 1) for r in range(sizes[f])) for f in fs}
        deltas = {f: (0.01 * np.random.default_rng([f, t]).standard_normal(NUMEL).astype(np.float32)).astype(np.float64)
                  for f in fs}
        g = sum(tokens[f] * deltas[f] for f in fs) / sum(tokens.values())
        # warm-up: outer step t + 1 blends FedAvg's lr 1 and momentum 0 into the configured ones
        w = min(1.0, t / warmup) if warmup else 1.0
        step_lr, step_mu = 1.0 + (lr - 1.0) * w, mu * w
        if outer == "fedavg":
            theta = theta - lr * g
        elif outer == "fedavgm":
            m = step_mu * m + g
            theta = theta - step_lr * m
        elif outer == "diloco":
            m = step_mu * m + g
            theta = theta - step_lr * (g + step_mu * m)
        else:
            m = mu * m + (1 - mu) * g
            v = beta2 * v + (1 - beta2) * g * g if outer == "fedadam" else v - (1 - beta2) * g * g * np.sign(v - g * g)
            theta = theta - lr * m / (np.sqrt(v) + tau)
    return theta


def run(tmp_path, sizes, rounds=3, mode="replica", check=True, numel=NUMEL, **settings):
    args = [f"{k}={v}" for k, v in settings.items()]
    result = mpiexec(sum(sizes), "reduce_worker.py", ",".join(map(str, sizes)), str(tmp_path), mode, str(rounds),
                     str(numel), *args, check=check)
    if not check:
        return result
    held = [np.load(tmp_path / f"rank-{i}.npy") for i in range(sum(sizes))]
    reports = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(sum(sizes))]
    models = []
    for f in range(len(sizes)):  # assemble each facility's model from what its ranks hold
        model = np.full(numel, np.nan, np.float32)
        for h, rep in zip(held, reports):
            if rep["facility"] == f:
                model = np.where(np.isnan(h), model, h)
        assert not np.isnan(model).any()
        models.append(model)
    for model in models[1:]:
        assert model.tobytes() == models[0].tobytes()  # bit-identical in every facility
    for h in held:  # and on every rank, for what it holds
        assert np.array_equal(h[~np.isnan(h)], models[0][~np.isnan(h)])
    return models[0], reports


@pytest.mark.parametrize("sizes, roots, mode", [([2, 2], 1, "replica"), ([2, 2], 2, "replica"),
                                                ([1, 2, 3], 1, "replica"), ([3, 3], 3, "sharded"),
                                                ([2, 3, 2], 2, "sharded")])
@pytest.mark.parametrize("outer", ["fedavg", "fedavgm", "diloco", "fedadam", "fedyogi"])
def test_three_rounds_match_numpy(tmp_path, sizes, roots, mode, outer):
    model, reports = run(tmp_path, sizes, 3, mode, roots=roots, outer=outer)
    np.testing.assert_allclose(model, oracle(sizes, 3, outer), rtol=2e-5, atol=2e-6)
    for rep in reports:
        f = rep["facility"]
        assert rep["facility_tokens"] == [sum((10 * (f + 1) + r) * (t + 1) for r in range(sizes[f])) for t in range(3)]
    # every round, root r of each facility sends its fp32 segment but its own chunk (reduce-scatter),
    # then its chunk's sum to each of the others (all-gather): 2 (F - 1) / F of the model per facility
    f_count = len(sizes)
    per_round = [sum(rep["bytes_inter"][t] for rep in reports) for t in range(3)]
    assert per_round == [2 * (f_count - 1) * NUMEL * 4] * 3
    assert per_round == [sum(rep["bytes_received"][t] for rep in reports) for t in range(3)]
    most = max((length - chunk) + chunk * (f_count - 1) for a, b in segments(NUMEL, roots) for length in [b - a]
               for chunk in [c1 - c0 for c0, c1 in segments(length, f_count)])
    assert max(max(rep["bytes_inter"]) for rep in reports) == most * 4


def test_outer_hyperparameters_are_used(tmp_path):
    model, _ = run(tmp_path, [2, 2], 3, roots=2, outer="diloco", outer_lr=0.3, outer_momentum=0.5)
    np.testing.assert_allclose(model, oracle([2, 2], 3, "diloco", lr=0.3, mu=0.5), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("outer", ["fedavgm", "diloco"])
def test_outer_warmup_starts_from_fedavg(tmp_path, outer):
    """Over 4 rounds with a warm-up of 2: FedAvg, then halfway, then the full step, against numpy."""
    model, _ = run(tmp_path, [1, 2], 4, roots=1, outer=outer, outer_warmup=2)
    np.testing.assert_allclose(model, oracle([1, 2], 4, outer, warmup=2), rtol=2e-5, atol=2e-6)
    assert not np.allclose(oracle([1, 2], 4, outer, warmup=2), oracle([1, 2], 4, outer), rtol=1e-4)


@pytest.mark.parametrize("poison", ["1:nan", "1:big"])
def test_guard_leaves_out_a_bad_facility(tmp_path, poison):
    model, reports = run(tmp_path, [2, 1, 2], 2, roots=1, poison=poison)
    np.testing.assert_allclose(model, oracle([2, 1, 2], 2, skip={1}), rtol=2e-5, atol=2e-6)
    assert np.isfinite(model).all()
    reasons = [r for rep in reports for rnd in rep["left_out"] for r in rnd]
    assert reasons and all(r.startswith("fac1: ") for r in reasons)
    assert ("NaN" if poison.endswith("nan") else "max_norm_ratio") in reasons[0]


def test_sealed_links_change_no_byte_and_keep_nothing_between_blocking_exchanges(tmp_path):
    """The same rounds over sealed links (a subset without the refused facility, the result sent on to
    it, two roots, int8): the same bytes as over plain ones, and the links let go of their buffers."""
    models = {}
    for sealed in ("0", "1"):
        (tmp_path / sealed).mkdir()
        models[sealed], reports = run(tmp_path / sealed, [2, 2, 2], 2, "sharded", roots=2, compress="int8",
                                      poison="1:big", sealed=sealed)
        assert [rep["retained_bytes"] for rep in reports] == [0] * 6
        assert any(rnd for rep in reports for rnd in rep["left_out"])
    assert models["0"].tobytes() == models["1"].tobytes()


def test_too_few_participants_stops_the_job(tmp_path):
    result = run(tmp_path, [1, 1], 1, check=False, poison="0:nan", min_participants=2)
    assert result.returncode != 0
    assert "fewer than federation.min_participants = 2" in result.stderr and "fac0: its update has NaN" in result.stderr


def test_sampling_renormalises_over_participants(tmp_path):
    model, reports = run(tmp_path, [1, 2, 1], 3, sample=0.5)
    np.testing.assert_allclose(model, oracle([1, 2, 1], 3, sample=0.5), rtol=2e-5, atol=2e-6)
    assert any(not all(sampled(3, 0.5, 0, t)) for t in (1, 2, 3))  # somebody really sat out


def test_one_facility_moves_nothing_between_sites(tmp_path):
    model, reports = run(tmp_path, [3], 2, roots=2)
    np.testing.assert_allclose(model, oracle([3], 2), rtol=2e-5, atol=2e-6)
    assert [rep["bytes_inter"] for rep in reports] == [[0, 0]] * 3


def test_blocking_rounds_keep_no_copy_of_the_model_between_exchanges(tmp_path):
    """Blocking rounds take Δ against the roots' own segment of θ, so no rank keeps anchors, and a root
    lets go of an exchange's buffers once it is over: nothing of the exchange is held while training.
    With overlap the exchange runs during training, and what it needs is kept."""
    sizes = [2, 3]
    for overlap in ("none", "delayed"):
        (tmp_path / overlap).mkdir()
        model, reports = run(tmp_path / overlap, sizes, 3, "sharded", roots=2, overlap=overlap, compress="int8")
        retained = [rep["retained_bytes"] for rep in reports]
        if overlap == "none":
            assert retained == [0] * sum(sizes)
        else:  # every rank's anchors and what it posted: two copies of what it owns, at least
            assert all(r >= 2 * 4 * 300 for r in retained)  # each rank owns 333 values or more


@pytest.mark.parametrize("compress, ratio", [("bf16", 0.5), ("int8", 0.26), ("int4", 0.14), ("int2", 0.075),
                                             ("topk", 0.05)])
def test_compressed_exchange(tmp_path, compress, ratio):
    """With error feedback nothing is lost for good: after FedAvg's rounds the model differs from the
    exact one by exactly what the roots still hold in their residuals (both phases, every facility),
    and each residual is a codec error, so small."""
    sizes = [2, 3, 2]
    model, reports = run(tmp_path, sizes, 3, "sharded", roots=2, compress=compress, topk_fraction=0.03)
    exact = oracle(sizes, 3)
    start = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32)
    kept = sum(np.load(path).astype(np.float64) for path in tmp_path.glob("rank-*-exchange.npy"))
    assert len(list(tmp_path.glob("rank-*-exchange.npy"))) == len(sizes) * 2
    moved = np.abs(exact - start).max()
    assert np.abs(kept).max() > 1e-3 * moved  # the codec is lossy: there is something to carry
    np.testing.assert_allclose(model, exact + kept, rtol=0, atol=2e-5 * moved)
    fp32 = 2 * (len(sizes) - 1) * NUMEL * 4  # what the same exchange sends uncompressed
    assert sum(rep["bytes_inter"][0] for rep in reports) <= ratio * fp32


def test_compressed_traffic_per_root_does_not_grow_with_the_facilities(tmp_path):
    """A root receives about twice its payload whatever the number of facilities (an all-gather of the
    payloads would make it F - 1 payloads)."""
    from mpifed.federation.compress import make_codec

    numel = 100_003  # some hundred codec blocks to share out
    payload = make_codec("int8").payload_bytes(numel)
    received = {}
    for count in (2, 5):
        (tmp_path / str(count)).mkdir()
        _, reports = run(tmp_path / str(count), [1] * count, 1, numel=numel, compress="int8")
        received[count] = max(rep["bytes_received"][0] for rep in reports)
    assert received[2] <= 1.05 * payload  # half a payload in each phase
    assert received[5] <= 2 * (5 - 1) / 5 * payload * 1.05
    assert received[5] / received[2] <= 2 * (5 - 1) / 5 * 1.05


def streamed_oracle(sizes, rounds, steps, fragments, delayed, outer="fedavg", lr=None, mu=None, lag=0):
    """What `train=pull` rounds must produce, written from the rule in mpifed/federation/reduce.py: each
    fragment exchanged at its own step, blocking or folded in one sync point later (overlap), or `lag`
    steps after its post (overlap_steps). The schedule is computed here, not taken from mpifed."""
    lr = {"fedavg": 1.0, "diloco": 0.7}[outer] if lr is None else lr
    mu = (0.0 if outer == "fedavg" else 0.9) if mu is None else mu
    theta = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32).astype(np.float64)
    targets = [np.random.default_rng([f, 99]).standard_normal(NUMEL).astype(np.float32).astype(np.float64)
               for f in range(len(sizes))]
    per_step = [sum(10 * (f + 1) + r for r in range(size)) for f, size in enumerate(sizes)]
    local = [theta.copy() for _ in sizes]
    anchor = theta.copy()  # the global values of each fragment as of its last exchange
    posted = [np.zeros(NUMEL) for _ in sizes]
    since = [[0] * fragments for _ in sizes]  # tokens since each fragment was last exchanged
    momentum = np.zeros(NUMEL)
    parts = [slice(a, b) for a, b in segments(NUMEL, fragments)]
    at_step = {steps: 0, **{j * steps // fragments: j for j in range(1, fragments)}}

    def mean_update(j):
        weights = [since[f][j] for f in range(len(sizes))]
        update = sum(w * (anchor[parts[j]] - local[f][parts[j]]) for f, w in enumerate(weights)) / sum(weights)
        for f in range(len(sizes)):
            since[f][j] = 0
        return update

    def outer_step(j, update):
        part = parts[j]
        if outer == "fedavg":
            theta[part] -= lr * update
        else:  # diloco: Nesterov
            momentum[part] = mu * momentum[part] + update
            theta[part] -= lr * (update + mu * momentum[part])

    def exchange_now(j):
        outer_step(j, mean_update(j))
        for f in range(len(sizes)):
            local[f][parts[j]] = theta[parts[j]]
        anchor[parts[j]] = theta[parts[j]]

    def land(flight):  # the new global values minus what was learned since the post
        i, update = flight
        outer_step(i, update)
        for f in range(len(sizes)):
            learned = anchor[parts[i]] - posted[f][parts[i]] - local[f][parts[i]]
            local[f][parts[i]] = theta[parts[i]] - learned
            posted[f][parts[i]] = 0
        anchor[parts[i]] = theta[parts[i]]

    flight, age = None, 0  # the exchange in flight, and the inner steps since its post
    for t in range(rounds):
        for step in range(1, steps + 1):
            for f in range(len(sizes)):
                local[f] -= np.float32(0.02 * (f + 1)) * (local[f] - targets[f])
                since[f] = [s + per_step[f] for s in since[f]]
            age += 1
            if flight is not None and age == lag:
                land(flight)
                flight = None
            if step not in at_step:
                continue
            j = at_step[step]
            if not delayed:
                exchange_now(j)
                continue
            if flight is not None:
                land(flight)
                flight = None
            if not (t == rounds - 1 and step == steps):
                for f in range(len(sizes)):
                    posted[f][parts[j]] = anchor[parts[j]] - local[f][parts[j]]
                flight, age = (j, mean_update(j)), 0
    for j in (range(fragments) if delayed else range(1, fragments)):  # the flush at the end
        exchange_now(j)
    for f in range(len(sizes)):
        np.testing.assert_allclose(local[f], theta, rtol=0, atol=1e-12)
    return theta


@pytest.mark.parametrize("overlap, fragments, outer, mode, lag", [("none", 3, "diloco", "replica", 0),
                                                                  ("delayed", 1, "fedavg", "sharded", 0),
                                                                  ("delayed", 1, "diloco", "replica", 0),
                                                                  ("delayed", 3, "diloco", "sharded", 0),
                                                                  ("delayed", 1, "diloco", "sharded", 2),
                                                                  ("delayed", 3, "fedavg", "replica", 1)])
def test_streamed_rounds_match_numpy(tmp_path, overlap, fragments, outer, mode, lag):
    """Three facilities, 3 rounds of 6 inner steps that each pull a facility's model towards a target of
    its own at a rate of its own (so where a round starts from matters): fragments, overlap and both,
    and exchanges landing `lag` steps after their post (overlap_steps), against the rule."""
    sizes = [2, 1, 2]
    model, reports = run(tmp_path, sizes, 3, mode, roots=1, outer=outer, overlap=overlap, fragments=fragments,
                         train="pull", steps=6, overlap_steps=lag)
    expected = streamed_oracle(sizes, 3, 6, fragments, overlap == "delayed", outer, lag=lag)
    np.testing.assert_allclose(model, expected, rtol=1e-5, atol=1e-6)
    blocking = streamed_oracle(sizes, 3, 6, 1, False, outer)
    assert np.abs(expected - blocking).max() > 1e-3  # the schedule changes the result: the test can tell
    if lag:  # and where the exchange lands changes it too
        assert np.abs(expected - streamed_oracle(sizes, 3, 6, fragments, True, outer)).max() > 1e-3
    for rep in reports:  # every token is counted once, whatever the schedule
        assert sum(rep["facility_tokens"]) == 3 * 6 * sum(10 * (rep["facility"] + 1) + r
                                                         for r in range(sizes[rep["facility"]]))


def test_overlap_with_compression_and_two_roots_stays_bit_identical(tmp_path):
    """Delayed int4 exchanges of 2 fragments over 2 roots: every rank of every facility ends with the same
    bytes (run() checks), within the codec's reach of the exact rule."""
    sizes = [2, 2, 2]
    model, _ = run(tmp_path, sizes, 3, "replica", roots=2, overlap="delayed", fragments=2, compress="int4",
                   train="pull", steps=4)
    exact = streamed_oracle(sizes, 3, 4, 2, True)
    start = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32)
    assert np.linalg.norm(model - exact) <= 0.05 * np.linalg.norm(exact - start)


def test_segments_cover_exactly():
    for numel in (1, 7, 1003):
        for n in (1, 2, 3, 5):
            parts = segments(numel, n)
            assert parts[0][0] == 0 and parts[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
