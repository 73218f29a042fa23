"""The federated round against an independent numpy computation: the new global model is the
token-weighted average of the facilities' models, bit-identical on every rank."""
import json

import numpy as np
import pytest

from conftest import mpiexec
from mpifed.federation.reduce import segments


def _expected(sizes, numel):
    """FedAvg by hand: θ_g − Σ_f (T_f / T)(θ_g − θ_f), with T_f the tokens facility f trained."""
    theta_g = np.random.default_rng(7).standard_normal(numel).astype(np.float64)
    thetas = [np.random.default_rng(100 + f).standard_normal(numel).astype(np.float32).astype(np.float64)
              for f in range(len(sizes))]
    tokens = [sum(10 * (f + 1) + r for r in range(size)) for f, size in enumerate(sizes)]
    average = sum(t * th for t, th in zip(tokens, thetas)) / sum(tokens)
    return theta_g.astype(np.float32).astype(np.float64) - sum(
        t / sum(tokens) * (theta_g - th) for t, th in zip(tokens, thetas)), average, tokens


@pytest.mark.parametrize("sizes, roots", [([2, 2], 1), ([2, 2], 2), ([1, 2, 3], 1), ([3, 3], 3)])
def test_weighted_average_matches_numpy(tmp_path, sizes, roots):
    numel = 1003  # not divisible by any facility size or R
    mpiexec(sum(sizes), "reduce_worker.py", ",".join(map(str, sizes)), str(roots), str(numel), str(tmp_path))
    models = [np.load(tmp_path / f"rank-{i}.npy") for i in range(sum(sizes))]
    reports = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(sum(sizes))]
    expected, average, tokens = _expected(sizes, numel)
    np.testing.assert_allclose(models[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(models[0], average, rtol=1e-5, atol=1e-5)  # FedAvg = weighted mean
    for model in models[1:]:
        assert model.tobytes() == models[0].tobytes()  # bit-identical everywhere
    for rep in reports:
        assert rep["facility_tokens"] == tokens[rep["facility"]]
    # each facility's roots hand over one fp32 copy of the model, split in R segments
    assert sum(r["bytes_inter"] for r in reports) == len(sizes) * numel * 4
    assert sorted(r["bytes_inter"] for r in reports if r["bytes_inter"])[-1] == max(
        (b - a) * 4 for a, b in segments(numel, roots))


def test_segments_cover_exactly():
    for numel in (1, 7, 1003):
        for n in (1, 2, 3, 5):
            parts = segments(numel, n)
            assert parts[0][0] == 0 and parts[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
