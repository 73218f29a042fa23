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


def run(tmp_path, sizes, rounds=3, mode="replica", check=True, **settings):
    args = [f"{k}={v}" for k, v in settings.items()]
    result = mpiexec(sum(sizes), "reduce_worker.py", ",".join(map(str, sizes)), str(tmp_path), mode, str(rounds),
                     str(NUMEL), *args, check=check)
    if not check:
        return result
    held = [np.load(tmp_path / f"rank-{i}.npy") for i in range(sum(sizes))]
    reports = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(sum(sizes))]
    models = []
    for f in range(len(sizes)):  # assemble each facility's model from what its ranks hold
        model = np.full(NUMEL, np.nan, np.float32)
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
    # every round, each facility's roots hand over one fp32 copy of the model, in R segments
    per_round = [sum(rep["bytes_inter"][t] for rep in reports) for t in range(3)]
    assert per_round == [len(sizes) * NUMEL * 4] * 3
    assert max(max(rep["bytes_inter"]) for rep in reports) == max(b - a for a, b in segments(NUMEL, roots)) * 4


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


@pytest.mark.parametrize("compress, ratio, tol", [("bf16", 0.5, 1e-2), ("int8", 0.26, 2e-2)])
def test_compressed_exchange(tmp_path, compress, ratio, tol):
    model, reports = run(tmp_path, [2, 2], 2, roots=2, compress=compress)
    exact = oracle([2, 2], 2)
    start = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32)
    # the model moved as FedAvg says, up to the documented compression error of the update
    assert np.linalg.norm(model - exact) <= tol * np.linalg.norm(exact - start)
    sent = sum(rep["bytes_inter"][0] for rep in reports)
    assert sent <= ratio * 2 * NUMEL * 4


def test_segments_cover_exactly():
    for numel in (1, 7, 1003):
        for n in (1, 2, 3, 5):
            parts = segments(numel, n)
            assert parts[0][0] == 0 and parts[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
