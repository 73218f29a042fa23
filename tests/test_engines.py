"""The engines against each other under real mpiexec: FSDP2 (plain and HSDP) and DeepSpeed ZeRO 1/2/3
must produce what the replica engine produces from the same model and data, through an exchange
(new values loaded into every engine) and a checkpoint round trip of the optimizer state; three
facilities on three engines keep one global model; a tiny Mixtral trains under fsdp."""
import hashlib
import json

import h5py
import numpy as np
import pytest

from conftest import mpiexec, mpifed
from mpifed import configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.data.corpus import VOCAB_SIZE
from mpifed.layout import FlatLayout
from mpifed.model import build_model

# lr 1e-2 Adam steps move a weight by up to ~1e-2; engines differ only in summation order.
ATOL_MODEL = 1e-4


def _run(tmp_path, ranks: int, engine: str, *options: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{engine}-{ranks}-{'-'.join(options)}.npz"
    mpiexec(ranks, "engine_worker.py", engine, str(out), *options, timeout=300)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("replica"), 2, "replica")


@pytest.mark.parametrize("engine, options", [
    ("replica", ["reload=1"]),
    ("fsdp", ["reload=1"]),
    ("fsdp", ["reload=1", "checkpointing=1"]),
    ("deepspeed", ["stage=1", "reload=1"]),
    ("deepspeed", ["stage=2", "reload=1"]),
    ("deepspeed", ["stage=3", "reload=1"]),
], ids=["replica", "fsdp", "fsdp-activation-checkpointing", "zero1", "zero2", "zero3"])
def test_two_steps_match_the_replica_engine(tmp_path, replica, engine, options):
    got = _run(tmp_path, 2, engine, *options)
    assert not np.isnan(got["model"]).any()  # the ranks' owned pieces cover the whole model
    np.testing.assert_allclose(got["losses"], replica["losses"], rtol=1e-5)
    np.testing.assert_allclose(got["model"], replica["model"], rtol=0, atol=ATOL_MODEL)
    np.testing.assert_allclose(got["exp_avg"], replica["exp_avg"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["exp_avg_sq"], replica["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert got["step"][0] == replica["step"][0] == 2
    np.testing.assert_allclose(got["val"], replica["val"], rtol=1e-5)
    # and the model really moved: two steps at lr 1e-2 change nearly every weight
    initial = np.concatenate([p.detach().numpy().ravel() for p in build_model("llama-tiny", 32, 0, vocab_size=VOCAB_SIZE).parameters()])
    assert np.mean(np.abs(got["model"] - initial) > 1e-3) > 0.5


def test_hsdp_matches_the_replica_engine(tmp_path):
    """4 ranks: 2 replica groups of 2 shards each."""
    want = _run(tmp_path, 4, "replica")
    got = _run(tmp_path, 4, "fsdp", "replicas=2", "reload=1")
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    np.testing.assert_allclose(got["model"], want["model"], rtol=0, atol=ATOL_MODEL)
    np.testing.assert_allclose(got["exp_avg"], want["exp_avg"], rtol=0, atol=1e-5)


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_three_facilities_on_three_engines_hold_one_model(tmp_path):
    cfg = configfile.from_dict(configfile.apply_sets({"facility": [
        {"name": "leonardo", "ranks": 2, "engine": "fsdp"},
        {"name": "lumi", "ranks": 2, "engine": "deepspeed", "deepspeed": {"zero_stage": 3}},
        {"name": "vega", "ranks": 1, "engine": "replica"}]}, [
        "federation.rounds=3", "train.local_steps=4", "data.seq_len=64", "train.grad_accum=2",
        "train.schedule=cosine", "train.warmup_steps=2", "train.grad_clip=1.0", "train.inner_state=reset",
        "eval.every=2", f"checkpoint.dir={tmp_path / 'run'}"]))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    mpiexec(5, "train_worker.py", str(tmp_path / "c.toml"), str(tmp_path), timeout=400)
    digests = {(tmp_path / f"digest-{i}.txt").read_text() for i in range(5)}
    assert len(digests) == 1  # every rank of every engine: the same global model
    layout = FlatLayout.of(build_model("llama-tiny", 64, 0, vocab_size=VOCAB_SIZE))
    flat = checkpoint.read_flat(tmp_path / "run" / checkpoint.main_name(3), layout, "model")
    assert digests == {hashlib.sha256(flat.tobytes()).hexdigest()}
    rows = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["val_loss"] is None and rows[0]["facility_val_loss"] == {}  # eval.every = 2, and the last
    assert set(rows[1]["facility_val_loss"]) == {"leonardo", "lumi", "vega"}
    assert rows[2]["val_loss"] < rows[1]["val_loss"]
    assert abs(rows[2]["val_ppl"] - np.exp(rows[2]["val_loss"])) < 1e-6 * rows[2]["val_ppl"]
    for name in ("leonardo", "lumi", "vega"):  # ZeRO-3 and FSDP shards, saved whole
        with h5py.File(tmp_path / "run" / f"round_00003.fac-{name}.h5") as h5:
            assert h5["optimizer/exp_avg"].shape == (layout.numel,)
            assert h5["optimizer/step"][0] == 4  # inner_state = reset: only this round's 4 steps


@pytest.mark.slow
def test_a_tiny_mixtral_trains_under_fsdp(tmp_path):
    result = mpifed("simulate", "--facilities", "1", "--ranks-per-facility", "2", "--rounds", "3",
                    "--local-steps", "8", "--out", "run", "--set", "model.preset=mixtral-tiny",
                    "--set", "facility.f0.engine=fsdp", "--set", "data.seq_len=64", cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    rows = _metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["val_loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses
    with h5py.File(tmp_path / "run" / checkpoint.main_name(3)) as h5:
        assert h5["model/model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # 4 experts


@pytest.mark.parametrize("setting, message", [
    ("facility.f0.engine=megatron", "facility.f0.engine: unknown engine 'megatron'; choose one of replica, fsdp, deepspeed"),
    ("facility.f1.deepspeed.zero_stage=4", "facility.f1.deepspeed.zero_stage: ZeRO stage 4 does not exist"),
    ("model.path=/nonexistent/llama", "model.path: /nonexistent/llama is not a model folder"),
    ("facility.f0.fsdp.replicas=3", "facility.f0.fsdp.replicas: 3 replica groups do not divide 2 ranks"),
])
def test_bad_engine_settings_fail_before_training(tmp_path, setting, message):
    extra = ["--set", "facility.f0.engine=fsdp"] if "replicas" in setting else []
    result = mpifed("simulate", "--out", "run", "--set", setting, *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_deepspeed_builds_are_kept_apart_per_python_environment(monkeypatch, tmp_path):
    import sys

    from mpifed.engines.deepspeed import extensions_dir

    monkeypatch.setenv("MPIFED_CACHE", str(tmp_path))
    here = extensions_dir()
    assert here.parent == tmp_path / "torch_extensions" and here == extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/opt/another/venv")  # another virtualenv or container, same HOME
    assert extensions_dir() != here and extensions_dir().parent == here.parent
